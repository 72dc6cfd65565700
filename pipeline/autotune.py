"""The autotune stage: an Optuna study over lr, gamma, wd and bs, each trial a nested child run.

This process (the driver) asks Optuna for trials (TPE, seeded, constant_liar), hands them to
executor.stream, which starts a new one as soon as a slot frees, and tells Optuna how each ended.
Pruning happens where a child trains: its epoch hook, built there by a picklable make_hook, reports
the epoch's selection accuracy to the trial and ends the child when Optuna's pruner says so; the
child still ends FINISHED with the epochs it ran. It is asked before the epoch's last.pt is
written, so a child resumed after the prune (its process died before FINISHED) trains no more.

The study lives in Optuna storage under a name derived from the stage's parameters, parent and data
(not n_trials), so the same command run again continues it: finished trials are kept, and the study
stops at n_trials finished trials in all. Liveness is Optuna's: the driver beats the storage's
heartbeat for each trial in flight, and a trial whose driver died goes stale and is retried with the
same values (fail_stale_trials, RetryHeartbeatStaleTrialCallback); its child resumes from last.pt.
Ray retries a worker that dies within a command. What Optuna cannot see comes from MLflow: a child
KILLED by a stopped command (queued again, no retry counted), FAILED by its stage (its worker died
for good: retried at once), or FINISHED before its trial was told (recorded from its run).

Where a trial starts (trials_from): the stage's start, or the best complete trial so far, so the
study compounds depth as the seed's chain does (like the exploit step of population-based
training). With `best`, a later trial's figures owe something to the depth it inherited: the
pruner and TPE compare it with trials that started shallower, and the stage's best values
describe the last leg of its path. On Ray the start depends on which trials finished first.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before Optuna's matplotlib plots import pyplot
import mlflow  # noqa: E402
import optuna  # noqa: E402
from optuna.storages import RetryHeartbeatStaleTrialCallback  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from . import config as config_mod  # noqa: E402
from . import checkpoints, executor, interrupts, keys, runner, tracking  # noqa: E402
from .aggregate import finish, first_holding_weights  # noqa: E402
from .config import Config  # noqa: E402
from .errors import ConfigError, LineageError  # noqa: E402
from .executor import ChildSpec  # noqa: E402
from .lineage import Lineage, stage_arch  # noqa: E402
from .runner import RunResult, Stage, log  # noqa: E402
from .urls import redacted  # noqa: E402
from .tuning import (GRACE_PERIOD_S, Heartbeats, SearchSpace, TrialRef, build_pruner, epoch_hook,  # noqa: E402
                     experiment_scope, open_storage, sampler, selection_value, short, storage_url,
                     study_name, trial_name)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A queued-again trial's system attribute: how many of its intermediate values (epochs) it was
# given by the attempt before it, which trained them.
INHERITED = "inherited_epochs"


# -- the driver ------------------------------------------------------------------------------------

def parallel_trials(cfg: Config) -> int:
    """Trials in flight at once: 1 locally; with Ray, as many as its CPUs (and GPUs) run at once."""
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


class StartGone(LineageError):
    """The trial run a trial started from (trials_from=best) lost its best.pt."""


class Tuner:
    """One stage run's session with the study."""

    def __init__(self, cfg: Config, stage: Stage, dataset, lineage: Lineage):
        self.cfg, self.stage, self.run_id, self.dataset = cfg, stage, stage.run_id, dataset
        self.space = SearchSpace.from_config(cfg)
        self.arch = stage_arch(cfg, lineage)
        self.init_state = lineage.init_state
        self.source = lineage.source
        self.start_weights: dict[str, dict] = {}  # trials_from=best: start run -> its best.pt, read once
        self.url = storage_url(cfg, mlflow.get_tracking_uri())
        client = tracking.client()
        experiment = client.get_experiment(client.get_run(self.run_id).info.experiment_id)
        self.name = study_name(cfg, dataset.digest, stage.runtime, experiment_scope(experiment))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retries, inherit_intermediate_values=True)
            self.storage = open_storage(self.url, on_stale=self.on_stale)
        self.study = optuna.create_study(
            study_name=self.name, storage=self.storage, direction="maximize", load_if_exists=True,
            pruner=build_pruner(cfg.pruner, cfg.startup_trials, cfg.prune_warmup_epochs, cfg.trial_epochs))
        # seeded, and offset by the trials already there: a continued study draws new points, not
        # the first run's again
        earlier = len(self.study.get_trials(deepcopy=False))
        self.study.sampler = sampler(self.cfg.seed + earlier, cfg.startup_trials)
        if cfg.start_from_seed and not earlier:
            self.enqueue_seed_point()

    def enqueue_seed_point(self) -> None:
        """Trial 0 is what the seed already knows: its chain's final point (overfit's lr, gamma,
        wd and bs at this scale), so the study starts from it rather than from chance."""
        chain = config_mod.load("overfit", {"scale": self.cfg.scale})
        point = {"lr": chain.lr, "gamma": chain.gamma, "wd": (chain.wds or [chain.wd])[0],
                 "bs": (chain.bss or [chain.bs])[0]}
        described = " ".join(f"{k}={short(v)}" for k, v in point.items())
        draw = self.space.draw_of(point)
        if draw is None:
            log(f"autotune: no draw of the search space trains as the seed's point ({described}): not enqueued")
            return
        self.study.enqueue_trial(draw, user_attrs={"seed_point": True})
        log(f"autotune: trial 0 is the seed's point ({described})")

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
        start, source, tags = self.start_of(trial)
        trial.set_user_attr("child_key", keys.child_key(cfg, self.dataset.digest, self.stage.runtime, name, source))
        ref = TrialRef(self.url, self.name, trial._trial_id, self.cfg.selects_on, self.cfg.pruner,
                       self.cfg.startup_trials, self.cfg.prune_warmup_epochs, self.cfg.trial_epochs)
        return ChildSpec(name, cfg, self.arch, start, {**tags, "trial_number": str(number)}, source,
                         make_hook=functools.partial(epoch_hook, ref))

    def start_of(self, trial) -> tuple[dict | None, str, dict[str, str]]:
        """The weights a trial starts from, the run they come from, and the tags that say so.
        trials_from=parent: the stage's start (its parent's best.pt, or scratch), every trial.
        trials_from=best: the best.pt of the study's best complete trial so far (the stage's start
        while there is none), as each stage of the seed's chain starts from the best of the stage
        before. Fixed when the trial is first asked (user attr start_run_id, which a retry
        inherits), so a retry resumes the same child. If that run has lost its best.pt since, a
        retry whose child is FINISHED or holds a last.pt goes on without it (neither uses the
        start's weights); any other trial is StartGone (tune fails it for good). The weights of
        a start are read once per stage run, and trials from the same start share them."""
        chosen_now = "start_run_id" not in trial.user_attrs  # incumbent() has just seen its best.pt
        if chosen_now:
            trial.set_user_attr("start_run_id", self.incumbent() if self.cfg.trials_from == "best" else "")
        start_id = trial.user_attrs["start_run_id"]
        if not start_id:
            return self.init_state, self.source, {"source_run_id": self.source}
        tags = {"source_run_id": start_id, "init_from": f"{start_id}/{checkpoints.BEST}"}
        if start_id in self.start_weights:
            return self.start_weights[start_id], start_id, tags
        if not chosen_now and (tracking.stored_run(start_id) is None  # deleted since first asked
                               or not tracking.has_artifact(start_id, checkpoints.BEST)):
            child = self.child_of(trial)
            if child is not None and (child.info.status == "FINISHED"
                                      or tracking.has_artifact(child.info.run_id, checkpoints.LAST)):
                return None, start_id, tags  # reused or resumed: the start's weights are not read
            raise StartGone(f"autotune: trial #{self.number(trial.number)} starts from run {start_id}'s "
                            f"{checkpoints.BEST}, which is gone (deleted?)")
        self.start_weights[start_id] = checkpoints.load_weights(start_id)
        return self.start_weights[start_id], start_id, tags

    def incumbent(self) -> str:
        """The child run of the best complete trial so far (the first of equals), or "" if none.
        Pruned trials never are (their value is an unfinished one), nor those whose weights diverged."""
        complete = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get("mlflow_run_id") and not t.user_attrs.get("diverged")]
        return first_holding_weights([(t.user_attrs["mlflow_run_id"], f"autotune: trial #{self.number(t.number)}")
                                      for t in sorted(complete, key=lambda t: (-t.value, t.number))])

    def child_of(self, frozen):
        key = frozen.user_attrs.get("child_key")
        if not key:
            return None
        runs = tracking.client().search_runs(
            [tracking.client().get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.training_key = '{key}'", order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def on_stale(self, study, failed) -> None:
        """A trial failed for its driver: Optuna's heartbeat went stale (the driver died), or
        MLflow says its child was KILLED (its command was stopped) or FAILED (its worker died for
        good). A stopped one is queued again without counting a retry; the others are retried by
        Optuna's retry callback at most max_retries times, then given up (a new trial takes the
        place). Either way with the same values and the epochs its child's last.pt covers. A child
        still RUNNING is ended FAILED by Optuna's verdict: a retry on any node resumes it (no
        writer looks live), and if that driver dies too, the crash counts again."""
        child = self.child_of(failed)
        keep_covered_epochs(failed, child)
        if child is not None and child.info.status == "KILLED":
            requeue(study, failed)
            log(f"autotune: trial #{self.number(failed.number)} was stopped with its command: queued "
                f"again with the same values (no retry counted)")
            return
        trials = len(study.get_trials(deepcopy=False))
        self.retry(study, failed)
        given_up = len(study.get_trials(deepcopy=False)) == trials  # not queued again
        if child is not None and child.info.status == "RUNNING":  # its writer died with its driver
            tracking.end_run(child.info.run_id, "FAILED")  # a crash (not KILLED: a stop, never counted)
        if given_up:
            log(f"autotune: trial #{self.number(failed.number)} was interrupted "
                f"{self.cfg.max_retries + 1} times: given up (FAILED), a new trial takes its place")
            return
        log(f"autotune: trial #{self.number(failed.number)} was interrupted: retried with the same "
            f"values" + (f"; child run {child.info.run_id} resumes from its last.pt" if child else ""))

    def fail(self, frozen):
        """Fail a RUNNING trial; its frozen copy, to queue again."""
        self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
        return copy.deepcopy(self.study.get_trials(deepcopy=False)[frozen.number])

    def retry_interrupted(self) -> int:
        """Trials left RUNNING by earlier commands. What MLflow knows first: a trial whose child
        FINISHED before its trial was told is recorded from that run; one whose command was
        stopped (its child KILLED by the cleanup) is no crash, and is queued again with its values
        whatever its count; one whose child the stage FAILED (its worker died for good) is retried
        as a crash. Then Optuna's heartbeat: a trial whose driver stopped beating is failed by
        fail_stale_trials and retried by on_stale. Returns the trials still live elsewhere (a
        driver beats for them), which are left to it; -P force=true retries those too."""
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            child = self.child_of(frozen)
            status = child.info.status if child is not None else None
            if status == "FINISHED":  # its trial was never told
                self.record(optuna.trial.Trial(self.study, frozen._trial_id),
                            runner.result_from_record(child.info.run_id, self.arch))
                log(f"autotune: trial #{self.number(frozen.number)} had finished (child run {child.info.run_id}): "
                    f"recorded from its run")
            elif status in ("KILLED", "FAILED") or self.cfg.force:  # what Optuna cannot see, or told to
                self.on_stale(self.study, self.fail(frozen))
        optuna.storages.fail_stale_trials(self.study)  # calls on_stale for each trial it fails
        live = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for frozen in live:
            log(f"autotune: trial #{self.number(frozen.number)} is in flight from another driver (its "
                f"Optuna heartbeat is fresh): left to it; -P force=true takes it over")
        return len(live)

    def record(self, trial, result: RunResult) -> None:
        """Tell Optuna how the child ended: COMPLETE with its best selection accuracy (early
        stopping or a diverged loss may have ended it sooner), or PRUNED (with its last reported
        value) when the hook ended it before trial_epochs."""
        history = result.history
        pruned = len(history.epochs) < self.cfg.trial_epochs and not (history.stopped_early or history.diverged)
        reported = self.study.get_trials(deepcopy=False)[trial.number].intermediate_values
        for epoch in history.epochs:  # a reused child reported nothing to this trial
            if epoch.epoch not in reported:
                trial.report(selection_value(epoch, result.selected_on), epoch.epoch)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if history.best_diverged():  # NaN weights: never a start for trials_from=best
            trial.set_user_attr("diverged", True)
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
            child = tracking.stored_run(child_id)
            if child is None or child.info.lifecycle_stage == "deleted":  # the study goes on without it,
                # as without a deleted best.pt (and MLflow refuses to move a deleted run)
                gone = tracking.GONE if child is None else "was deleted: passed over"
                log(f"autotune: trial #{self.number(frozen.number)} ({child_id}) {gone}")
                continue
            parent = child.data.tags.get("mlflow.parentRunId")
            if parent in self.stage.adoptable:
                runner.adopt(child_id, self.run_id)
            results[frozen.number] = runner.result_from_record(child_id, self.arch)
        if results:
            log(f"autotune: study {self.name} already has {len(results)} finished trials: kept")
        return results

    def tune(self) -> RunResult:
        """Asynchronous trials: a new trial is asked for as soon as a slot frees (a pruned trial's
        slot does not wait for the slowest of a batch), until n_trials have finished or are in
        flight. This driver beats Optuna's heartbeat for each trial it has in flight."""
        self.refuse_a_study_past_its_limits()  # before anything changes (force=true takes trials over)
        self.retry_interrupted()  # records a trial whose child finished after its command died: it counts
        self.refuse_a_study_past_its_limits()
        results = self.earlier_results()
        asked = {}  # trial number -> Trial, in flight
        beats = Heartbeats(self.storage)

        def next_trial():
            while (trial := ask()) is not None:
                try:
                    return trial.number, self.spec(trial)
                except StartGone as gone:  # its retries would meet the same: failed for good, the study goes on
                    self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                    beats.stop(asked.pop(trial.number)._trial_id)
                    log(f"{gone}: failed, a new trial takes its place")
            return None

        def ask():
            beats.beat_all()  # ours fresh, whatever a failed beat left, before looking for stale ones
            optuna.storages.fail_stale_trials(self.study)  # as study.optimize does before each trial
            done = self.study.get_trials(deepcopy=False, states=FINISHED)
            running = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if len(done) + running >= self.cfg.n_trials:  # running: ours, and those other drivers beat for
                return None
            if self.budget_spent(running):
                return None
            with interrupts.critical():  # no trial without its heartbeat, which lets it go stale
                trial = self.study.ask()
                beats.start(trial._trial_id)
                asked[trial.number] = trial
            return trial

        def finished(number: int, result: RunResult) -> None:
            trial = asked.pop(number)
            beats.stop(trial._trial_id)
            if self.study.get_trials(deepcopy=False)[number].state != TrialState.RUNNING:
                log(f"autotune: trial #{self.number(number)} was failed as stale by another driver meanwhile: "
                    f"its retry records it")
                return
            self.record(trial, result)
            results[number] = result

        try:
            executor.stream(self.cfg, self.stage, self.dataset, next_trial, finished, parallel_trials(self.cfg))
        except BaseException:
            with interrupts.critical(), contextlib.suppress(Exception):  # the error raised is the one to report
                self.queue_again_unstarted(asked)
            raise
        finally:
            beats.close()  # a stopped command's trials go quiet: its children are KILLED, or go stale
        return self.conclude(results)

    def queue_again_unstarted(self, asked: dict) -> None:
        """Trials this driver asked for and stopped before their child run existed: queued again
        with their values (no retry counted, as for a stopped child), so the same command run at
        once does not wait on them as another driver's."""
        for number in sorted(asked):
            frozen = self.study.get_trials(deepcopy=False)[number]
            if frozen.state == TrialState.RUNNING and self.child_of(frozen) is None:
                requeue(self.study, self.fail(frozen))
                log(f"autotune: trial #{self.number(number)} was stopped before it started: queued again")

    def refuse_a_study_past_its_limits(self) -> None:
        """A study continued with a lower n_trials or epoch_budget than it already spent would pick
        its best from all it has, under this run's smaller figures (which main would reuse as such)."""
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        if done > self.cfg.n_trials:
            raise ConfigError(f"study {self.name} already has {done} finished trials, more than -P n_trials="
                              f"{self.cfg.n_trials}: pass -P n_trials={done} or more to continue it, or another "
                              f"-P optuna_storage for a new study")
        trained = epochs_trained(trials)
        if self.cfg.epoch_budget and trained > self.cfg.epoch_budget:
            raise ConfigError(f"study {self.name} already trained {trained} epochs, more than -P epoch_budget="
                              f"{self.cfg.epoch_budget}: pass -P epoch_budget={trained} or more (or 0) to continue "
                              f"it, or another -P optuna_storage for a new study")

    def budget_spent(self, running: int) -> bool:
        """Whether one more whole trial would pass epoch_budget: the epochs the study's trials
        trained (epochs_trained) and a whole trial for each of the `running` ones."""
        committed = epochs_trained(self.study.get_trials(deepcopy=False)) + running * self.cfg.trial_epochs
        return bool(self.cfg.epoch_budget) and committed + self.cfg.trial_epochs > self.cfg.epoch_budget

    def conclude(self, results: dict[int, RunResult]) -> RunResult:
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        live = sum(state == TrialState.RUNNING for state in states.values())  # ours have all ended
        if live and results:  # a choice without them, keyed as the whole study, which main would reuse
            raise LineageError(
                f"study {self.name} has {live} trials in flight from another driver, which this run would choose "
                f"without: wait for that driver and run again (its {len(results)} finished trials are kept), or, "
                f"if it is gone, run again after Optuna's {GRACE_PERIOD_S} s grace period or with -P force=true")
        if not results:  # nothing to choose from: say why, not that checkpoints were deleted
            if live:
                raise LineageError(
                    f"no trial of study {self.name} has finished here: {live} in flight from another driver; "
                    f"wait for that driver and run again, or, if it is gone, run again after Optuna's "
                    f"{GRACE_PERIOD_S} s grace period or with -P force=true")
            done = self.study.get_trials(deepcopy=False, states=FINISHED)  # earlier_results passed them over
            gone = sum(bool(t.user_attrs.get("mlflow_run_id")) for t in done)
            limits = [name for name, reached in (("-P n_trials", len(done) >= self.cfg.n_trials),
                                                 ("-P epoch_budget", self.budget_spent(0))) if reached]
            limits = limits or ["-P n_trials"]
            raise LineageError(
                f"no trial of study {self.name} is left to choose from ({gone} finished, their runs gone from the "
                f"store; {sum(state == TrialState.FAIL for state in states.values())} failed): raise "
                f"{' and '.join(limits)}, so that new trials train new children, or pass another -P optuna_storage")
        ordered = [results[n] for n in sorted(results)]
        complete = [results[n] for n in sorted(results) if states[n] == TrialState.COMPLETE]
        # a study's finished trials are never asked again: more trials are what train new children
        best = finish(self.run_id, ordered, candidates=complete or ordered,
                      remedy="raise -P n_trials, whose new trials train children that hold one")
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


def keep_covered_epochs(failed, child) -> None:
    """A failed trial, before it is queued again, keeps only the epochs its child's last.pt covers
    (those its run logged): the rest are trained again. Its copy counts them as inherited."""
    covered = tracking.logged_steps(child.info.run_id, "test_acc") if child is not None else set()
    failed.intermediate_values = {step: value for step, value in failed.intermediate_values.items()
                                  if step in covered}
    failed.system_attrs[INHERITED] = len(failed.intermediate_values)


def epochs_trained(trials) -> int:
    """The epochs a study's trials trained, every attempt's own: the epochs each finished or failed
    trial reported, less those it inherited. Pruned trials count, and so do a crashed attempt's
    epochs that its retry trains again, and those of a trial given up after its retries."""
    return sum(len(t.intermediate_values) - t.system_attrs.get(INHERITED, 0)
               for t in trials if t.state in (*FINISHED, TrialState.FAIL))


def requeue(study, stopped) -> None:
    """Queue a stopped trial again as Optuna's retry callback does (same values, the intermediate
    values given, and `failed_trial` naming the first attempt), leaving its retry history as it
    is: only a worker or process that died counts against max_retries."""
    system_attrs = {"failed_trial": stopped.number, "retry_history": [], **stopped.system_attrs}
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=stopped.params, distributions=stopped.distributions,
        user_attrs=stopped.user_attrs, system_attrs=system_attrs,
        intermediate_values=stopped.intermediate_values))


def log_plots(study, run_id: str) -> None:
    """The study as pictures (Optuna's matplotlib views) and as a table, under plots/: the
    optimisation history, the pruning curves, the parameters against the result (parallel
    coordinates), their importances (needs two complete trials), and trials.csv."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    plots = {"optuna_history.png": views.plot_optimization_history,
             "optuna_intermediate_values.png": views.plot_intermediate_values,
             "optuna_parallel_coordinate.png": views.plot_parallel_coordinate}
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        plots["optuna_param_importances.png"] = views.plot_param_importances
    else:
        log("autotune: fewer than 2 complete trials: no parameter-importance plot")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib's and Optuna's asides on flat data
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
        tracking.client().log_artifact(run_id, str(trials_csv(study, Path(tmp) / "trials.csv")), "plots")


TRIALS_COLUMNS = ("number", "state", "value", "lr", "gamma", "wd", "bs", "epochs", "mlflow_run_id", "start_run_id")


def trials_csv(study, path: Path) -> Path:
    """One row a trial, as Optuna holds it: its number, state, value, the values it drew (wd as
    drawn), the epochs it reported, its child run, and the trial run it started from ("": the
    stage's own start)."""
    import csv

    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(TRIALS_COLUMNS)
        for trial in study.get_trials(deepcopy=False):
            writer.writerow([trial.number, trial.state.name, "" if trial.value is None else trial.value,
                             *(trial.params.get(name, "") for name in ("lr", "gamma", "wd", "bs")),
                             len(trial.intermediate_values), trial.user_attrs.get("mlflow_run_id", ""),
                             trial.user_attrs.get("start_run_id", "")])
    return path


def run(cfg: Config, stage: Stage, dataset, lineage: Lineage) -> RunResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's, the retry's
        # the driver beats for the trials it asked itself (Heartbeats), as study.optimize would
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        return Tuner(cfg, stage, dataset, lineage).tune()
