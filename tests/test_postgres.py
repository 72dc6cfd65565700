"""The cluster path's stores on a real PostgreSQL 15 (127.0.0.1, a temporary folder): a real
`mlflow server` on it, and the record a training run leaves there."""
import pytest

from support.postgres import available
from support.processes import mlflow_server

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(available()), reason=available() or "ok")]


def test_a_run_through_a_server_on_postgresql_keeps_its_datasets_digests_whole(database, tmp_path, data_dir):
    """MLflow's dataset digest column is 36 characters on PostgreSQL: ours are SHA-256's first 32
    hex digits there, and the whole SHA-256 stays in the run's tags."""
    backend = database.create_database("mlflow_digests")
    with mlflow_server(tmp_path, data_dir, backend=backend) as store:
        store.mlflow_run("train", store.params({"epochs": "1", "init": "scratch"}))
        runs = store.runs()
        assert len(runs) == 1, [(r.info.run_name, r.data.tags.get("stage")) for r in runs]
        (run,) = runs
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert all(len(tags[f"dataset.{split}.sha256"]) == 64 for split in ("train", "test"))
    (width,) = database.query("mlflow_digests", "SELECT character_maximum_length FROM information_schema.columns "
                                                "WHERE table_name = 'datasets' AND column_name = 'digest'")
    assert width == (36,)
    stored = dict(database.query("mlflow_digests", "SELECT name, digest FROM datasets"))
    assert sorted(stored.values()) == sorted(tags[f"dataset.{split}.sha256"][:32] for split in ("train", "test"))
    steps = database.query("mlflow_digests", f"SELECT step FROM metrics WHERE run_uuid = '{run.info.run_id}' "
                                             "AND key = 'test_acc'")
    assert steps == [(1,)]  # the epoch, logged once, in PostgreSQL
