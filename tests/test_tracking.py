"""tracking.log_inputs in a real SQLite store: two runs that log the same new dataset at one moment
both finish, linked to one dataset row. The race is forced, not waited for: the other run's insert
is made at the instant this one is about to insert (SQLAlchemy's before_cursor_execute)."""
import numpy as np
import pytest
import sqlalchemy
from mlflow.data import from_numpy
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from pipeline import tracking


def inputs() -> list[DatasetInput]:
    dataset = from_numpy(np.zeros((4, 3)), source="/data/train_32x32.mat", name="n600/train_32x32.mat:train",
                         digest="0123456789abcdef0123456789abcdef")
    return [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])]


@pytest.fixture
def racing(store, monkeypatch):
    """Two runs of one experiment; the first INSERT INTO datasets of `mine` is preceded, between
    MLflow's look-up and its insert, by the other run logging the same dataset."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    mine, other = (store.client.create_run("0").info.run_id for _ in range(2))
    engine = tracking.client()._tracking_client.store.engine
    state = {"raced": 0}

    def other_inserts_first(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO datasets") and not state["raced"]:
            state["raced"] = 1
            store.client.log_inputs(other, datasets=inputs())  # its own connection: committed now

    sqlalchemy.event.listen(engine, "before_cursor_execute", other_inserts_first)
    yield store, mine, other, state
    sqlalchemy.event.remove(engine, "before_cursor_execute", other_inserts_first)


def test_mlflow_alone_loses_the_race(racing):
    """What the retry is for: MLflow's own log_inputs fails on the datasets table's key."""
    store, mine, _, state = racing
    with pytest.raises(MlflowException, match="UNIQUE constraint failed: datasets"):
        tracking.client().log_inputs(mine, datasets=inputs())
    assert state["raced"] == 1


def test_a_run_that_loses_the_race_is_linked_to_the_dataset_the_other_inserted(racing):
    store, mine, other, state = racing
    tracking.log_inputs(mine, inputs())
    assert state["raced"] == 1
    linked = [store.client.get_run(run_id).inputs.dataset_inputs for run_id in (mine, other)]
    assert [[(d.dataset.name, d.dataset.digest) for d in run] for run in linked] == \
        [[("n600/train_32x32.mat:train", "0123456789abcdef0123456789abcdef")]] * 2
    assert [d.tags[0].value for run in linked for d in run] == ["train", "train"]


def test_any_other_store_error_is_not_retried(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    run_id = store.client.create_run("0").info.run_id
    store.client.set_terminated(run_id)
    store.client.delete_run(run_id)
    calls = []
    real = tracking.client().__class__.log_inputs

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tracking.client().__class__, "log_inputs", counted)
    with pytest.raises(MlflowException):
        tracking.log_inputs(run_id, inputs())
    assert calls == [1]
