"""The autotune stage: an Optuna study over lr, gamma, wd and bs, each trial a nested child run.

This process (the driver) asks Optuna for trials (TPE, seeded), hands them to executor.run_children
like any sweep, and tells Optuna how each ended. Pruning happens where a child trains: its epoch
hook, built there by a picklable make_hook, reports the epoch's selection accuracy to the trial and
ends the child when Optuna's pruner says so; the child still ends FINISHED with the epochs it ran.

The study lives in Optuna storage under a name derived from the stage's parameters, parent and data
(not n_trials), so the same command run again continues it: finished trials are kept, a trial
whose child run died is retried with the same values (RetryHeartbeatStaleTrialCallback) and its
child resumes from last.pt, and the study stops at n_trials finished trials in all.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before Optuna's matplotlib plots import pyplot
import mlflow  # noqa: E402
import optuna  # noqa: E402
from optuna.storages import RetryHeartbeatStaleTrialCallback  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from . import executor, lifecycle, runner, stages, tracking  # noqa: E402
from .config import Config, ConfigError  # noqa: E402
from .executor import ChildSpec  # noqa: E402
from .runner import RunResult, log  # noqa: E402

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
    def from_config(cls, cfg: Config) -> "SearchSpace":
        missing = [name for name in ("lr_range", "gamma_range", "wd_range", "bss") if not getattr(cfg, name)]
        if missing:
            raise ConfigError(f"autotune needs a search space: {', '.join(missing)} empty; set them in "
                              f"params/autotune.yaml or with -P (e.g. -P lr_range=1e-5,2e-3 -P bss=64,128)")
        return cls(tuple(cfg.lr_range), tuple(cfg.gamma_range), tuple(cfg.wd_range), cfg.wd_zero_below,
                   tuple(cfg.bss))

    def suggest(self, trial) -> dict:
        """The trial's values as trained (wd already 0 below the floor)."""
        trial.suggest_float("lr", *self.lr, log=True)
        trial.suggest_float("gamma", *self.gamma)
        trial.suggest_float("wd", *self.wd, log=True)
        trial.suggest_categorical("bs", list(self.bs))
        return self.values(trial.params)

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

def default_storage(tracking_uri: str) -> str:
    """SQLite beside a SQLite tracking store (mlflow.db -> mlflow.optuna.db), else ./optuna.db.
    Never the MLflow database itself: both keep their schema version in an alembic_version table."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
        return f"sqlite:///{path.with_name(path.stem + '.optuna.db')}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def storage_url(cfg: Config, tracking_uri: str) -> str:
    url = cfg.optuna_storage or default_storage(tracking_uri)
    if url == tracking_uri:
        raise ConfigError(f"optuna_storage={url} is the MLflow tracking database: Optuna needs its own "
                          f"(both keep an alembic_version table); pass another, or leave it empty")
    # children report to the study from where they train: the MLflow store's rule, one function
    executor.require_shared_store(cfg, "optuna_storage", redacted(url), not url.startswith("sqlite"),
                                  "an Optuna database server",
                                  "pass -P optuna_storage=postgresql://user@host/db (or mysql+pymysql://...)")
    return url


def redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    # several processes write one SQLite file (Ray workers): wait for its lock instead of failing
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def study_name(cfg: Config, data_digest: str) -> str:
    """From the stage's study key (its training key without n_trials): more trials continue the
    same study, and the same stage runs (tag stage_key)."""
    key = cfg.study_key(data_digest)
    return f"autotune-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


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

    def hook(result) -> bool:
        trial.report(selection_value(result, ref.selects_on), result.epoch)
        # after its last epoch a trial is over anyway: it completes, whatever the pruner thinks
        return result.epoch < ref.trial_epochs and bool(trial.should_prune())

    return hook


def selection_value(epoch, selects_on: str) -> float:
    return epoch.val_acc if selects_on == "val" else epoch.test_acc


# -- the driver ------------------------------------------------------------------------------------

def parallel_trials(cfg: Config) -> int:
    """Trials asked at once: 1 locally; with Ray, as many as its CPUs (and GPUs) run at once."""
    if cfg.trial_batch:
        return cfg.trial_batch
    if cfg.executor != "ray":
        return 1
    import ray

    if ray.is_initialized():
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
    else:  # the executor starts Ray with the first batch; this machine until then
        import torch

        cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    slots = cpus / cfg.cpus_per_trial
    if cfg.gpus_per_trial:
        slots = min(slots, gpus / cfg.gpus_per_trial)
    return max(1, int(slots))


class Tuner:
    """One stage run's session with the study."""

    def __init__(self, cfg: Config, run_id: str, dataset, lineage: stages.Lineage):
        self.cfg, self.run_id, self.dataset = cfg, run_id, dataset
        self.space = SearchSpace.from_config(cfg)
        self.arch = stages.stage_arch(cfg, lineage)
        self.init_state = lineage.init_state
        self.source = lineage.source
        self.url = storage_url(cfg, mlflow.get_tracking_uri())
        self.name = study_name(cfg, dataset.digest)
        self.study = optuna.create_study(
            study_name=self.name, storage=open_storage(self.url), direction="maximize", load_if_exists=True,
            pruner=build_pruner(cfg.pruner, cfg.startup_trials, cfg.prune_warmup_epochs, cfg.trial_epochs))
        # seeded, and offset by the trials already there: a continued study draws new points, not
        # the first run's again; constant_liar keeps a batch asked at once apart
        self.study.sampler = optuna.samplers.TPESampler(
            seed=self.cfg.seed + len(self.study.get_trials(deepcopy=False)), constant_liar=True,
            n_startup_trials=cfg.startup_trials)

    # a trial's number in its child's name: a retried trial keeps the number it was first asked as
    def number(self, trial_number: int) -> int:
        frozen = self.study.get_trials(deepcopy=False)[trial_number]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            first = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        return trial_number if first is None else first

    def spec(self, trial) -> ChildSpec:
        values = self.space.suggest(trial)
        number = self.number(trial.number)
        name = trial_name(number, values)
        cfg = self.cfg.replace(arch=self.arch, epochs=self.cfg.trial_epochs, **values)
        trial.set_user_attr("child_key", lifecycle.child_key(cfg, self.dataset.digest, name, self.source))
        ref = TrialRef(self.url, self.name, trial._trial_id, self.cfg.selects_on, self.cfg.pruner,
                       self.cfg.startup_trials, self.cfg.prune_warmup_epochs, self.cfg.trial_epochs)
        return ChildSpec(name, cfg, self.arch, self.init_state,
                         {"source_run_id": self.source, "trial_number": str(number)}, self.source,
                         make_hook=functools.partial(epoch_hook, ref))

    def child_of(self, frozen):
        key = frozen.user_attrs.get("child_key")
        if not key:
            return None
        runs = tracking.client().search_runs(
            [tracking.client().get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.training_key = '{key}'", order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def retry_interrupted(self) -> int:
        """Trials left RUNNING by a process that died: failed and queued again with the same values
        and the epochs they reported (Optuna's retry callback), at most max_retries times each (a
        trial that always kills its process is given up, its child run FAILED, and the study asks
        a new one). Returns those still live elsewhere."""
        live = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=self.cfg.max_retries,
                                                     inherit_intermediate_values=True)
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            child = self.child_of(frozen)
            if child is not None and lifecycle.live_writer(child) and not self.cfg.force:
                live += 1
                log(f"autotune: trial {frozen.number} is training in another process "
                    f"(child run {child.info.run_id}): left to it")
                continue
            self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
            trials = len(self.study.get_trials(deepcopy=False))
            failed = copy.deepcopy(self.study.get_trials(deepcopy=False)[frozen.number])
            # only the epochs its last.pt covers (those its run logged): the rest are trained again
            covered = tracking.logged_steps(child.info.run_id, "test_acc") if child is not None else set()
            failed.intermediate_values = {step: value for step, value in failed.intermediate_values.items()
                                          if step in covered}
            retry(self.study, failed)
            if len(self.study.get_trials(deepcopy=False)) == trials:  # not queued again: given up
                if child is not None and child.info.status == "RUNNING":
                    tracking.end_run(child.info.run_id, "FAILED")
                log(f"autotune: trial #{self.number(frozen.number)} was interrupted "
                    f"{self.cfg.max_retries + 1} times: given up (FAILED), a new trial takes its place")
                continue
            log(f"autotune: trial #{self.number(frozen.number)} was interrupted: retried with the same "
                f"values" + (f"; child run {child.info.run_id} resumes from its last.pt" if child else ""))
        return live

    def record(self, trial, result: RunResult) -> None:
        """Tell Optuna how the child ended: COMPLETE with its best selection accuracy, or PRUNED
        (with its last reported value) when the hook ended it before trial_epochs."""
        history = result.history
        pruned = len(history.epochs) < self.cfg.trial_epochs and not history.stopped_early
        reported = self.study.get_trials(deepcopy=False)[trial.number].intermediate_values
        for epoch in history.epochs:  # a reused child reported nothing to this trial
            if epoch.epoch not in reported:
                trial.report(selection_value(epoch, result.selected_on), epoch.epoch)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        tracking.client().set_tag(result.run_id, "pruned", str(pruned).lower())
        if pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, result.best_acc)

    def earlier_results(self) -> dict[int, RunResult]:
        """Trials finished by earlier runs of the study, from what MLflow recorded; a child of an
        unfinished earlier run of this stage moves under this run, as any continued child does."""
        results = {}
        for frozen in self.study.get_trials(deepcopy=False, states=FINISHED):
            child_id = frozen.user_attrs.get("mlflow_run_id")
            if not child_id:
                continue
            parent = tracking.client().get_run(child_id).data.tags.get("mlflow.parentRunId")
            if parent in lifecycle.ADOPTABLE:
                runner.adopt(child_id, self.run_id)
            results[frozen.number] = runner.result_from_record(child_id, self.arch)
        if results:
            log(f"autotune: study {self.name} already has {len(results)} finished trials: kept")
        return results

    def tune(self) -> RunResult:
        live = self.retry_interrupted()
        results = self.earlier_results()
        while True:
            done = len(self.study.get_trials(deepcopy=False, states=FINISHED)) + live
            if done >= self.cfg.n_trials:
                break
            trials = [self.study.ask() for _ in range(min(self.cfg.n_trials - done, parallel_trials(self.cfg)))]
            specs = [self.spec(trial) for trial in trials]
            for trial, result in zip(trials, executor.run_children(self.cfg, self.run_id, specs, self.dataset)):
                self.record(trial, result)
                results[trial.number] = result
        return self.conclude(results)

    def conclude(self, results: dict[int, RunResult]) -> RunResult:
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        ordered = [results[n] for n in sorted(results)]
        complete = [results[n] for n in sorted(results) if states[n] == TrialState.COMPLETE]
        best = stages.finish(self.run_id, ordered, candidates=complete or ordered)
        number = next(n for n in sorted(results) if results[n].run_id == best.run_id)
        values = self.space.values(self.study.get_trials(deepcopy=False)[number].params)
        pruned = sum(states[n] == TrialState.PRUNED for n in results)
        tags = {f"best_{k}": repr(v) if isinstance(v, float) else str(v) for k, v in values.items()}
        tags.update(best_trial_number=str(self.number(number)), optuna_study=self.name,
                    optuna_storage=redacted(self.url), trials_complete=str(len(complete)),
                    trials_pruned=str(pruned))
        tracking.set_tags(self.run_id, tags)
        log_plots(self.study, self.run_id)
        log(f"autotune: best trial #{self.number(number)}: " + " ".join(f"{k}={short(v)}" for k, v in values.items())
            + f" ({len(complete)} complete, {pruned} pruned)")
        return best


def log_plots(study, run_id: str) -> None:
    """Optuna's optimisation history, pruning curves and parameter importances (the last needs
    two complete trials)."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    plots = {"optuna_history.png": views.plot_optimization_history,
             "optuna_intermediate_values.png": views.plot_intermediate_values}
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        plots["optuna_param_importances.png"] = views.plot_param_importances
    else:
        log("autotune: fewer than 2 complete trials: no parameter-importance plot")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for file_name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. every complete trial scored the same
                log(f"autotune: no {file_name}: {err}")
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            path = Path(tmp) / file_name
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            tracking.client().log_artifact(run_id, str(path), "plots")


def run(cfg: Config, run_id: str, dataset, lineage) -> RunResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the retry callback's
        return Tuner(cfg, run_id, dataset, lineage).tune()
