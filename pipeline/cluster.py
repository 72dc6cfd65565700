"""The Ray cluster children may train on: joining or starting it, what it can place, and the rule
that every store children write (MLflow's, Optuna's) is one all its nodes reach. With executor,
the only modules that import ray."""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Callable
from urllib.parse import urlparse

from . import interrupts
from .config import Config
from .errors import ConfigError, first_line
from .runner import log
from .urls import redacted, this_machine_only

# MLflow tracking settings a worker on another machine needs (it does not share our environment)
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_ALLOW_PICKLE_DESERIALIZATION")  # the driver's (pipeline/__init__.py): workers elsewhere too


def tracking_uri() -> str:
    """The tracking URI as every process can use it: a relative SQLite path made absolute."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix):])
    return uri


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
    on another host (known without connecting), or else, once connected (whatever the address),
    nodes the cluster has elsewhere."""
    if cfg.executor != "ray":
        return ""
    address = cfg.ray_address
    if address not in ("", "auto", "local"):
        host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
        if not is_local_host(host):
            return f"ray_address={address} (another machine)"
    import ray

    connect(cfg)
    remote = sorted({n["NodeManagerAddress"] for n in ray.nodes()
                     if n["Alive"] and not is_local_host(n["NodeManagerAddress"])})
    return f"nodes on other machines ({', '.join(remote[:3])})" if remote else ""


def is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def require_shared_store(cfg: Config, store: str, uri: str, shared: bool, needs: str, fix: str) -> None:
    """The one rule for every store children write (MLflow's, Optuna's): a store on this machine
    (SQLite, a local folder), or a server only this machine reaches (127.0.0.1, a unix socket:
    urls.this_machine_only), serves children on this machine only."""
    if shared and not this_machine_only(uri):
        return
    where = beyond_this_machine(cfg)
    if where:
        raise ConfigError(f"executor=ray with {where} needs {needs} that every node reaches, but {store} "
                          f"is {redacted(uri)}: {fix} (README: Scaling out with Ray)")


def check_tracking(cfg: Config) -> None:
    """Children on other machines need an http(s) tracking URI: an explicit ray_address elsewhere
    is refused before connecting, `auto` (or a local address) once its nodes are known."""
    uri = tracking_uri()
    require_shared_store(cfg, "the tracking URI", uri, is_server(uri), "a tracking server",
                         "start `mlflow server --host 0.0.0.0` and set MLFLOW_TRACKING_URI=http://<host>:5000, "
                         "<host> an address every node reaches (not localhost; a DNS name also needs the "
                         "server's --allowed-hosts)")


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
    """Join cfg.ray_address, or start a private local Ray ("" or "local") that this process stops
    when it exits: address="local" never joins RAY_ADDRESS or another cluster on this machine.
    The driver stays this process; Ray's own processes never see MLFLOW_RUN_ID (mlflow#15713)."""
    import ray

    if ray.is_initialized():
        return
    check_reachable(cfg.ray_address)
    held = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        with interrupts.critical():  # a Ray started halfway is not stopped cleanly: Ctrl-C waits
            if cfg.ray_address in ("", "local"):
                ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=cfg.ray_address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"could not reach Ray at ray_address={cfg.ray_address}: "
                          f"{first_line(err, 200)}; start it with `ray start --head` or "
                          f"leave ray_address empty for a local Ray") from None
    finally:
        if held is not None:
            os.environ["MLFLOW_RUN_ID"] = held
    interrupts.install()  # Ray's core worker puts its own SIGINT handler in: ours marks runs KILLED
    RAY.clear()  # refs from an earlier connection are gone with it
    log(f"ray: {'joined ' + cfg.ray_address if cfg.ray_address not in ('', 'local') else 'started a local Ray'}, "
        f"{len([n for n in ray.nodes() if n['Alive']])} node(s), resources {ray.cluster_resources()}")


def check_reachable(address: str) -> None:
    """A GCS address (host:port) where nothing listens is refused at once: ray.init retries it 20
    times at about 45 s each before it gives up."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:  # "", local, auto, ray://: Ray's own checks
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"could not reach Ray at ray_address={address}: nothing answers there "
                          f"({type(err).__name__}); start it with `ray start --head` or leave ray_address "
                          f"empty for a local Ray") from None


def placement_problem(nodes: list[dict], cpus_per_trial: float, gpus_per_trial: float) -> str:
    """Why a child needing these resources fits none of the live `nodes` (ray.nodes()), or ''. One
    node must hold both: CPUs on one and a GPU on another place nothing."""
    sizes = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes]
    if any(cpus >= cpus_per_trial and gpus >= gpus_per_trial for cpus, gpus in sizes):
        return ""
    found = "; ".join(f"{cpus:g} CPUs {gpus:g} GPUs" for cpus, gpus in sorted(set(sizes), reverse=True))
    return (f"cpus_per_trial={cpus_per_trial:g} gpus_per_trial={gpus_per_trial:g} fits no Ray node "
            f"(its nodes: {found}): lower them")


def check_cluster(cfg: Config) -> None:
    """What the cluster (joined, or started here) can place: nodes beyond this machine need a
    server; a child that fits no node would wait forever; a GPU left unused for CPU-only children
    is almost surely a mistake."""
    import ray

    check_tracking(cfg)  # before connecting: an explicit address elsewhere is refused at once
    connect(cfg)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    problem = placement_problem(nodes, cfg.cpus_per_trial, cfg.gpus_per_trial)
    if problem:
        raise ConfigError(problem)
    if any(n["Resources"].get("GPU", 0) for n in nodes) and not cfg.gpus_per_trial and cfg.device != "cpu":
        raise ConfigError("the Ray cluster has GPUs but gpus_per_trial=0 would train every child on CPU: "
                          "set -P gpus_per_trial=0.25 (four children a GPU), or -P device=cpu")


def shared(value, key: str):
    """Put `value` in Ray's object store once per process (the decoded data): tasks on any node
    read it from there, none re-reads a .mat file."""
    import ray

    if key not in RAY:
        RAY[key] = ray.put(value)
    return RAY[key]
