"""The Optuna pieces a study is built from: the search space, the storage (never the MLflow
database; one every node reaches), the study's name, the pruner, and the epoch hook that reports
to a trial where its child trains."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import optuna

from . import cluster, keys
from .config import Config, absolute
from .errors import ConfigError, first_line
from .runtime import Runtime
from .urls import in_memory, redacted


# -- the search space -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSpace:
    """lr log-uniform, gamma uniform, wd log-uniform where a draw below wd_zero_below means wd=0
    (one parameter, so TPE models "no weight decay" as the low end of the range), bs categorical."""
    lr: tuple[float, float]
    gamma: tuple[float, float]
    wd: tuple[float, float]
    wd_zero_below: float
    bs: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: Config) -> "SearchSpace":  # config.load refuses an empty one
        return cls(tuple(cfg.lr_range), tuple(cfg.gamma_range), tuple(cfg.wd_range), cfg.wd_zero_below,
                   tuple(cfg.bss))

    def suggest(self, trial) -> dict:
        """The trial's values as trained (wd already 0 below the floor)."""
        trial.suggest_float("lr", *self.lr, log=True)
        trial.suggest_float("gamma", *self.gamma)
        trial.suggest_float("wd", *self.wd, log=True)
        trial.suggest_categorical("bs", list(self.bs))
        return self.values(trial.params)

    def draw_of(self, point: dict) -> dict | None:
        """The draw that trains as `point` (lr, gamma, wd, bs), or None where the space has none:
        wd=0 is drawn as the low end of the wd range, which trains as 0 when it lies below the floor."""
        draw = dict(point, wd=self.wd[0] if point["wd"] == 0 else point["wd"])
        inside = (self.lr[0] <= draw["lr"] <= self.lr[1] and self.gamma[0] <= draw["gamma"] <= self.gamma[1]
                  and self.wd[0] <= draw["wd"] <= self.wd[1] and draw["bs"] in self.bs)
        return draw if inside and self.values(draw) == point else None

    def values(self, params: dict) -> dict:
        wd = params["wd"]
        return {"lr": float(params["lr"]), "gamma": float(params["gamma"]),
                "wd": 0.0 if wd < self.wd_zero_below else float(wd), "bs": int(params["bs"])}


def short(value: float) -> str:
    """3.1e-4, 0.5, 0: two significant digits, readable in a run name."""
    if value == 0:
        return "0"
    if float(value).is_integer() and abs(value) < 1e6:  # a batch size: 256, not 2.6e+02
        return str(int(value))
    if 1e-2 <= abs(value) < 1e3:
        return format(value, ".2g")
    mantissa, exponent = format(value, ".1e").split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def trial_name(number: int, values: dict) -> str:
    return (f"autotune #{number} lr={short(values['lr'])} gamma={short(values['gamma'])} "
            f"wd={short(values['wd'])} bs={values['bs']}")


# -- storage and study ------------------------------------------------------------------------------

def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:/// URL as this process's working directory reads it, else None (also
    for an in-memory database, or one given as a file: URI)."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if not path or path.startswith((":memory:", "file:")):
        return None
    return absolute(path)


def absolute_sqlite(url: str) -> str:
    """A sqlite:/// URL with its file as this process's working directory reads it; else as given."""
    path = sqlite_file(url)
    return url if path is None else f"sqlite:///{path}"


def default_storage(tracking_uri: str) -> str:
    """SQLite beside a SQLite tracking store (mlflow.db -> mlflow.optuna.db), else ./optuna.db.
    Never the MLflow database itself: both keep their schema version in an alembic_version table."""
    path = sqlite_file(tracking_uri)
    if path is not None:
        return f"sqlite:///{path.with_name(path.stem + '.optuna.db')}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def same_database(a: str, b: str) -> bool:
    """Whether two database URLs name one database however spelt: SQLite files by resolved path
    (sqlite:///mlflow.db is the same file as its absolute spelling), servers by backend, host
    (any case; a socket folder given as ?host=), port (the backend's default when none) and
    name, whoever logs in. A URI that is no database URL (http://, databricks://) is none."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        x, y = make_url(a), make_url(b)
    except (ArgumentError, ValueError):
        return a == b
    if x.get_backend_name() != y.get_backend_name():
        return False
    if x.get_backend_name() == "sqlite":
        files = [Path(u.database).expanduser().resolve() for u in (x, y) if u.database not in (None, "", ":memory:")]
        return len(files) == 2 and files[0] == files[1]

    def server(u) -> tuple:
        host = u.host or u.query.get("host") or ""
        return (str(host).lower(), u.port or DEFAULT_PORTS.get(u.get_backend_name()), u.database)

    return server(x) == server(y)


def storage_url(cfg: Config, tracking_uri: str) -> str:
    url = cfg.optuna_storage or default_storage(tracking_uri)
    if in_memory(url):
        raise ConfigError(f"optuna_storage={url} is a database in memory, which no trial (another connection) "
                          f"shares: pass a file (sqlite:///study.db) or a server, or leave it empty")
    url = absolute_sqlite(url)  # as this directory reads it: Ray's workers run in theirs
    if same_database(url, tracking_uri):
        raise ConfigError(f"optuna_storage={redacted(url)} is the MLflow tracking database: Optuna needs its own "
                          f"(both keep an alembic_version table); pass another, or leave it empty")
    # children report to the study from where they train: the MLflow store's rule, one function
    cluster.require_shared_store(cfg, "optuna_storage", url, True, "an Optuna database server",
                                  "pass -P optuna_storage=postgresql://user@host/db (or mysql+pymysql://...), "
                                  "host a name every node reaches (not localhost)")
    return url


def reachable_storage(cfg: Config, tracking_uri: str) -> str:
    """storage_url, opened once: a database Optuna cannot open (a folder that is not there, a
    server that is down, a driver not installed) is one line before any run exists."""
    from sqlalchemy.exc import SQLAlchemyError

    url = storage_url(cfg, tracking_uri)
    try:
        open_storage(url).engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError, OSError, RuntimeError) as err:  # Runtime: another schema
        raise ConfigError(f"cannot open optuna_storage={redacted(url)} ({type(err).__name__}: {first_line(err)}): "
                          f"pass a database Optuna can reach, or leave it empty for one beside the tracking "
                          f"store") from None
    return url


# Optuna's trial heartbeat: the driver beats for each trial it has in flight; a trial whose driver
# has not beaten for GRACE_PERIOD_S (the driver died, and Ray took its tasks with it) is failed by
# Optuna's fail_stale_trials and handed to the storage's stale-trial callback (a retry)
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 60


def open_storage(url: str, on_stale=None) -> optuna.storages.RDBStorage:
    """The study's RDB storage; with `on_stale`, Optuna's heartbeat on, calling on_stale(study,
    failed_trial) for each trial fail_stale_trials fails."""
    # several processes write one SQLite file (Ray workers): wait for its lock instead of failing
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if on_stale is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                      grace_period=GRACE_PERIOD_S, heartbeat_stale_trial_callback=on_stale)


class Heartbeats:
    """The heartbeat of every trial this driver has in flight, from ask until its result is told
    or the driver stops: Optuna's record_heartbeat every HEARTBEAT_INTERVAL_S, from one daemon
    thread that outlives a failed beat (a database blip must not let the driver's own trials go
    stale) and never holds up the driver's exit."""

    def __init__(self, storage):
        import threading

        self.storage, self.trial_ids, self.lock = storage, set(), threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="optuna-heartbeats", daemon=True)
        self.thread.start()

    def beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception as err:  # noqa: BLE001 - the next beat tries again, well inside the grace period
            print(f"autotune: heartbeat of trial id {trial_id} not recorded ({type(err).__name__}); "
                  f"trying again in {HEARTBEAT_INTERVAL_S} s", flush=True)

    def loop(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            self.beat_all()

    def start(self, trial_id: int) -> None:
        """Beat now (a trial never exists without a heartbeat, so it can go stale) and from now on."""
        with self.lock:
            self.trial_ids.add(trial_id)
        self.beat(trial_id)

    def beat_all(self) -> None:
        """Each of ours beaten now: fresh before this driver looks for stale trials."""
        with self.lock:
            trial_ids = list(self.trial_ids)
        for trial_id in trial_ids:
            self.beat(trial_id)

    def stop(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def study_name(cfg: Config, data_digest: str, runtime: Runtime, experiment: str) -> str:
    """From the stage's study key (its training key without n_trials) and its MLflow experiment
    (`experiment_scope`): more trials continue the same study, and the same stage runs (tag
    stage_key). Another experiment, or another store, has a study of its own: its trials' runs
    are not this one's to reuse (the default storage is one file for all of a store's experiments,
    and ./optuna.db for any server)."""
    key = f"{keys.study_key(cfg, data_digest, runtime)}|{experiment}"
    return f"autotune-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def experiment_scope(experiment) -> str:
    """An MLflow experiment as a study's scope: its id and creation time (a store made again
    numbers its experiments from the start again)."""
    return f"{experiment.experiment_id}@{experiment.creation_time}"


def sampler(seed: int, startup_trials: int) -> optuna.samplers.TPESampler:
    """Multivariate TPE (lr, gamma, wd and bs modelled jointly, not one at a time), with
    constant_liar so trials in flight at once are kept apart."""
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True,
                                      n_startup_trials=startup_trials)


def build_pruner(name: str, startup_trials: int, warmup_epochs: int, trial_epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=trial_epochs,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


# -- where a trial trains: its epoch hook --------------------------------------------------------

@dataclass(frozen=True)
class TrialRef:
    """What a child needs to report to its trial, wherever it trains (plain values: picklable)."""
    storage: str
    study: str
    trial_id: int
    selects_on: str
    pruner: str
    startup_trials: int
    warmup_epochs: int
    trial_epochs: int


def epoch_hook(ref: TrialRef):
    """Built where the child trains: report each epoch's selection accuracy to the trial and
    return True (end training after this epoch) when Optuna's pruner prunes it."""
    study = optuna.load_study(study_name=ref.study, storage=open_storage(ref.storage),
                              sampler=optuna.samplers.RandomSampler(),  # samples nothing here
                              pruner=build_pruner(ref.pruner, ref.startup_trials, ref.warmup_epochs,
                                                  ref.trial_epochs))
    trial = optuna.trial.Trial(study, ref.trial_id)

    def hook(end) -> bool:
        result = end.result
        trial.report(selection_value(result, ref.selects_on), result.epoch)
        # after its last epoch a trial is over anyway: it completes, whatever the pruner thinks
        return result.epoch < ref.trial_epochs and bool(trial.should_prune())

    return hook


def selection_value(epoch, selects_on: str) -> float:
    return epoch.val_acc if selects_on == "val" else epoch.test_acc
