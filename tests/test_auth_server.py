"""A shared `mlflow server --app-name basic-auth`: one user trains, another is refused in one line."""
import base64
import json
import urllib.parse
import urllib.request

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from support.processes import mlflow_server
from support.store import Store
from pipeline import tracking

pytestmark = pytest.mark.e2e

ADMIN = ("admin", "admin-password-1234")
ALICE = ("alice", "alice-password-1234")
BOB = ("bob", "bob-password-123456")


def call(url: str, path: str, body: dict, user: tuple[str, str], method: str = "POST") -> dict:
    """The auth REST API as `user`; a GET sends `body` as the query string."""
    token = base64.b64encode(":".join(user).encode()).decode()
    query = f"?{urllib.parse.urlencode(body)}" if method == "GET" else ""
    request = urllib.request.Request(f"{url}{path}{query}", method=method,
                                     data=json.dumps(body).encode() if method == "POST" else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Basic {token}"})
    return json.load(urllib.request.urlopen(request, timeout=30))


def as_user(store: Store, user: tuple[str, str] | None) -> dict[str, str]:
    env = dict(store.env)
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    if user:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = user
    return env


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("auth")
    config = root / "basic_auth.ini"
    config.write_text("[mlflow]\n"
                      "default_permission = READ\n"  # everyone reads, only owners and grantees write
                      f"database_uri = sqlite:///{root / 'auth.db'}\n"
                      f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    with mlflow_server(root, data_dir, "--app-name", "basic-auth", env={
            "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as store:
        for user in (ALICE, BOB):
            call(store.uri, "/api/2.0/mlflow/users/create", {"username": user[0], "password": user[1]}, ADMIN)
        yield store


def test_owner_trains_and_a_reader_is_refused_in_one_line(auth_server, monkeypatch):
    store = auth_server
    # alice: `mlflow run` creates her experiment (she owns it) and trains into it
    store.env = dict(as_user(store, ALICE), MLFLOW_EXPERIMENT_NAME="alice-svhn")
    store.mlflow_run("train", store.params({"epochs": "1"}))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = MlflowClient(store.uri)
    experiment_id = admin.get_experiment_by_name("alice-svhn").experiment_id
    (run,) = admin.search_runs([experiment_id])
    assert run.info.status == "FINISHED"
    def permission(user):
        return call(store.uri, "/api/3.0/mlflow/users/permissions/get",
                    {"username": user[0], "resource_type": "experiment", "resource_id": experiment_id},
                    ADMIN, method="GET")["permission"]

    assert (permission(ALICE), permission(BOB)) == ("MANAGE", "READ")  # creator / default_permission
    assert store.steps(run.info.run_id, "test_acc") == [1]
    assert "checkpoints/best.pt" in store.artifacts(run.info.run_id)

    # bob may read (default_permission READ) but not write to alice's experiment
    store.env = dict(as_user(store, BOB), MLFLOW_EXPERIMENT_ID=experiment_id)
    store.env.pop("MLFLOW_EXPERIMENT_NAME")
    proc = store.cli("train", *[f"--{k}={v}" for k, v in store.params({"epochs": "1"}).items()])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: tracking server {store.uri} refused user 'bob' (403 permission denied) "
                               f"for /api/2.0/mlflow/runs/create (experiment {experiment_id})")
    assert "EDIT permission" in lines[0] and "MLFLOW_TRACKING_USERNAME" in lines[0]
    assert [r.info.run_id for r in admin.search_runs([experiment_id])] == [run.info.run_id]


def test_missing_or_wrong_credentials_become_one_line(auth_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.uri)
    monkeypatch.setenv("HOME", str(auth_server.root))  # no ~/.mlflow/credentials either
    with pytest.raises(MlflowException) as err:
        MlflowClient(auth_server.uri).create_experiment("nobody's")
    line = tracking.server_refusal(err.value)
    assert line.startswith(f"tracking server {auth_server.uri} refused a request with no credentials "
                           f"(401 not authenticated) for /api/2.0/mlflow/experiments/create")
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line and "\n" not in line

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", BOB[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-bobs-password")
    with pytest.raises(MlflowException) as err:
        MlflowClient(auth_server.uri).create_experiment("bob's")
    assert "refused user 'bob' (401 not authenticated)" in tracking.server_refusal(err.value)
    assert tracking.server_refusal(MlflowException("some other failure")) is None
