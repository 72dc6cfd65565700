"""The training loop alone, without MLflow: early stopping, best epoch, resume."""
import copy

import torch

from pipeline import train
from pipeline.train import EarlyStopping, Hyper


def test_early_stopping_really_stops():
    stop = EarlyStopping(patience=3, tol=0.01)
    assert [stop(x) for x in [1.0, 0.5, 0.499, 0.6, 0.7]] == [False, False, False, False, True]
    assert stop.lowest_loss == 0.5


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
