"""Where a stage comes from: its parent run, checked before anything is read or trained; the
weights it starts from; the data those weights descend from; and, for retrain after autotune,
the values the parent's study chose."""
from __future__ import annotations

from dataclasses import dataclass

from . import checkpoints, models, tracking
from .config import Config, parse_value
from .errors import ConfigError, LineageError


def check_lineage(cfg: Config) -> None:
    """A stage that starts from a parent's checkpoint needs a parent: never fall back to scratch."""
    if cfg.init == "parent" and not cfg.parent_run_id:
        raise ConfigError(f"stage {cfg.stage} starts from a parent run's checkpoint (init=parent) but "
                          f"no parent_run_id was given: pass -P parent_run_id=<run id>, or "
                          f"-P init=scratch to train from fresh weights")


@dataclass
class Lineage:
    """Where a stage comes from: its parent run (for the record) and its initial weights."""
    parent_run_id: str = ""
    parent_arch: str = ""
    parent_winner: str = ""
    init_state: dict | None = None
    parent_data: str = ""           # the data the parent's weights descend from (its lineage_digest)

    @property
    def source(self) -> str:
        """The run a child's weights come from: the parent when it starts from its weights."""
        return self.parent_run_id if self.init_state is not None else "scratch"

    def data_of(self, digest: str) -> str:
        """The data a stage's weights descend from, on data `digest`: that digest, or "mixed" when
        they grow out of a parent's weights trained on other data (which may hold this run's
        held-out images: registry.incomparable never judges such a model)."""
        return digest if self.init_state is None or self.parent_data == digest else "mixed"


def resolve_lineage(cfg: Config) -> Lineage:
    """Check the parent before any data is read or any training starts."""
    check_lineage(cfg)
    if not cfg.parent_run_id:
        return Lineage()
    run = checkpoints.check_parent(cfg.parent_run_id)
    tags = run.data.tags
    lineage = Lineage(cfg.parent_run_id, tags.get("arch", ""), tags.get("winner", ""),
                      parent_data=tracking.descends_from(tags))
    if cfg.init in ("parent", "auto"):
        lineage.init_state = checkpoints.parent_state(cfg.parent_run_id)
        arch = cfg.arch or lineage.parent_arch or models.guess_arch(lineage.init_state) or "resnet"
        models.load_state(models.build(arch), lineage.init_state, arch,
                          f"{cfg.parent_run_id}/{checkpoints.BEST}")
    return lineage


def stage_arch(cfg: Config, lineage: Lineage) -> str:
    return cfg.arch or lineage.parent_winner or lineage.parent_arch or "resnet"


TUNED = ("lr", "gamma", "wd", "bs")  # what an autotune run hands on (its tags best_lr, ...)


def tuned_by_parent(cfg: Config, given: frozenset = frozenset()) -> tuple[Config, dict[str, str]]:
    """retrain's phase-2 lr, gamma, wd and bs come from its parent's best values when the parent
    is an autotune run (a value given with -P wins). Returns the config retrain trains and logs
    with, and where each value came from; resolved before anything is logged, so the run's params
    are the values it used."""
    if cfg.stage != "retrain" or not cfg.parent_run_id:
        return cfg, {}
    parent = tracking.get_run(cfg.parent_run_id)
    if parent.data.tags.get("stage") != "autotune":
        return cfg, {}
    tuned_under = parent.data.params.get("lr_schedule", "constant")
    if "lr" not in given and tuned_under != cfg.lr_schedule:  # its best lr means another rate under another schedule
        raise LineageError(
            f"parent autotune run {cfg.parent_run_id} tuned lr with lr_schedule={tuned_under}, and {cfg.stage} "
            f"would train it with lr_schedule={cfg.lr_schedule}: pass -P lr_schedule={tuned_under} or -P lr=<value> "
            f"(under main, which passes neither on: set lr_schedule: {tuned_under} in params/{cfg.stage}.yaml)")
    changes, sources = {}, {}
    for name in TUNED:
        if name in given:
            sources[name] = "-P"
            continue
        raw = parent.data.tags.get(f"best_{name}")
        if raw is None:
            raise LineageError(
                f"parent autotune run {cfg.parent_run_id} has no tag best_{name}: it never finished its "
                f"study; run autotune again, or pass -P {name}=<value>")
        changes[name] = parse_value(name, raw)
        sources[name] = f"autotune:{cfg.parent_run_id}"
    return cfg.replace(**changes), sources
