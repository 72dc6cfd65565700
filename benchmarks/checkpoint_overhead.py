"""Checkpoint and logging overhead per epoch, as a share of the epoch it follows.

Per architecture: train a few batches (so RMSprop has its state), then time what `runner`
does after an epoch: best.pt (weights), last.pt (model + RMSprop state + history + RNG, the
snapshot `fit` hands over), each written atomically with fsync into a local artifact folder,
and one `log_batch` of the epoch's metrics into a SQLite store. The epoch time is the full
SVHN training split (73,257 images) at the throughput measured here, plus evaluation of the
test split (26,032) at the measured eval throughput. Overhead % = writes / epoch time, for
checkpoint_every=1 (today's default) and for last.pt every 5 epochs.

Then what the background writer hides (runner.train_in_run writes an epoch's record in a
checkpoints.CheckpointWriter thread while the next epoch trains): the record (best.pt, last.pt,
log) written in the training thread, as before, against the training thread's time with the
writer: the copy and hand-off (checkpoints.host_copy + submit), then, after --overlap-batches
training batches, the wait for what is left of the write. "hidden" = 1 - (copy and hand-off +
wait) / record. What the writer's thread takes from training on a busy CPU is not in it.

    python benchmarks/checkpoint_overhead.py [--device cpu|cuda] [--batches 6] [--overlap-batches 4]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlflow  # noqa: E402

from pipeline import checkpoints, interrupts, models, rng, runtime, train, tracking  # noqa: E402

TRAIN_IMAGES, TEST_IMAGES = 73_257, 26_032


def throughput(model, device, precision, bs, batches, training):
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    optimizer = train.make_optimizer(model, train.Hyper(epochs=1, lr=1e-4))
    x = torch.randn(bs, 3, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,), device=device)
    model.train(training)
    start = None
    for i in range(batches + 1):
        if i == 1:
            train._sync(device)
            start = time.perf_counter()
        with train.autocast(device, precision), torch.set_grad_enabled(training):
            loss = criterion(model(x).float(), y)
        if training:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    train._sync(device)
    return bs * batches / (time.perf_counter() - start), optimizer


def overlap(model, device, precision, bs, batches, snapshot, folder, client, run_id, metrics, rounds):
    """(record s, blocked s, waited s): the record (best.pt, last.pt, log) written in the training
    thread as before (save_checkpoint's way), then handed to a CheckpointWriter: the training
    thread is blocked for the copy and hand-off, then trains `batches` batches while it writes,
    then waits for whatever is left of the write. One tuple per round."""
    def record(state):
        checkpoints.atomic_save(state["model"], folder / "best.pt")
        checkpoints.atomic_save(state, folder / "last.pt")
        ts = mlflow.utils.time.get_current_time_millis()
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, ts, 1) for k, v in metrics.items()])

    written, blocked, waited = [], [], []
    writer = checkpoints.CheckpointWriter()
    for _ in range(rounds):
        start = time.perf_counter()
        with interrupts.critical():
            record(snapshot)
        written.append(time.perf_counter() - start)
        start = time.perf_counter()
        with interrupts.critical():
            state = checkpoints.host_copy(snapshot, device)
            writer.submit(functools.partial(record, state))
        blocked.append(time.perf_counter() - start)
        throughput(model, device, precision, bs, batches, True)  # the next epoch goes on meanwhile
        start = time.perf_counter()
        writer.wait()
        waited.append(time.perf_counter() - start)
    return list(zip(written, blocked, waited))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--overlap-batches", type=int, default=4,
                        help="training batches the background write overlaps (0: skip that table)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the overlap measurement")
    parser.add_argument("--archs", default="resnet,vgg")
    args = parser.parse_args()
    resolved = runtime.resolve(args.device, "auto")
    device, precision = resolved.device, resolved.precision
    print(f"torch {torch.__version__}, device {device}, {precision}, bs {args.bs}")
    print("| arch | train img/s | eval img/s | epoch s (73,257 + 26,032) | best.pt s | last.pt s (MB) "
          "| log s | overhead, last.pt every epoch | every 5 epochs |")
    print("|---|---|---|---|---|---|---|---|---|")
    hiding = []
    with tempfile.TemporaryDirectory() as tmp:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking.new_local_store(Path(tmp)))
        run_id = client.create_run(client.create_experiment("overhead")).info.run_id
        for arch in args.archs.split(","):
            model = models.build(arch).to(device, memory_format=torch.channels_last)
            train_ips, optimizer = throughput(model, device, precision, args.bs, args.batches, True)
            eval_ips, _ = throughput(model, device, precision, args.bs, args.batches, False)
            epoch_s = TRAIN_IMAGES / train_ips + TEST_IMAGES / eval_ips
            history = train.History()
            for epoch in range(1, 31):  # a full 30-epoch history, as the last epoch of a stage has
                history.epochs.append(train.EpochResult(epoch, 0.5, 0.5, 90.0, 90.0, epoch_s, train_ips))
            snapshot = {"format": checkpoints.CHECKPOINT_FORMAT, "epoch": 30, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "early_stopping": {"counter": 0, "lowest_loss": 0.5},
                        "history": history.to_state(), "rng": rng.rng_state(torch.Generator())}
            folder = Path(tmp) / arch
            start = time.perf_counter()
            checkpoints.atomic_save(model.state_dict(), folder / "best.pt")
            best_s = time.perf_counter() - start
            start = time.perf_counter()
            checkpoints.atomic_save(snapshot, folder / "last.pt")
            last_s = time.perf_counter() - start
            size_mb = (folder / "last.pt").stat().st_size / 2**20
            start = time.perf_counter()
            ts = mlflow.utils.time.get_current_time_millis()
            client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, ts, 1) for k, v in
                                              history.epochs[-1].metrics().items()])
            log_s = time.perf_counter() - start
            every = 100 * (best_s + last_s + log_s) / epoch_s
            every5 = 100 * (best_s + last_s / 5 + log_s) / epoch_s
            print(f"| {arch} | {train_ips:.0f} | {eval_ips:.0f} | {epoch_s:.0f} | {best_s:.2f} | "
                  f"{last_s:.2f} ({size_mb:.0f}) | {log_s:.3f} | {every:.2f}% | {every5:.2f}% |", flush=True)
            if args.overlap_batches:
                hiding.append((arch, overlap(model, device, precision, args.bs, args.overlap_batches, snapshot,
                                             folder, client, run_id, history.epochs[-1].metrics(), args.rounds)))
    if hiding:
        print(f"\nThe background writer, median of {args.rounds} rounds (hidden: each round's own share), "
              f"{args.overlap_batches} training batches while it writes:")
        print("| arch | record in the training thread s | with the writer: copy + hand-off s "
              "| wait after the batches s | hidden |")
        print("|---|---|---|---|---|")
        for arch, rounds in hiding:
            written, blocked, waited = (statistics.median(column) for column in zip(*rounds))
            hidden = statistics.median(1 - (b + w) / r for r, b, w in rounds)
            print(f"| {arch} | {written:.3f} | {blocked:.3f} | {waited:.3f} | {100 * hidden:.0f}% |")

if __name__ == "__main__":
    main()
