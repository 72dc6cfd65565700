"""The one training loop (the seed's fit_test), free of MLflow so it can be tested alone.

Differences from the seed, each on purpose: early stopping really stops (the seed compares a
bool to the string "True"); epoch 1's weights count as a best (the seed never saves them); losses
are the mean per sample (the seed reports x100, and `tol` keeps the seed's x100 scale).
With a validation split, early stopping and the best checkpoint follow validation, not test.
"""
from __future__ import annotations

import contextlib
import math
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from .rng import rng_state, set_rng_state



@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_loss: float
    train_acc: float
    test_acc: float
    epoch_time_s: float
    train_images_per_s: float
    val_loss: float | None = None   # only with a validation split
    val_acc: float | None = None
    lr: float | None = None         # only with an lr schedule: the epoch's learning rate

    def metrics(self) -> dict[str, float]:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        values.pop("epoch")
        return values

    def diverged(self) -> bool:
        """A loss that is not finite: the weights have blown up (NaN logits argmax to digit 0,
        so this epoch's accuracies mean nothing)."""
        losses = (self.train_loss, self.test_loss, self.val_loss)
        return not all(math.isfinite(loss) for loss in losses if loss is not None)


@dataclass
class History:
    epochs: list[EpochResult] = field(default_factory=list)
    selected_on: str = "test"       # the split whose accuracy picks the best epoch: val or test
    best_acc: float = -1.0          # that split's accuracy at the best epoch
    best_epoch: int = 0
    test_acc_at_best: float = -1.0  # what the selected checkpoint scores on test
    stopped_early: bool = False
    pruned: bool = False            # a stop hook (pruning) ended training after the last epoch
    diverged: bool = False          # the last epoch's loss was not finite: training stopped there
    total_time_s: float = 0.0

    def add(self, result: EpochResult) -> bool:
        """Append an epoch; True when it is the best so far on the selection split (epoch 1
        counts: the seed skips it)."""
        self.epochs.append(result)
        self.total_time_s += result.epoch_time_s
        if result.diverged() and self.best_epoch:  # its accuracy is digit 0's share, not a best
            return False
        score = result.val_acc if self.selected_on == "val" else result.test_acc
        if score > self.best_acc:
            self.best_acc, self.best_epoch, self.test_acc_at_best = score, result.epoch, result.test_acc
            return True
        return False

    def best_diverged(self) -> bool:
        """The best epoch is the one that diverged (only ever epoch 1): its weights are not finite
        and its accuracy is digit 0's share, so no choice should take it."""
        return self.diverged and bool(self.epochs) and self.best_epoch == self.epochs[-1].epoch

    def column(self, name: str) -> list[float]:
        return [getattr(e, name) for e in self.epochs]

    def to_state(self) -> dict:
        """Plain lists and dicts of numbers (what last.pt holds): every field, whatever is added."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "History":
        """The inverse of to_state; ValueError for a state that is not one."""
        if not isinstance(state, dict):
            raise ValueError(f"history is a {type(state).__name__}, not a dict")
        epochs = state.get("epochs", [])
        if not isinstance(epochs, list):
            raise ValueError(f"history epochs is a {type(epochs).__name__}, not a list")
        return _from_fields(cls, {**state, "epochs": [_from_fields(EpochResult, e) for e in epochs]})


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _from_fields(cls, state):
    """cls(**state) for a dataclass, refusing unknown or missing fields and non-plain values."""
    if not isinstance(state, dict):
        raise ValueError(f"{cls.__name__} state is a {type(state).__name__}, not a dict")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if state.keys() - names:
        raise ValueError(f"{cls.__name__} has no fields {sorted(state.keys() - names)}")
    if required - state.keys():
        raise ValueError(f"{cls.__name__} state lacks {sorted(required - state.keys())}")
    hints = typing.get_type_hints(cls)
    for name, value in state.items():
        if name != "epochs" and not _plain(value):
            raise ValueError(f"{cls.__name__}.{name} is a {type(value).__name__}, not a plain value")
        if name != "epochs" and not _fits(value, hints[name]):
            raise ValueError(f"{cls.__name__}.{name} is {value!r:.20}, not of type {_type_name(hints[name])}")
    return cls(**state)


def _options(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _fits(value, hint) -> bool:
    """Whether a plain value has its field's type: an epoch 2.0 would reach range() mid-run.
    A bool is no number here, and an int may stand for a float (as JSON writes 1.0)."""
    for option in _options(hint):
        if value is None and option is type(None):
            return True
        if option is float and type(value) in (int, float):
            return True
        if option in (int, bool, str) and type(value) is option:
            return True
    return False


def _type_name(hint) -> str:
    return " or ".join("None" if option is type(None) else option.__name__ for option in _options(hint))


# The seed's losses are x100 per sample; ours are per sample. `tol` keeps the seed's meaning.
SEED_LOSS_SCALE = 100.0


class EarlyStopping:
    """Stop when the selection loss has not beaten its lowest value by more than `tol`
    for `patience` epochs in a row, with the loss on the seed's scale (x100 per sample)."""

    def __init__(self, patience: int = 5, tol: float = 1e-5):
        self.patience, self.tol = patience, tol
        self.counter = 0
        self.lowest_loss: float | None = None

    def __call__(self, loss: float) -> bool:
        if self.lowest_loss is None or (self.lowest_loss - loss) * SEED_LOSS_SCALE > self.tol:
            self.lowest_loss = loss
            self.counter = 0
        else:
            self.counter += 1
        return self.counter >= self.patience

    def on_epoch(self, end) -> bool:
        """The callback: the selection split's loss decides; history.stopped_early records it."""
        result = end.result
        loss = result.val_loss if end.history.selected_on == "val" else result.test_loss
        end.history.stopped_early = self(loss)
        return end.history.stopped_early

    def state_dict(self) -> dict:
        return {"counter": self.counter, "lowest_loss": self.lowest_loss}

    def load_state_dict(self, state: dict) -> None:
        self.counter, self.lowest_loss = state["counter"], state["lowest_loss"]


@dataclass
class Hyper:
    """What the loop needs to know, as plain values."""
    epochs: int
    lr: float
    alpha: float = 0.99
    gamma: float = 0.0
    wd: float = 0.0
    lr_schedule: str = "constant"   # constant | cosine (see epoch_lr)
    tol: float = 1e-5
    patience: int = 5
    log_every: int = 50
    compile: str = ""               # a torch.compile mode ("default", "max-autotune", ...); "" = eager
    precision: str = "fp32"         # fp32 | bf16 (autocast), see runtime.resolve_precision


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """`model`, or torch.compile of it in `mode` (sharing its parameters). Static shapes: a last,
    smaller batch gets a graph of its own rather than turning every graph dynamic, which CUDA
    graphs (reduce-overhead, max-autotune) would record per shape anyway."""
    if not mode:
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def autocast(device: torch.device, precision: str = "fp32"):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_lr(hyper: Hyper, epoch: int) -> float:
    """The learning rate of `epoch` (from 1): hyper.lr throughout, or with `cosine` half a cosine
    from hyper.lr at epoch 1 towards 0 after the last. A function of the epoch alone, so a resumed
    run trains each epoch at the rate it would have had."""
    if hyper.lr_schedule == "cosine":
        return hyper.lr * (1 + math.cos(math.pi * (epoch - 1) / hyper.epochs)) / 2
    return hyper.lr


def make_optimizer(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(model.parameters(), lr=hyper.lr, alpha=hyper.alpha,
                               momentum=hyper.gamma, weight_decay=hyper.wd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: nn.Module, batches: Iterable, device: torch.device,
             precision: str = "fp32") -> tuple[float, float]:
    """(mean loss per sample, accuracy in percent) over `batches`."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    with torch.no_grad(), autocast(device, precision):
        for x, y in batches:
            logits = model(x)
            loss_sum += criterion(logits.float(), y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    return loss_sum.item() / max(seen, 1), 100.0 * correct.item() / max(seen, 1)


# last.pt's layout: tensors and plain containers only (format 1 pickled History objects)
CHECKPOINT_FORMAT = 2


@dataclass
class EpochEnd:
    """What every callback sees after an epoch. snapshot() returns everything needed to resume
    (model, optimiser, early stopping, history, RNG states), as plain data."""
    result: EpochResult
    is_best: bool
    history: History
    snapshot: Callable[[], dict]


# Whatever follows an epoch (checkpoints, heartbeat, progress): called with the epoch's EpochEnd.
Callback = Callable[[EpochEnd], None]
# Whether training ends after this epoch (pruning): asked before any Callback, so the snapshot a
# Callback saves knows the answer and a resumed run never trains past it.
StopHook = Callable[[EpochEnd], bool]


def make_step(net: nn.Module, optimizer: torch.optim.Optimizer, hyper: Hyper, device: torch.device):
    """One optimiser step on a batch: (summed loss, correct count), both left on the device."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # CUDA graphs reuse their output memory: each step starts a new generation, whose outputs
    # (this step's loss, read before the next) may then be overwritten
    mark_step = torch.compiler.cudagraph_mark_step_begin if hyper.compile and device.type == "cuda" \
        else (lambda: None)

    def step(x, y):
        mark_step()
        with autocast(device, hyper.precision):
            logits = net(x)
            loss = criterion(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), (logits.argmax(1) == y).sum()

    return step


class TrainPass(NamedTuple):
    loss: float                     # mean per sample
    acc: float                      # percent
    images_per_s: float             # after the warm-up batch
    started: float                  # perf_counter at its start: the epoch's time counts from here


def train_one_epoch(net: nn.Module, batches, step, device: torch.device, epoch: int, log_every: int,
                    log: Callable[[str], None]) -> TrainPass:
    """One pass over `batches`. The loss and accuracy stay on the device until the end: no host
    sync per batch."""
    net.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    steady_start, steady_seen = None, 0
    n_batches = len(batches)
    for index, (x, y) in enumerate(batches, 1):
        batch_loss, batch_correct = step(x, y)
        loss_sum += batch_loss
        correct += batch_correct
        seen += len(y)
        if index == 1 and n_batches > 1:  # steady state starts after the warm-up batch
            _sync(device)
            steady_start, steady_seen = time.perf_counter(), seen
        if index % log_every == 0:
            elapsed = time.perf_counter() - start
            log(f"epoch {epoch} [{index}/{n_batches} batches, {seen} images] "
                f"loss {loss_sum.item() / seen:.4f}  {seen / elapsed:.0f} img/s")
    _sync(device)
    if steady_start is None:
        steady_start, steady_seen = start, 0
    images_per_s = (seen - steady_seen) / max(time.perf_counter() - steady_start, 1e-9)
    return TrainPass(loss_sum.item() / seen, 100.0 * correct.item() / seen, images_per_s, start)


def fit(model: nn.Module, train_batches, test_batches, hyper: Hyper, device: torch.device,
        generator: torch.Generator, *, val_batches=None, resume: dict | None = None,
        stop_hooks: Iterable[StopHook] = (), callbacks: Iterable[Callback] = (),
        log: Callable[[str], None] = print) -> History:
    """Train `model` for up to hyper.epochs: each epoch train_one_epoch, evaluate, then early
    stopping, the `stop_hooks` and the `callbacks` in order (every one sees every epoch).
    Training stops after the first epoch whose loss is not finite (history.diverged): NaN weights
    never recover, and such an epoch is never the best unless it is the first.

    With `val_batches`, early stopping and the best epoch follow validation; test is only reported.
    `resume` is an EpochEnd.snapshot(): training continues after its epoch.
    """
    optimizer = make_optimizer(model, hyper)
    net = compiled(model, hyper.compile)
    stopper = EarlyStopping(hyper.patience, hyper.tol)
    history = History(selected_on="val" if val_batches is not None else "test")
    first_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        stopper.load_state_dict(resume["early_stopping"])
        history = History.from_state(resume["history"])
        set_rng_state(resume["rng"], generator, device)
        # a snapshot taken as early stopping fired, as a stop hook pruned or as the loss diverged, is complete
        over = history.stopped_early or history.pruned or history.diverged
        first_epoch = hyper.epochs + 1 if over else resume["epoch"] + 1
        log(f"resuming after epoch {resume['epoch']} (best {history.selected_on}_acc {history.best_acc:.3f}% "
            f"at epoch {history.best_epoch})" + (", where early stopping had fired" if history.stopped_early else "")
            + (", where it had been pruned" if history.pruned else "")
            + (", where its loss had diverged" if history.diverged else ""))
    step = make_step(net, optimizer, hyper, device)

    for epoch in range(first_epoch, hyper.epochs + 1):
        lr = None
        if hyper.lr_schedule != "constant":
            lr = epoch_lr(hyper, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
        train_loss, train_acc, images_per_s, start = train_one_epoch(net, train_batches, step, device, epoch,
                                                                     hyper.log_every, log)
        val_loss = val_acc = None
        if val_batches is not None:
            val_loss, val_acc = evaluate(net, val_batches, device, hyper.precision)
        test_loss, test_acc = evaluate(net, test_batches, device, hyper.precision)
        result = EpochResult(epoch, train_loss, test_loss, train_acc, test_acc, time.perf_counter() - start,
                             images_per_s, val_loss, val_acc, lr)
        is_best = history.add(result)
        val_text = "" if val_batches is None else f"val_loss {val_loss:.4f} val_acc {val_acc:.2f}% "
        log(f"epoch {epoch}/{hyper.epochs}: train_loss {train_loss:.4f} {val_text}"
            f"test_loss {test_loss:.4f} train_acc {train_acc:.2f}% test_acc {test_acc:.2f}% "
            f"({result.epoch_time_s:.1f}s, {images_per_s:.0f} img/s)" + ("  *best*" if is_best else ""))

        def snapshot(epoch=epoch) -> dict:
            return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "early_stopping": stopper.state_dict(),
                    "history": history.to_state(), "rng": rng_state(generator, device)}

        end = EpochEnd(result, is_best, history, snapshot)
        stopper.on_epoch(end)  # first: the snapshot the callbacks take knows whether it fired
        history.pruned = any([bool(ask(end)) for ask in stop_hooks])  # a list: every hook is asked
        history.diverged = result.diverged()
        for callback in callbacks:
            callback(end)
        if history.diverged:
            log(f"stopped after epoch {epoch}: its loss is not finite (the weights diverged); "
                f"a lower lr (this epoch's: {lr if lr is not None else hyper.lr:g}) may train")
            break
        if history.pruned:
            log(f"stopped after epoch {epoch}: the caller asked to (pruned)")
            break
        if history.stopped_early:
            log(f"early stopping: {history.selected_on} loss (x100 per sample, the seed's scale) has not "
                f"improved by more than {hyper.tol:g} for {hyper.patience} epochs")
            break
    return history
