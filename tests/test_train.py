"""The training loop alone, without MLflow: early stopping, best epoch, resume."""
import copy
import io

import torch

from pipeline import train
from pipeline.train import EarlyStopping, Hyper


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


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(x)


def batches(seed, n=64, bs=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() * 3  # learnable: class 0 or 3
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def run(epochs, resume=None, snapshots=None, model=None):
    torch.manual_seed(0)
    model = model or Tiny()
    seen = []

    def on_epoch(result, is_best, snapshot):
        seen.append((result.epoch, is_best))
        if snapshots is not None:
            snapshots.append(copy.deepcopy(snapshot()))

    history = train.fit(model, batches(1), batches(2), Hyper(epochs=epochs, lr=1e-2, tol=0.0, patience=50),
                        torch.device("cpu"), torch.Generator().manual_seed(0), resume=resume,
                        on_epoch=on_epoch, log=lambda m: None)
    return model, history, seen


def test_epoch_one_counts_as_best_and_losses_are_means():
    _, history, seen = run(1)
    assert seen == [(1, True)] and history.best_epoch == 1
    assert 0 < history.epochs[0].train_loss < 10  # per sample, not a sum or x100
    assert history.epochs[0].train_images_per_s > 0


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
    from pipeline import data

    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(48) % 10
    generator = train.seed_everything(7)
    model = TinyConv()
    device = torch.device("cpu")
    batches = data.TensorBatches(images, labels, 16, train=True, augment_images=True, device=device,
                                 generator=generator)
    tests = data.TensorBatches(images, labels, 16, train=False, augment_images=False, device=device)

    def on_epoch(result, is_best, snapshot):
        if snapshots is not None:  # through a file, as last.pt travels
            buffer = io.BytesIO()
            torch.save(snapshot(), buffer)
            buffer.seek(0)
            snapshots.append(torch.load(buffer, weights_only=True))

    train.fit(model, batches, tests, Hyper(epochs=epochs, lr=1e-2, tol=0.0, patience=50), device, generator,
              resume=resume, on_epoch=on_epoch, log=lambda m: None)
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


def run_with_val(epochs, val):
    torch.manual_seed(0)
    model = Tiny()
    seen = []
    history = train.fit(model, batches(1), batches(2), Hyper(epochs=epochs, lr=1e-2, tol=0.0, patience=50),
                        torch.device("cpu"), torch.Generator().manual_seed(0), val_batches=val,
                        on_epoch=lambda r, best, snap: seen.append((r.epoch, best)), log=lambda m: None)
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
    assert loaded["format"] == train.CHECKPOINT_FORMAT
    assert train.History.from_state(loaded["history"]).to_state() == snapshots[-1]["history"]
    resumed_model, resumed, _ = run(4, resume=loaded, model=Tiny())
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3, 4]
    for a, b in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_rng_states_restore_every_generator_after_a_weights_only_load():
    import io
    import random

    import numpy as np

    generator = train.seed_everything(7)
    random.gauss(0, 1), np.random.randn()  # cached gaussians are part of the state too
    buffer = io.BytesIO()
    torch.save(train.rng_state(generator), buffer)

    def draws():
        return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
                torch.rand(2).tolist(), torch.rand(2, generator=generator).tolist())

    first = draws()
    buffer.seek(0)
    train.set_rng_state(torch.load(buffer, weights_only=True), generator)
    assert draws() == first


def test_resuming_a_snapshot_taken_as_early_stopping_fired_trains_no_more():
    snapshots = []
    torch.manual_seed(0)

    def keep(result, is_best, snapshot):
        snapshots.append(copy.deepcopy(snapshot()))

    stopped = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=10, lr=1e-9, tol=1e6, patience=2),
                        torch.device("cpu"), torch.Generator().manual_seed(0), on_epoch=keep, log=lambda m: None)
    assert stopped.stopped_early and len(stopped.epochs) == 3
    seen = []
    resumed = train.fit(Tiny(), batches(1), batches(2), Hyper(epochs=10, lr=1e-9, tol=1e6, patience=2),
                        torch.device("cpu"), torch.Generator().manual_seed(0), resume=snapshots[-1],
                        on_epoch=lambda r, b, s: seen.append(r.epoch), log=lambda m: None)
    assert seen == [] and len(resumed.epochs) == 3 and resumed.stopped_early
