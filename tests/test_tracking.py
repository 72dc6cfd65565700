"""tracking.log_inputs in a real store, SQLite and PostgreSQL 15: two runs that log the same new
dataset at one moment both finish, linked to one dataset row. The race is forced, not waited for:
the other run's insert is made at the instant this one is about to insert (SQLAlchemy's
before_cursor_execute)."""
import uuid

import mlflow
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


@pytest.fixture(params=["sqlite", "postgresql"])
def racing(request, store, monkeypatch):
    """Two runs of one experiment; the first INSERT INTO datasets of `mine` is preceded, between
    MLflow's look-up and its insert, by the other run logging the same dataset."""
    uri = store.uri if request.param == "sqlite" else \
        request.getfixturevalue("database").create_database(f"race_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    mine, other = (client.create_run("0").info.run_id for _ in range(2))
    engine = tracking.client()._tracking_client.store.engine
    state = {"raced": 0}

    def other_inserts_first(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO datasets") and not state["raced"]:
            state["raced"] = 1
            client.log_inputs(other, datasets=inputs())  # its own connection: committed now

    sqlalchemy.event.listen(engine, "before_cursor_execute", other_inserts_first)
    yield client, mine, other, state
    sqlalchemy.event.remove(engine, "before_cursor_execute", other_inserts_first)


def test_mlflow_alone_loses_the_race(racing):
    """What the retry is for: MLflow's own log_inputs fails on the datasets table's key."""
    _, mine, _, state = racing
    with pytest.raises(MlflowException) as lost:
        tracking.client().log_inputs(mine, datasets=inputs())
    assert state["raced"] == 1
    assert tracking.lost_dataset_race(lost.value), str(lost.value)


def test_a_run_that_loses_the_race_is_linked_to_the_dataset_the_other_inserted(racing):
    client, mine, other, state = racing
    tracking.log_inputs(mine, inputs())
    assert state["raced"] == 1
    linked = [client.get_run(run_id).inputs.dataset_inputs for run_id in (mine, other)]
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


def store_error(error_class, statement: str, words: str, through_server: bool) -> MlflowException:
    """An error as MLflow raises it: SQLAlchemy's, wrapped by the store, and through a tracking
    server the same message in a RestException."""
    from mlflow.exceptions import RestException

    wrapped = MlflowException(error_class(statement, {}, Exception(words)))
    if through_server:
        return RestException({"error_code": "BAD_REQUEST", "message": wrapped.message})
    return wrapped


DATASETS_INSERT = "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest) VALUES (?, ?, ?, ?)"


@pytest.mark.parametrize("through_server", [False, True])
@pytest.mark.parametrize("words", [
    "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest",  # SQLite
    'duplicate key value violates unique constraint "dataset_pk"',  # PostgreSQL
    "(1062, \"Duplicate entry '1-n600-0123' for key 'PRIMARY'\")",  # MySQL 5.7, MariaDB
    "doppelter Schlüsselwert verletzt Unique-Constraint »dataset_pk«",  # PostgreSQL in German
])
def test_a_lost_dataset_insert_is_known_by_any_database_and_through_a_server(words, through_server):
    assert tracking.lost_dataset_race(store_error(sqlalchemy.exc.IntegrityError, DATASETS_INSERT, words,
                                                  through_server))


@pytest.mark.parametrize("error_class,statement,words", [
    (sqlalchemy.exc.IntegrityError, "INSERT INTO runs (run_uuid) VALUES (?)", "UNIQUE constraint failed: runs.run_uuid"),
    (sqlalchemy.exc.OperationalError, DATASETS_INSERT, "database is locked"),
])
def test_other_store_errors_are_not_taken_for_the_race(error_class, statement, words):
    assert not tracking.lost_dataset_race(store_error(error_class, statement, words, through_server=False))


def test_a_password_in_a_store_uri_never_reaches_a_message(monkeypatch):
    from pipeline import cluster, config, urls
    from pipeline.errors import ConfigError

    for given, shown in (("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
                         ("https://me:hunter2@mlflow.example/x?y=1", "https://***@mlflow.example/x?y=1"),
                         ("https://TOKEN@index.example/simple", "https://***@index.example/simple"),  # a token user
                         ("https://u:p@rt@index.example/s", "https://***@index.example/s"),
                         ("postgresql://u:hun#ter2@db/m", "postgresql://u:***@db/m"),  # SQLAlchemy reads it so
                         ("postgresql://u:hun/ter2@db/m", "postgresql://u:***@db/m"),
                         ("postgresql://u@db/m?password=hunter2", "postgresql://u@db/m?password=***"),
                         ("weird://me:hunter2@host:port", "weird://me:***@host:port")):  # no database URL
        assert urls.redacted(given) == shown
    for kept in ("postgresql://mlflow@db/mlflow", "sqlite:///mlflow.db", "databricks://profile:x", "[::1"):
        assert urls.redacted(kept) == kept
    # a database store with a Ray cluster elsewhere: refused, and the line shows the URI without it
    monkeypatch.setattr(cluster, "tracking_uri", lambda: "postgresql://mlflow:hunter2@db/mlflow")
    with pytest.raises(ConfigError) as refused:
        cluster.check_tracking(config.load("tune_lr", {"executor": "ray", "ray_address": "ray://192.0.2.10:10001"}))
    assert "is postgresql://mlflow:***@db/mlflow:" in str(refused.value) and "hunter2" not in str(refused.value)


def test_an_error_line_hides_a_password_in_any_url_in_it(monkeypatch):
    from pipeline import errors, urls
    from pipeline.errors import first_line

    err = RuntimeError("API request to http://alice:s3cret@db.example:5000/api failed (postgresql://u:s3cret@db/x)"
                       "\nsecond line")
    assert first_line(err, None) == "API request to http://***@db.example:5000/api failed (postgresql://u:***@db/x)"
    for said, shown in (("tracking URI http://alice:s3cret@[::1]", "tracking URI http://***@[::1]"),  # its ] kept
                        ("(postgresql://u:s3cret@[::1]).", "(postgresql://u:***@[::1])."),
                        ("see http://a:s3cret@[fe80::1]:5000/x, then", "see http://***@[fe80::1]:5000/x, then"),
                        # a password SQLAlchemy takes unencoded, with a quote or a space in it
                        ("error: postgresql://u:pa'ss@db.example/mlflow failed", "error: postgresql://u:***@db.example/mlflow failed"),
                        ("at postgresql://u:pa ss@db/x.", "at postgresql://u:***@db/x."),
                        # a presigned URL's signature and token, not the path or an ordinary key
                        ("413 for url: https://b.s3.amazonaws.com/a/best.pt?X-Amz-Credential=AKIA%2F1&X-Amz-Signature="
                         "f00d&X-Amz-Security-Token=t0k&partNumber=2 then", "413 for url: https://b.s3.amazonaws.com/a/"
                         "best.pt?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&partNumber=2 then"),
                        ("see https://acct.blob.core.windows.net/c/x?sv=2022&sig=abc%3D&se=1", "see https://acct.blob."
                         "core.windows.net/c/x?sv=2022&sig=***&se=1"),
                        # a host:port/path, then an address further on: nothing hidden
                        ("see http://h:5000/x or mail a@b.c", "see http://h:5000/x or mail a@b.c")):
        assert urls.scrubbed(said) == shown
    seen = []
    monkeypatch.setattr(errors, "scrubbed", lambda text: seen.append(text) or text)
    first_line(RuntimeError("line one\n" + "a" * 100_000))
    assert seen == ["line one"]  # the rest of a long message is never scanned


def test_a_tracking_server_only_this_machine_reaches_is_refused_for_a_ray_cluster_elsewhere(monkeypatch):
    """Each node would ask its own 127.0.0.1 (mlflow server's default bind): its children's runs
    would fail after the client's retries, or land in another store on each node."""
    from pipeline import cluster, config
    from pipeline.errors import ConfigError

    elsewhere = config.load("tune_lr", {"executor": "ray", "ray_address": "ray://192.0.2.10:10001"})
    for here in ("http://127.0.0.1:5000", "http://localhost:5000", "https://me:hunter2@[::1]:5000", "http://0.0.0.0:5000",
                 "sqlite:///mlflow.db"):
        monkeypatch.setattr(cluster, "tracking_uri", lambda: here)
        with pytest.raises(ConfigError, match="needs a tracking server that every node reaches") as refused:
            cluster.check_tracking(elsewhere)
        assert "hunter2" not in str(refused.value)
    for shared in ("http://mlflow.example:5000", "https://10.0.0.5"):
        monkeypatch.setattr(cluster, "tracking_uri", lambda: shared)
        cluster.check_tracking(elsewhere)  # every node reaches it


def test_a_run_the_store_does_not_hold_is_not_found_and_a_store_that_is_down_says_so(store, monkeypatch):
    from support.processes import refusing_port

    from pipeline.errors import LineageError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    for missing in ("0123456789abcdef0123456789abcdef", "nonexistent", "runs:/abc/checkpoints"):  # a pasted URI too
        with pytest.raises(LineageError, match=f"parent run '{missing}' was not found in the tracking store"):
            tracking.get_run(missing)
    with refusing_port() as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(MlflowException) as err:  # the store's own error, never "pass an existing run"
            tracking.get_run("0123456789abcdef0123456789abcdef", "resume")
    assert not isinstance(err.value, LineageError) and "API request to" in str(err.value)
