"""Where a stage's children train: one after another in this process (executor=local), or each
as a Ray task on a local Ray or a cluster (executor=ray). Either way every child is trained by
runner.child_run, so the MLflow record is the same; the stage then aggregates as usual.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import data as data_mod
from .config import Config
from .runner import RunResult, child_run


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
                progress: Callable | None = None) -> RunResult:
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


def run_on_ray(cfg: Config, parent_run_id: str, specs: list[ChildSpec],
               dataset: data_mod.SVHNData) -> list[RunResult]:
    raise NotImplementedError("executor=ray is being built")
