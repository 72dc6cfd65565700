"""Where a stage's children train: one after another in this process (executor=local), or each
as a Ray task on a local Ray or a cluster (executor=ray). Either way every child is trained by
runner.child_run, so the MLflow record is the same; the stage then aggregates as usual.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Callable
from urllib.parse import urlparse

from . import data as data_mod
from . import interrupts, lifecycle, runner, tracking
from .config import Config, ConfigError
from .runner import RunResult, child_run, log


class ChildFailed(RuntimeError):
    """A child that failed for good on Ray: the message is the one line the user sees."""


@dataclass
class ChildSpec:
    """One child run of a stage: its name, its own config, and where its weights come from."""
    name: str
    cfg: Config
    arch: str
    init_state: dict | None = None
    tags: dict[str, str] = field(default_factory=dict)
    init_source: str = ""
    keep_final: bool = False
    # builds the per-epoch hook (pruning) where the child trains; picklable for Ray
    make_hook: Callable[[], Callable] | None = None


def train_child(parent_run_id: str, spec: ChildSpec, dataset: data_mod.SVHNData,
                progress: Callable[[str, object], None] | None = None) -> RunResult:
    hook = spec.make_hook() if spec.make_hook else None

    def epoch_hook(result):
        if progress:
            progress(spec.name, result)
        return hook(result) if hook else False

    return child_run(parent_run_id, spec.name, spec.cfg, dataset, arch=spec.arch,
                     init_state=spec.init_state, tags=spec.tags, init_source=spec.init_source,
                     keep_final=spec.keep_final, epoch_hook=epoch_hook)


def run_children(cfg: Config, parent_run_id: str, specs: list[ChildSpec],
                 dataset: data_mod.SVHNData) -> list[RunResult]:
    """Train every child of `specs` under `parent_run_id`; results in the order of `specs`."""
    if cfg.executor == "ray":
        return run_on_ray(cfg, parent_run_id, specs, dataset)
    return [train_child(parent_run_id, spec, dataset) for spec in specs]



# -- executor=ray -------------------------------------------------------------------------------------

# MLflow tracking settings a worker on another machine needs (it does not share our environment)
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_ALLOW_PICKLE_DESERIALIZATION")  # __main__ sets it: workers elsewhere too


def tracking_uri() -> str:
    """The tracking URI as every process can use it: a relative SQLite path made absolute."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix):])
    return uri


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def local_addresses() -> set[str]:
    """This machine's names and the addresses of all its interfaces: a Ray started here (`ray start
    --head`) names its node by the LAN address, which the host name need not resolve to."""
    import psutil

    addresses = {"localhost", socket.gethostname()}
    try:
        addresses |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    addresses |= {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic
                  if a.family in (socket.AF_INET, socket.AF_INET6)}
    return addresses


def is_local_host(host: str) -> bool:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    return host in local_addresses()


def beyond_this_machine(cfg: Config) -> str:
    """Where children of `cfg` may train off this machine ("" when all train here): a ray_address
    on another host (known without connecting), or a cluster with nodes elsewhere (joined to look;
    a Ray this process starts has only this machine)."""
    if cfg.executor != "ray":
        return ""
    address = cfg.ray_address
    if address not in ("", "auto", "local"):
        host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
        if not is_local_host(host):
            return f"ray_address={address} (another machine)"
    import ray

    if address in ("", "local") and not ray.is_initialized():
        return ""
    connect(cfg)
    remote = sorted({n["NodeManagerAddress"] for n in ray.nodes()
                     if n["Alive"] and not is_local_host(n["NodeManagerAddress"])})
    return f"nodes on other machines ({', '.join(remote[:3])})" if remote else ""


def require_shared_store(cfg: Config, store: str, uri: str, shared: bool, needs: str, fix: str) -> None:
    """The one rule for every store children write (MLflow's, Optuna's): a store on this machine
    (SQLite, a local folder) serves children on this machine only."""
    if shared:
        return
    where = beyond_this_machine(cfg)
    if where:
        raise ConfigError(f"executor=ray with {where} needs {needs} that every node reaches, but {store} "
                          f"is {uri}: {fix} (README: Scaling out with Ray)")


def check_tracking(cfg: Config) -> None:
    """Children on other machines need an http(s) tracking URI: an explicit ray_address elsewhere
    is refused before connecting, `auto` (or a local address) once its nodes are known."""
    uri = tracking_uri()
    require_shared_store(cfg, "the tracking URI", uri, is_server(uri), "a tracking server",
                         "start `mlflow server` and set MLFLOW_TRACKING_URI=http://<host>:5000")


def check_before_runs(cfg: Config, *more_checks: Callable[[], object]) -> None:
    """Everything the stage would refuse once running, checked before any run exists (the CLI
    calls this): `more_checks` first (the Optuna store: an address elsewhere is refused without
    connecting), then with executor=ray a store on this machine for children elsewhere and what
    the cluster can place. `main` only looks: each of its stages connects (or starts its own
    Ray) in its own process."""
    ray = None
    if cfg.executor == "ray":
        import ray
    started_here = ray is not None and not ray.is_initialized()
    try:
        for check in more_checks:
            check()
        if ray is not None:
            check_cluster(cfg)
    finally:
        if cfg.stage == "main" and started_here and ray.is_initialized():
            ray.shutdown()
            RAY.clear()


RAY: dict = {}  # what this process put in Ray's object store once: {key: ObjectRef}


def connect(cfg: Config) -> None:
    """Join cfg.ray_address, or start a local Ray ("") that this process stops when it exits.
    The driver stays this process; Ray's own processes never see MLFLOW_RUN_ID (mlflow#15713)."""
    import ray

    if ray.is_initialized():
        return
    held = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        with interrupts.critical():  # a Ray started halfway is not stopped cleanly: Ctrl-C waits
            if cfg.ray_address in ("", "local"):
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=cfg.ray_address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"could not reach Ray at ray_address={cfg.ray_address}: "
                          f"{str(err).splitlines()[0][:200]}; start it with `ray start --head` or "
                          f"leave ray_address empty for a local Ray") from None
    finally:
        if held is not None:
            os.environ["MLFLOW_RUN_ID"] = held
    interrupts.install()  # Ray's core worker puts its own SIGINT handler in: ours marks runs KILLED
    RAY.clear()  # refs from an earlier connection are gone with it
    log(f"ray: {'joined ' + cfg.ray_address if cfg.ray_address not in ('', 'local') else 'started a local Ray'}, "
        f"{len([n for n in ray.nodes() if n['Alive']])} node(s), resources {ray.cluster_resources()}")


def check_cluster(cfg: Config) -> None:
    """What the cluster (joined, or started here) can place: nodes beyond this machine need a
    server; a child that fits no node would wait forever; a GPU left unused for CPU-only children
    is almost surely a mistake."""
    import ray

    check_tracking(cfg)  # before connecting: an explicit address elsewhere is refused at once
    connect(cfg)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    cpus = max(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = max(n["Resources"].get("GPU", 0) for n in nodes)
    if cfg.cpus_per_trial > cpus or cfg.gpus_per_trial > gpus:
        raise ConfigError(f"cpus_per_trial={cfg.cpus_per_trial:g} gpus_per_trial={cfg.gpus_per_trial:g} "
                          f"fits no Ray node (the largest has {cpus:g} CPUs, {gpus:g} GPUs): lower them")
    if gpus and not cfg.gpus_per_trial and cfg.device != "cpu":
        raise ConfigError(f"the Ray cluster has GPUs but gpus_per_trial=0 would train every child on CPU: "
                          f"set -P gpus_per_trial=0.25 (four children a GPU), or -P device=cpu")


def shared(value, key: str):
    """Put `value` in Ray's object store once per process (the decoded data): tasks on any node
    read it from there, none re-reads a .mat file."""
    import ray

    if key not in RAY:
        RAY[key] = ray.put(value)
    return RAY[key]


class ProgressBoard:
    """Per-child progress that workers report and the driver shows (a Ray actor)."""

    def __init__(self):
        self.updates: list[tuple[str, str]] = []

    def update(self, name: str, text: str) -> None:
        self.updates.append((name, text))

    def read(self, since: int) -> list[tuple[str, str]]:
        return self.updates[since:]


def ray_child(env: dict[str, str], parent_run_id: str, spec: ChildSpec, init_state, dataset,
              adoptable: set[str], board) -> RunResult:
    """One child on a Ray worker: tracked by the same child_run as executor=local."""
    import ray

    os.environ.pop("MLFLOW_RUN_ID", None)  # else it silently becomes every run's parent (mlflow#15713)
    os.environ.update(env)
    context = ray.get_runtime_context()
    lifecycle.OWNER["task"] = f"ray-task:{context.get_task_id()}"
    lifecycle.ADOPTABLE.update(adoptable)
    node = context.get_node_id()
    spec = replace(spec, init_state=init_state, tags={**spec.tags, "ray_node_id": node})

    def progress(name: str, result) -> None:
        acc = result.val_acc if result.val_acc is not None else result.test_acc
        split = "val" if result.val_acc is not None else "test"
        board.update.remote(name, f"epoch {result.epoch}/{spec.cfg.epochs}  {split}_acc {acc:6.2f}%  "
                                  f"{result.train_images_per_s:,.0f} img/s  node {node[:8]}")

    board.update.remote(spec.name, f"starting on node {node[:8]}")
    result = train_child(parent_run_id, spec, dataset, progress)
    tracking.client().set_tag(result.run_id, "ray_node_id", node)  # a retry may have moved it
    # waited for: it (and every update before it) is on the board before the driver sees the result
    ray.get(board.update.remote(spec.name, f"done: best {result.selected_on}_acc {result.best_acc:.2f}% "
                                           f"at epoch {result.best_epoch}"))
    return result


class Display:
    """One line per child: on a terminal the lines update in place; elsewhere each update is a line."""

    def __init__(self, names: list[str], board):
        self.names, self.board, self.seen, self.drawn = names, board, 0, 0
        self.rows: dict[str, str] = {}
        self.width = max(len(n) for n in names)
        self.tty = sys.stdout.isatty()

    def refresh(self) -> None:
        import ray

        updates = ray.get(self.board.read.remote(self.seen))
        self.seen += len(updates)
        for name, text in updates:
            self.rows[name] = text
            if not self.tty:
                log(f"[ray] {name:<{self.width}}  {text}")
        if self.tty and updates:
            lines = [f"{n:<{self.width}}  {self.rows.get(n, 'waiting')}" for n in self.names]
            sys.stdout.write("\x1b[F" * self.drawn + "".join(f"\x1b[2K{line}\n" for line in lines))
            sys.stdout.flush()
            self.drawn = len(lines)


def run_on_ray(cfg: Config, parent_run_id: str, specs: list[ChildSpec],
               dataset: data_mod.SVHNData) -> list[RunResult]:
    """Each child a Ray task (cpus_per_trial, gpus_per_trial, spread over the nodes, retried
    max_retries times when its worker dies); this process waits, shows progress and returns the
    results in the order of `specs`, for the stage to aggregate as with executor=local."""
    import ray

    check_cluster(cfg)  # the CLI checked this before any run existed; in-process callers did not
    env = {k: v for k, v in os.environ.items() if k in TRACKING_ENV}
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    data_ref = shared(dataset, f"data-{dataset.digest}")
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    task = ray.remote(ray_child)
    placement = dict(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial, max_retries=cfg.max_retries,
                     retry_exceptions=False, scheduling_strategy="SPREAD")
    refs, states = [], {}  # a parent's weights go to the object store once for all its children
    results: dict[int, RunResult] = {}
    pending = refs  # while submitting, every task submitted so far: a Ctrl-C then cancels those too
    try:
        for spec in specs:
            if spec.init_state is not None and id(spec.init_state) not in states:
                states[id(spec.init_state)] = ray.put(spec.init_state)
            state_ref = states.get(id(spec.init_state)) if spec.init_state is not None else None
            refs.append(task.options(name=spec.name, **placement).remote(
                env, parent_run_id, replace(spec, init_state=None), state_ref, data_ref,
                set(lifecycle.ADOPTABLE), board))
        display = Display([s.name for s in specs], board)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            display.refresh()
            for ref in done:
                index = refs.index(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayError as err:
                    with interrupts.critical():
                        stop(pending, parent_run_id, {specs[index].name: "FAILED"})
                    raise ChildFailed(failure_line(specs[index].name, err, cfg)) from None
        display.refresh()
    except KeyboardInterrupt:
        with interrupts.critical():  # `mlflow run` follows Ctrl-C with SIGTERM: finish this first
            runner.KILLED_RUNS.extend(stop(pending, parent_run_id, {}))
        raise
    finally:
        ray.kill(board)
    return [results[i] for i in range(len(specs))]


def failure_line(name: str, err: Exception, cfg: Config) -> str:
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        text = str(cause).strip().splitlines()
        return f"child '{name}' failed: {type(cause).__name__}: {text[-1][:200] if text else ''}"
    return (f"child '{name}' failed: its worker died {cfg.max_retries + 1} times "
            f"({type(err).__name__}); run the same command again to resume it, or raise -P max_retries")


def stop(pending: list, parent_run_id: str, status_of: dict[str, str]) -> list[str]:
    """Cancel the tasks still running, then end every child run still RUNNING: FAILED for the
    child named in `status_of`, KILLED for the rest (a force-cancelled worker cannot end its own
    run). Returns the ended run ids; running the stage again resumes them from their last.pt."""
    import ray

    for ref in pending:
        ray.cancel(ref, force=True)
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=10)
    client = tracking.client()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    ended = []
    for run in client.search_runs([experiment_id], max_results=1000, filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'")):
        tracking.end_run(run.info.run_id, status_of.get(run.info.run_name, "KILLED"))
        ended.append(run.info.run_id)
    return ended
