"""The training loop alone, without MLflow: early stopping, best epoch, resume."""
import copy
import io
import random

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline import batching, checkpoints, rng, train
from pipeline.train import EarlyStopping, Hyper

from support.digits import Tiny, batches


def test_early_stopping_really_stops():
    stop = EarlyStopping(patience=3, tol=1.0)  # 1.0 on the seed's x100 scale = 0.01 per sample
    assert [stop(x) for x in [1.0, 0.5, 0.499, 0.6, 0.7]] == [False, False, False, False, True]
    assert stop.lowest_loss == 0.5


class SeedEarlyStopping:
    """The seed's EarlyStopping (section 4), fed the seed's x100 losses; only its bool-vs-"True"
    bug is left out (the seed's loop never stops)."""

    def __init__(self, patience=5, tol=0.0005):
        self.patience, self.tol, self.counter, self.lowest_loss, self.early_stop = patience, tol, 0, None, False

    def __call__(self, val_loss):
        if self.lowest_loss is None:
            self.lowest_loss = val_loss
        elif self.lowest_loss - val_loss > self.tol:
            self.lowest_loss = val_loss
            self.counter = 0
        elif self.lowest_loss - val_loss < self.tol:
            self.counter += 1
            if self.counter >= self.patience:
                self.early_stop = True
        return self.early_stop


def test_tol_means_what_it_meant_in_the_seed():
    # per-sample losses near 0.1 that creep down by 0.0004 per epoch: 0.04 on the seed's scale
    losses = [0.3, 0.2, 0.1] + [0.1 - 0.0004 * i for i in range(1, 9)]
    for tol in (1e-5, 0.01, 0.05, 0.5):
        ours, seed = EarlyStopping(5, tol), SeedEarlyStopping(5, tol)
        assert [ours(x) for x in losses] == [seed(100 * x) for x in losses], tol
    ours = EarlyStopping(5, 0.5)  # below 0.5 on the x100 scale for 5 epochs: stops at the 5th
    assert [ours(x) for x in losses].index(True) == 7
    ours = EarlyStopping(5, 1e-5)  # the seed's default: a 0.0004 per-sample gain still counts
    assert not any(ours(x) for x in losses)


def test_early_stopping_resets_on_improvement_and_round_trips():
    stop = EarlyStopping(patience=2, tol=0.0)
    stop(1.0), stop(1.1)
    assert stop.counter == 1
    stop(0.9)
    assert stop.counter == 0
    clone = EarlyStopping(2, 0.0)
    clone.load_state_dict(stop.state_dict())
    assert clone(1.0) is False and clone(1.0) is True


def run(epochs, resume=None, snapshots=None, model=None):
    torch.manual_seed(0)
    model = model or Tiny()
    seen = []

    def on_epoch(end):
        result, is_best, snapshot = end.result, end.is_best, end.snapshot
        seen.append((result.epoch, is_best))
        if snapshots is not None:
            snapshots.append(copy.deepcopy(snapshot()))

    history = train.fit(model, batches(1), batches(2), Hyper(epochs=epochs, lr=1e-2, tol=0.0, patience=50),
                        torch.device("cpu"), torch.Generator().manual_seed(0), resume=resume,
                        callbacks=[on_epoch], log=lambda m: None)
    return model, history, seen


def test_epoch_one_counts_as_best_and_losses_are_means():
    model, history, seen = run(1)
    assert seen == [(1, True)] and history.best_epoch == 1
    assert history.best_acc == history.epochs[0].test_acc
    result = history.epochs[0]
    # the test pass after the epoch: a mean per sample over all 64 (4 batches of 16), the model as it ended
    model.eval()
    with torch.no_grad():
        logits = model(torch.cat([x for x, _ in batches(2)]))
    labels = torch.cat([y for _, y in batches(2)])
    assert result.test_loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert result.test_acc == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    # steady-state speed leaves out the first batch: 48 images in at most the epoch's time
    assert 48 / result.train_images_per_s <= result.epoch_time_s


def test_resume_continues_where_it_stopped():
    straight, full, _ = run(4)
    snapshots = []
    run(2, snapshots=snapshots)
    resumed_model, resumed, seen = run(4, resume=snapshots[-1], model=Tiny())
    assert [e for e, _ in seen] == [3, 4]  # epochs 1-2 are not trained again
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3, 4]
    for a, b in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.allclose(a, b)
    assert resumed.epochs[-1].test_acc == full.epochs[-1].test_acc


class TinyConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def shuffled_augmented_fit(epochs, resume=None, snapshots=None):

    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(48) % 10
    generator = rng.seed_everything(7)
    model = TinyConv()
    device = torch.device("cpu")
    batches = batching.TensorBatches(images, labels, 16, train=True, augment_images=True, device=device,
                                 generator=generator)
    tests = batching.TensorBatches(images, labels, 16, train=False, augment_images=False, device=device)

    def on_epoch(end):
        snapshot = end.snapshot
        if snapshots is not None:  # through a file, as last.pt travels
            buffer = io.BytesIO()
            torch.save(snapshot(), buffer)
            buffer.seek(0)
            snapshots.append(torch.load(buffer, weights_only=True))

    train.fit(model, batches, tests, Hyper(epochs=epochs, lr=1e-2, tol=0.0, patience=50), device, generator,
              resume=resume, callbacks=[on_epoch], log=lambda m: None)
    return model


def test_resume_restores_the_shuffle_and_augmentation_draws():
    """Resumed after epoch 1, epochs 2-3 see the same batches and crops as a run never stopped:
    the generator that shuffles and augments is restored, not reseeded."""
    straight = shuffled_augmented_fit(3)
    snapshots = []
    shuffled_augmented_fit(1, snapshots=snapshots)
    resumed = shuffled_augmented_fit(3, resume=snapshots[-1])
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # without the saved RNG state the draws differ, and so do the weights
    snapshots[-1]["rng"]["generator"] = torch.Generator().manual_seed(99).get_state()
    reseeded = shuffled_augmented_fit(3, resume=snapshots[-1])
    assert not torch.equal(straight.conv.weight, reseeded.conv.weight)


def test_fit_selects_on_validation_and_reports_test_at_that_epoch():
    val = batches(5)
    _, history, seen = run_with_val(3, val)
    accs = history.column("val_acc")
    assert history.selected_on == "val" and history.best_acc == max(accs)
    assert history.best_epoch == accs.index(max(accs)) + 1
    assert history.test_acc_at_best == history.epochs[history.best_epoch - 1].test_acc
    assert [e for e, best in seen if best][-1] == history.best_epoch


@pytest.mark.parametrize("selected_on,stops_at", [("val", None), ("test", 2)])
def test_early_stopping_follows_the_selection_splits_loss(selected_on, stops_at):
    """Validation loss falls while test loss rises: with a validation split it trains on, on test
    alone it stops once test's loss has not fallen for `patience` epochs."""
    stopping, history = train.EarlyStopping(patience=1, tol=0.0), train.History(selected_on=selected_on)
    stopped = []
    for epoch, (val_loss, test_loss) in enumerate([(1.0, 1.0), (0.9, 1.1), (0.8, 1.2), (0.7, 1.3)], start=1):
        result = train.EpochResult(epoch, 1.0, test_loss, 0.5, 0.5, 1.0, 1.0,
                                   val_loss=val_loss if selected_on == "val" else None,
                                   val_acc=0.5 if selected_on == "val" else None)
        if stopping.on_epoch(train.EpochEnd(result, False, history, dict)):
            stopped.append(epoch)
    assert (stopped[0] if stopped else None) == stops_at and history.stopped_early == bool(stops_at)


def run_with_val(epochs, val):
    torch.manual_seed(0)
    model = Tiny()
    seen = []
    history = train.fit(model, batches(1), batches(2), Hyper(epochs=epochs, lr=1e-2, tol=0.0, patience=50),
                        torch.device("cpu"), torch.Generator().manual_seed(0), val_batches=val,
                        callbacks=[lambda end: seen.append((end.result.epoch, end.is_best))], log=lambda m: None)
    return model, history, seen


def test_early_stopping_in_fit_sets_stopped_early_at_the_seeds_threshold():
    torch.manual_seed(0)
    history = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=10, lr=1e-9, tol=1e6, patience=2),
                        torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda m: None)
    assert history.stopped_early and len(history.epochs) == 3
    history = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=4, lr=1e-2, tol=0.0, patience=50),
                        torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda m: None)
    assert not history.stopped_early and len(history.epochs) == 4
def test_snapshot_is_plain_data_and_resumes_after_a_weights_only_load():
    import io

    straight, _, _ = run(4)
    snapshots = []
    run(2, snapshots=snapshots)
    buffer = io.BytesIO()
    torch.save(snapshots[-1], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # only tensors and plain containers load here
    assert loaded["format"] == checkpoints.CHECKPOINT_FORMAT
    assert train.History.from_state(loaded["history"]).to_state() == snapshots[-1]["history"]
    resumed_model, resumed, _ = run(4, resume=loaded, model=Tiny())
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3, 4]
    for a, b in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_rng_states_restore_every_generator_after_a_weights_only_load():
    import io
    import random

    import numpy as np

    generator = rng.seed_everything(7)
    random.gauss(0, 1), np.random.randn()  # cached gaussians are part of the state too
    buffer = io.BytesIO()
    torch.save(rng.rng_state(generator), buffer)

    def draws():
        return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
                torch.rand(2).tolist(), torch.rand(2, generator=generator).tolist())

    first = draws()
    buffer.seek(0)
    rng.set_rng_state(torch.load(buffer, weights_only=True), generator)
    assert draws() == first


def test_a_stop_hook_is_asked_before_the_callbacks_so_its_snapshot_resumes_to_no_more_epochs():
    snapshots, order = [], []
    torch.manual_seed(0)

    def prune(end):
        order.append("hook")
        return end.result.epoch >= 2

    def keep(end):
        order.append("callback")
        snapshots.append(copy.deepcopy(end.snapshot()))

    pruned = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=5, lr=0.1), torch.device("cpu"),
                       torch.Generator().manual_seed(0), stop_hooks=[prune], callbacks=[keep], log=lambda m: None)
    assert len(pruned.epochs) == 2 and pruned.pruned and not pruned.stopped_early
    assert order == ["hook", "callback"] * 2 and snapshots[-1]["history"]["pruned"]
    seen = []
    resumed = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=5, lr=0.1), torch.device("cpu"),
                        torch.Generator().manual_seed(0), resume=snapshots[-1],
                        callbacks=[lambda end: seen.append(end.result.epoch)], log=lambda m: None)
    assert seen == [] and len(resumed.epochs) == 2 and resumed.pruned


def test_training_stops_at_the_first_diverged_epoch_and_never_takes_it_as_the_best():
    # labels mostly digit 0 (57 of 64): NaN logits argmax to 0, so a diverged epoch scores 89%
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = torch.where(torch.arange(64) % 10 == 0, 3, 0)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = Tiny()
    with torch.no_grad():
        model.fc.bias.copy_(100.0 * torch.arange(10.0))  # digit 9 everywhere: 0% before it diverges
    snapshots = []

    def blow_up_after_epoch_1(end):
        snapshots.append(copy.deepcopy(end.snapshot()))
        if end.result.epoch == 1:
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))

    lines = []
    history = train.fit(model, data, data, Hyper(epochs=4, lr=1e-9), CPU, torch.Generator().manual_seed(0),
                        callbacks=[blow_up_after_epoch_1], log=lines.append)
    assert [e.test_acc for e in history.epochs] == [0.0, 100.0 * 57 / 64]  # epoch 2 diverged: its 0s score
    assert history.diverged and not history.stopped_early and len(history.epochs) == 2
    assert (history.best_epoch, history.best_acc, history.test_acc_at_best) == (1, 0.0, 0.0)
    assert "loss is not finite" in lines[-1] and snapshots[-1]["history"]["diverged"]
    seen = []
    resumed = train.fit(Tiny(), data, data, Hyper(epochs=4, lr=1e-9), CPU, torch.Generator().manual_seed(0),
                        resume=snapshots[-1], callbacks=[lambda end: seen.append(end.result.epoch)],
                        log=lambda m: None)
    assert seen == [] and resumed.diverged and resumed.best_epoch == 1


def test_a_cosine_schedule_trains_each_epoch_at_its_rate_and_a_resume_goes_on_from_there():
    rates = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        hyper, snapshots = Hyper(epochs=4, lr=0.1, lr_schedule="cosine"), []
        torch.manual_seed(0)
        whole = train.fit(Tiny(), batches(1), batches(2), hyper, CPU, torch.Generator().manual_seed(0),
                          callbacks=[lambda end: snapshots.append(copy.deepcopy(end.snapshot()))],
                          log=lambda m: None)
        expected = [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05, 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2]
        assert rates == pytest.approx([rate for rate in expected for _ in range(4)])  # 4 batches an epoch
        assert [e.lr for e in whole.epochs] == pytest.approx(expected)
        rates.clear()
        resumed = train.fit(Tiny(), batches(1), batches(2), hyper, CPU, torch.Generator().manual_seed(0),
                            resume=snapshots[1], log=lambda m: None)
        assert rates == pytest.approx([expected[2]] * 4 + [expected[3]] * 4)
        assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in whole.epochs]
        rates.clear()
        constant = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=2, lr=0.1), CPU,
                             torch.Generator().manual_seed(0), log=lambda m: None)
        assert rates == [0.1] * 8 and [e.lr for e in constant.epochs] == [None, None]  # no lr metric
    finally:
        hook.remove()


def test_a_first_epoch_that_diverged_is_still_the_best_there_is():
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    history = train.fit(model, batches(1), batches(2), Hyper(epochs=3, lr=0.1), CPU, torch.Generator().manual_seed(0),
                        log=lambda m: None)
    assert history.diverged and len(history.epochs) == 1 and history.best_epoch == 1  # best.pt exists


def test_resuming_a_snapshot_taken_as_early_stopping_fired_trains_no_more():
    snapshots = []
    torch.manual_seed(0)

    def keep(end):
        snapshot = end.snapshot
        snapshots.append(copy.deepcopy(snapshot()))

    stopped = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=10, lr=1e-9, tol=1e6, patience=2),
                        torch.device("cpu"), torch.Generator().manual_seed(0), callbacks=[keep], log=lambda m: None)
    assert stopped.stopped_early and len(stopped.epochs) == 3
    seen = []
    resumed = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=10, lr=1e-9, tol=1e6, patience=2),
                        torch.device("cpu"), torch.Generator().manual_seed(0), resume=snapshots[-1],
                        callbacks=[lambda end: seen.append(end.result.epoch)], log=lambda m: None)
    assert seen == [] and len(resumed.epochs) == 3 and resumed.stopped_early
CPU = torch.device("cpu")


def fit(model, train_batches, epochs, lr, record=None, **hyper):
    """train.fit on the Tiny task; `record` collects (epoch, is_best, snapshot copy, best state)."""
    def on_epoch(end):
        result, is_best, snapshot = end.result, end.is_best, end.snapshot
        state = copy.deepcopy(snapshot())
        assert state["epoch"] == result.epoch
        best = copy.deepcopy(model.state_dict()) if is_best else None  # what the runner saves as best.pt
        if record is not None:
            record.append((result.epoch, is_best, state, best))

    settings = dict(tol=0.0, patience=50) | hyper
    return train.fit(model, train_batches, batches(2), Hyper(epochs=epochs, lr=lr, **settings), CPU,
                     torch.Generator().manual_seed(0), callbacks=[on_epoch], log=lambda m: None)


class SwappedLaterBatches:
    """The Tiny task's batches, with the two classes swapped after `good_epochs` epochs: learning
    them makes the test accuracy fall, so the best epoch is not the last one."""

    def __init__(self, good_epochs):
        self.good_epochs, self.epoch = good_epochs, 0
        self.good = batches(1)
        self.swapped = [(x, 3 - y) for x, y in self.good]

    def __len__(self):
        return len(self.good)

    def __iter__(self):
        self.epoch += 1
        return iter(self.good if self.epoch <= self.good_epochs else self.swapped)


def test_best_follows_the_highest_test_acc_not_the_last_epoch():
    torch.manual_seed(0)
    model, record = Tiny(), []
    history = fit(model, SwappedLaterBatches(3), 5, 5e-2, record)
    accs = history.column("test_acc")
    assert accs[-1] < max(accs)  # the premise: a later epoch is worse
    best_epoch = accs.index(max(accs)) + 1
    assert history.best_epoch == best_epoch < 5 and history.best_acc == max(accs)
    assert [is_best for _, is_best, _, _ in record] == \
        [acc > max(accs[:i], default=-1.0) for i, acc in enumerate(accs)]
    best_state = [best for _, is_best, _, best in record if is_best][-1]
    restored = Tiny()
    restored.load_state_dict(best_state)
    assert train.evaluate(restored, batches(2), CPU) == (history.epochs[best_epoch - 1].test_loss,
                                                         history.best_acc)
    assert train.evaluate(model, batches(2), CPU)[1] == accs[-1] != history.best_acc
    # each snapshot holds that epoch's weights, so resuming from it continues from there
    epoch3 = record[2][2]
    assert epoch3["history"]["best_epoch"] == best_epoch
    for key, value in epoch3["model"].items():
        assert not torch.equal(value, model.state_dict()[key])


def trained_tiny():
    """A Tiny model that has learned the task (so its accuracy is neither 0 nor a fluke)."""
    torch.manual_seed(0)
    model = Tiny()
    fit(model, batches(1), 2, 5e-2)
    return model


def test_ties_keep_the_first_best_and_metrics_are_exact_per_sample_means():
    model, record = trained_tiny(), []
    before = copy.deepcopy(model.state_dict())
    history = fit(model, batches(1), 3, 0.0, record)  # lr 0: the model never changes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [(e, b) for e, b, _, _ in record] == [(1, True), (2, False), (3, False)]
    assert history.best_epoch == 1 and not history.stopped_early
    with torch.no_grad():
        for split, name in ((batches(1), "train"), (batches(2), "test")):
            x, y = torch.cat([b[0] for b in split]), torch.cat([b[1] for b in split])
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y).item()  # mean per sample
            acc = 100.0 * (logits.argmax(1) == y).float().mean().item()
            for epoch in history.epochs:
                assert abs(getattr(epoch, f"{name}_loss") - loss) < 1e-6 * loss, name
                assert getattr(epoch, f"{name}_acc") == acc, name
    assert history.best_acc == history.epochs[0].test_acc
    assert history.total_time_s == sum(e.epoch_time_s for e in history.epochs)
    assert set(history.epochs[0].metrics()) == {"train_loss", "test_loss", "train_acc", "test_acc",
                                                "epoch_time_s", "train_images_per_s"}


def test_fit_stops_after_patience_epochs_without_improvement():
    torch.manual_seed(0)
    record = []
    history = fit(Tiny(), batches(1), 10, 0.0, record, patience=2)  # constant test loss
    assert [e.epoch for e in history.epochs] == [1, 2, 3] and len(record) == 3
    assert history.stopped_early and record[-1][2]["early_stopping"]["counter"] == 2


def test_lr_momentum_and_weight_decay_reach_rmsprop():
    hyper = Hyper(epochs=1, lr=0.5, alpha=0.9, gamma=0.25, wd=0.125)
    group = train.make_optimizer(Tiny(), hyper).param_groups[0]
    assert (group["lr"], group["alpha"], group["momentum"], group["weight_decay"]) == (0.5, 0.9, 0.25, 0.125)


def test_progress_lines_every_log_every_batches():
    lines = []
    torch.manual_seed(0)
    train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=2, lr=1e-2, log_every=2), CPU,
              torch.Generator().manual_seed(0), log=lines.append)
    progress = [line.split(" loss")[0] for line in lines if "batches" in line]
    assert progress == [f"epoch {e} [{b}/4 batches, {16 * b} images]" for e in (1, 2) for b in (2, 4)]
    assert [line.split(":")[0] for line in lines if "test_acc" in line] == ["epoch 1/2", "epoch 2/2"]


def test_bf16_autocast_computes_in_bf16_and_fp32_does_not():
    x = torch.randn(4, 4)
    with train.autocast(CPU, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with train.autocast(CPU, "fp32"):
        assert (x @ x).dtype == torch.float32


def test_cuda_rng_state_is_the_trained_devices_alone_and_goes_back_to_the_device_a_resume_trains_on(monkeypatch):
    """A CPU run on a GPU machine never starts CUDA; a GPU run saves its own device's state, and a
    resume that sees fewer GPUs (an older checkpoint holds 3) restores the first to its device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all") or [torch.zeros(1)] * 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("set all", len(states))))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state.sum().item(),
                                                                                          device)))
    generator = rng.seed_everything(7)
    on_cpu = rng.rng_state(generator, torch.device("cpu"))
    rng.set_rng_state(on_cpu, generator, torch.device("cpu"))
    assert "cuda" not in on_cpu and calls == []
    gpu = torch.device("cuda")
    on_gpu = rng.rng_state(generator, gpu)
    assert calls == [("get", gpu)] and torch.equal(on_gpu["cuda"][0], torch.ones(4))
    older = dict(on_gpu, cuda=[torch.full((4,), 2.0), torch.zeros(4), torch.zeros(4)])  # 3 GPUs were visible
    rng.set_rng_state(older, generator, gpu)
    assert calls[1:] == [("set", 8.0, gpu)]
    rng.set_rng_state(older, generator, torch.device("cpu"))  # resumed on the CPU: CUDA left alone
    assert len(calls) == 2


def test_rng_state_round_trips():
    generator = rng.seed_everything(7)
    state = rng.rng_state(generator)
    first = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(), random.random())
    rng.set_rng_state(state, generator)
    again = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2:] == again[2:]
    generator = rng.seed_everything(7)
    assert torch.equal(torch.rand(3), first[0]) and torch.equal(torch.rand(3, generator=generator), first[1])
    assert (np.random.rand(), random.random()) == first[2:]


def test_evaluate_is_the_mean_over_every_image_even_one():
    torch.manual_seed(0)
    model = Tiny()
    x, y = batches(2)[0]
    with torch.no_grad():
        logits = model(x[:1])
    expected = (torch.nn.functional.cross_entropy(logits, y[:1]).item(), 100.0 * float(logits.argmax(1) == y[:1]))
    loss, acc = train.evaluate(model, [(x[:1], y[:1])], CPU)
    assert loss == pytest.approx(expected[0], rel=1e-6) and acc == expected[1]


def test_evaluate_in_bf16_autocasts_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = Tiny()
    fp32 = train.evaluate(model, batches(2), CPU, "fp32")
    bf16 = train.evaluate(model, batches(2), CPU, "bf16")
    assert fp32 == train.evaluate(model, batches(2), CPU)  # fp32 is the default
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=0.05)


def test_evaluation_gives_the_same_figures_in_one_batch_or_many():
    """eval_bs sets how many images go through the model at once, never the result: BatchNorm
    evaluates on its running statistics, and every image counts once, the short last batch too."""

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = (images[:, 0, 8:24, 8:24].float().mean((1, 2)) > 127.5).long() * 3  # a bright red centre: 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    train_batches = list(batching.TensorBatches(images, labels, 64, train=False, augment_images=False, device=CPU))
    train.fit(model, train_batches, train_batches, Hyper(epochs=3, lr=1e-2), CPU, torch.Generator(),
              log=lambda m: None)
    model.eval()
    with torch.no_grad():
        logits = model(batching.normalise(batching.center_crop(images)))
    expected_acc = 100.0 * (logits.argmax(1) == labels).sum().item() / 300
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert 50 < expected_acc < 100  # the model learned something, and not everything: accuracy can move
    for bs, n_batches in ((300, 1), (7, 43), (1, 300)):
        batches_ = batching.TensorBatches(images, labels, bs, train=False, augment_images=True, device=CPU)
        assert len(batches_) == n_batches
        loss, acc = train.evaluate(model, batches_, CPU)
        assert acc == expected_acc, bs
        assert loss == pytest.approx(expected_loss, rel=1e-5), bs


class FakeClock:
    """time.perf_counter ticking one second per call: fit's timings become exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


# clock reads in an epoch: start, after batch 1 (steady state starts), every progress line, end of
# training, end of evaluation
@pytest.mark.parametrize("bs,epoch_time,images_per_s", [
    (16, 5, 48 / 3),  # 4 batches, 2 progress lines: the last 48 images in 3 ticks
    (32, 4, 32 / 2),  # 2 batches, 1 progress line
    (64, 2, 64 / 1),  # one batch: no warm-up to leave out, the whole epoch counts
])
def test_timings_leave_out_the_warm_up_batch(monkeypatch, bs, epoch_time, images_per_s):
    model, lines = trained_tiny(), []
    train_batches = batches(1, bs=bs)
    monkeypatch.setattr(train.time, "perf_counter", FakeClock())
    history = train.fit(model, train_batches, batches(2), Hyper(epochs=2, lr=0.0, log_every=2), CPU,
                        torch.Generator().manual_seed(0), log=lines.append)
    for result in history.epochs:
        assert result.train_images_per_s == images_per_s
        assert result.epoch_time_s == epoch_time
    assert history.total_time_s == 2 * epoch_time
    if bs == 16:  # progress lines: running mean loss and images per second since the epoch began
        with torch.no_grad():
            x, y = torch.cat([b[0] for b in train_batches]), torch.cat([b[1] for b in train_batches])
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        progress = [line for line in lines if "batches" in line][:2]
        assert progress == [f"epoch 1 [2/4 batches, 32 images] loss {losses[:32].mean():.4f}  16 img/s",
                            f"epoch 1 [4/4 batches, 64 images] loss {losses.mean():.4f}  21 img/s"]


def test_bf16_trains_and_evaluates_under_autocast():
    model, record = trained_tiny(), []
    history = fit(model, batches(1), 1, 0.0, record, precision="bf16")
    result = history.epochs[0]
    for split, got in ((batches(1), result.train_loss), (batches(2), result.test_loss)):
        bf16, fp32 = (train.evaluate(model, split, CPU, p)[0] for p in ("bf16", "fp32"))
        assert got == pytest.approx(bf16, rel=1e-6) and got != pytest.approx(fp32, rel=1e-6)


def test_tol_reaches_early_stopping():
    torch.manual_seed(0)
    history = fit(Tiny(), batches(1), 6, 5e-2, tol=1000.0, patience=2)  # no gain is worth 10 (x100)
    assert [e.epoch for e in history.epochs] == [1, 2, 3] and history.stopped_early
    losses = history.column("test_loss")
    assert losses[1] < losses[0]  # it did improve, by less than tol


def test_log_marks_best_epochs_early_stopping_and_resuming():
    lines, snapshots = [], []
    torch.manual_seed(0)
    model = Tiny()
    train.fit(model, SwappedLaterBatches(3), batches(2), Hyper(epochs=5, lr=5e-2, tol=0.0, patience=1), CPU,
              torch.Generator().manual_seed(0), log=lines.append,
              callbacks=[lambda end: snapshots.append(copy.deepcopy(end.snapshot()))])
    summaries = [line for line in lines if line.startswith("epoch ") and "test_acc" in line]
    history = train.History.from_state(snapshots[-1]["history"])
    assert [line.endswith("  *best*") for line in summaries] == \
        [e.test_acc > max(history.column("test_acc")[:i], default=-1.0) for i, e in enumerate(history.epochs)]
    assert all(line.endswith(("img/s)", "img/s)  *best*")) for line in summaries)
    assert lines[-1] == ("early stopping: test loss (x100 per sample, the seed's scale) has not improved "
                         "by more than 0 for 1 epochs")
    resumed, at_epoch_2 = [], train.History.from_state(snapshots[1]["history"])
    expected = (f"resuming after epoch 2 (best test_acc {at_epoch_2.best_acc:.3f}% "
                f"at epoch {at_epoch_2.best_epoch})")
    train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=3, lr=5e-2), CPU,
              torch.Generator().manual_seed(0), resume=snapshots[1], log=resumed.append)
    assert resumed[0] == expected


def test_early_stopping_defaults_are_the_seed_s():
    stop = train.EarlyStopping()
    assert (stop.patience, stop.tol) == (5, 1e-5)
    assert stop.state_dict() == {"counter": 0, "lowest_loss": None}
    # gains below 1e-5 on the seed's x100 scale (1e-7 per sample) do not count
    assert [stop(x) for x in [1.0] + [1.0 - 9e-8] * 5] == [False] * 5 + [True]
