"""Throughput, like for like: baselines, the factor table, the ceiling, and the full epoch a run logs.

Rows, each measured (same model, batch size, device, data and timing loop; alternating rounds,
each figure the best round; img/s over the timed batches after the warm-up: for a DataLoader
with workers the warm-up drains its prefetch queue and at least 4 queues' worth are timed, in
one pass over a split tiled for it (a second pass would restart the workers in the timed
window); else one warm-up batch and --batches timed):

  seed DataLoader    the seed's feed: torchvision SVHN, per-sample PIL transforms, DataLoader
                     as the seed sets it (CUDA: pin_memory, no workers; CPU: num_workers=4), NCHW, fp32
  tuned DataLoader   the same, as a user would tune it: num_workers = cores, persistent_workers,
                     pin_memory (CUDA), NCHW, fp32
  pipeline alone     ours (data_pipeline=tensor: uint8 batches augmented on the device), NCHW, fp32
  + channels_last    ours, channels_last, fp32
  + bf16             ours, channels_last, bf16 autocast (what precision=auto picks where bf16 is native)
  ceiling            the same model's forward, backward and RMSprop step on ready-made device
                     batches at the default's precision, channels_last: no data path at all

Then the headline epoch: runner.train_in_run (the `train` entry point's code, into a temporary
SQLite tracking store) for 2 epochs over --epoch-images training images (the synthetic set tiled)
and --epoch-test-images test images, at --eval-bs and --compile as `-P eval_bs=... compile=...`
would run it. Its full epoch is the wall time from the end of epoch 1 to the end of epoch 2 as
the run goes: training, evaluation, the wait for epoch 1's record (best.pt, last.pt, metrics,
written in the background while epoch 2 trains), epoch 2's hand-off; "after the last epoch" is
the rest of the run (the wait for epoch 2's record, the totals, the loss plot). Its logged
train_images_per_s over the ceiling is the fraction of the hardware our training loop gets.

    python benchmarks/throughput.py                                  # CPU, MyResNet, bs 256
    python benchmarks/throughput.py --device cuda --batches 30 --epoch-images 73257 --epoch-test-images 26032
    python benchmarks/throughput.py --device cuda --rows ceiling --compile max-autotune --epoch-images 73257
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import batching, config, data, models, runtime, train  # noqa: E402

ROWS = ("seed DataLoader", "tuned DataLoader", "pipeline alone", "+ channels_last", "+ bf16", "ceiling")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_queue(batches) -> int:
    """Batches a DataLoader's workers have made ahead when the first one arrives (its prefetch
    queue): 0 for our tensor batches and for a loader without workers."""
    loader = getattr(batches, "loader", None)
    if loader is None or not loader.num_workers:
        return 0
    return loader.num_workers * (loader.prefetch_factor or 2)


def timed_batches(queue: int, requested: int) -> tuple[int, int]:
    """(warm-up, timed) batches for a fair figure behind a prefetch queue of `queue` batches: the
    warm-up drains it (made before the clock starts, it would count as free), and at least 4
    queues are timed."""
    return 1 + queue, max(requested, 4 * queue)


def batches_needed(requested: int) -> int:
    """The most batches any row reads in one measurement, so no DataLoader row starts another
    pass inside the timed window: the larger queue is the seed's 4 workers' or the tuned
    loader's (cores), each worker 2 batches ahead (DataLoader's default prefetch_factor)."""
    return sum(timed_batches(2 * max(4, cores()), requested))


def measure(batches, model, device, optimizer, batches_to_time, training, precision):
    """img/s over the timed batches after the warm-up ones (timed_batches), in one pass."""
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    model.train(training)
    seen, start = 0, None
    warmup, batches_to_time = timed_batches(loader_queue(batches), batches_to_time)
    iterator = iter(batches)
    for index in range(warmup + batches_to_time):
        try:
            x, y = next(iterator)
        except StopIteration:  # the ceiling's few ready-made batches, again and again
            iterator = iter(batches)
            x, y = next(iterator)
        if device.type == "cuda":  # as train.fit: a CUDA graph (compile modes) step per batch
            torch.compiler.cudagraph_mark_step_begin()
        with train.autocast(device, precision), torch.set_grad_enabled(training):
            out = model(x)
            loss = criterion(out.float(), y)
        if training:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if index == warmup - 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        elif index >= warmup:
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def loader_batches(cfg, dataset, split, device, bs, generator, tuned: bool, channels_last: bool):
    """The seed's torchvision pipeline; tuned: num_workers = cores, persistent_workers, pin_memory."""
    seed_workers = 0 if device.type == "cuda" else 4
    batches = batching.batches(cfg.replace(data_pipeline="torchvision", num_workers=seed_workers),
                           dataset, split, device, bs, generator, channels_last)
    if tuned:
        old = batches.loader
        batches.loader = torch.utils.data.DataLoader(
            old.dataset, batch_size=bs, shuffle=split == "train", num_workers=cores(),
            persistent_workers=True, pin_memory=device.type == "cuda", generator=generator)
    return batches


def ready_made(device, bs, count=4):
    """Device batches that need no data path: normalised-looking noise, channels_last."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        x = torch.randn(bs, 3, batching.CROP, batching.CROP, generator=generator).to(device)
        y = torch.randint(0, 10, (bs,), generator=generator).to(device)
        out.append((x.contiguous(memory_format=torch.channels_last), y))
    return out


def run_row(row, arch, cfg, dataset, device, args, default_precision):
    torch.manual_seed(0)
    channels_last = row in ("+ channels_last", "+ bf16", "ceiling")
    precision = default_precision if row == "ceiling" else "bf16" if row == "+ bf16" else "fp32"
    model = models.build(arch).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = train.compiled(model, args.compile_mode) if row in ("+ bf16", "ceiling") else model
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.99)
    generator = torch.Generator().manual_seed(0)
    if row == "ceiling":
        train_batches = test_batches = ready_made(device, args.bs)
    elif row.endswith("DataLoader"):
        tuned = row.startswith("tuned")
        train_batches = loader_batches(cfg, dataset, "train", device, args.bs, generator, tuned, channels_last)
        test_batches = loader_batches(cfg, dataset, "test", device, args.bs, None, tuned, channels_last)
    else:
        tensor_cfg = cfg.replace(data_pipeline="tensor")
        train_batches = batching.batches(tensor_cfg, dataset, "train", device, args.bs, generator, channels_last)
        test_batches = batching.batches(tensor_cfg, dataset, "test", device, args.bs, None, channels_last)
    reset_peak(device)
    train_ips = measure(train_batches, net, device, optimizer, args.batches, True, precision)
    eval_ips = measure(test_batches, net, device, optimizer, args.batches, False, precision)
    return {"arch": arch, "row": row, "precision": precision, "channels_last": channels_last,
            "train_img_s": train_ips, "eval_img_s": eval_ips, "peak_mb": peak_mb(device)}


def tiled(split: data.Split, count: int) -> data.Split:
    """`split`'s images repeated to `count` rows (the same .mat rows, for both pipelines)."""
    repeat = -(-count // len(split.labels))
    return data.Split(split.role, split.images.repeat(repeat, 1, 1, 1)[:count],
                      split.labels.repeat(repeat)[:count], split.source, split.file_sha256,
                      split.indices.repeat(repeat)[:count], split.file_rows)


def tiled_data(dataset: data.SVHNData, train_images: int, test_images: int) -> data.SVHNData:
    return data.SVHNData(dataset.folder, tiled(dataset.train, train_images), tiled(dataset.test, test_images),
                         None, dataset.digest)


def full_epoch(arch, cfg, dataset, args) -> dict:
    """Two epochs of the `train` entry point's code (runner.train_in_run) into a temporary
    tracking store; epoch 2's wall time covers everything a run does in an epoch."""
    import mlflow

    from pipeline import runner, tracking

    big = tiled_data(dataset, args.epoch_images, args.epoch_test_images)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.pop("MLFLOW_RUN_ID", None)
        os.environ["MLFLOW_TRACKING_URI"] = tracking.new_local_store(Path(tmp))
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        client = tracking.client()
        run_id = client.create_run("0", run_name=f"throughput {arch}").info.run_id
        run_cfg = cfg.replace(arch=arch, epochs=2, bs=args.bs, log_every=10**6, precision=args.precision,
                              compile=args.compile, eval_bs=args.eval_bs, patience=99)
        marks = [time.perf_counter()]

        def mark(end):  # called once the epoch is evaluated and its record handed to the writer
            marks.append(time.perf_counter())

        runner.train_in_run(run_id, run_cfg, big, arch=arch, runtime=runtime.of(run_cfg), callbacks=(mark,))
        after_last_epoch_s = time.perf_counter() - marks[-1]
        tracking.end_run(run_id, "FINISHED")

        def values(key):
            return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

        system = {key: values(key) for key in client.get_run(run_id).data.metrics if key.startswith("system/")
                  and ("utilization" in key or "memory_usage_megabytes" in key)}
        params = client.get_run(run_id).data.params
    return {"arch": arch, "train_images": args.epoch_images, "test_images": args.epoch_test_images,
            "bs": args.bs, "precision": params["precision_resolved"], "eval_bs": int(params["eval_bs_resolved"]),
            "compile": params["compile"], "full_epoch_s": [b - a for a, b in zip(marks, marks[1:])],
            "after_last_epoch_s": after_last_epoch_s,
            "logged_epoch_time_s": values("epoch_time_s"), "logged_train_img_s": values("train_images_per_s"),
            "system_metrics": system}


def describe(device) -> str:
    """The torch version and device every figure names."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        from pipeline.tracking import cpu_model
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {device.type} ({name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archs", default="resnet")
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the rows")
    parser.add_argument("--rows", default=",".join(ROWS), help="a subset of: " + ", ".join(ROWS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", nargs="?", const="true", default="false",
                        help="torch.compile the + bf16 and ceiling rows and the epoch: true (default mode) "
                             "or a mode, as -P compile=...")
    parser.add_argument("--eval-bs", type=int, default=0, help="the epoch's eval_bs (0: automatic, as -P eval_bs=0)")
    parser.add_argument("--precision", default="auto", help="the default path's precision (auto|fp32|bf16)")
    parser.add_argument("--epoch-images", type=int, default=2048,
                        help="training images of the full-epoch run (0: no full epoch); SVHN: 73257")
    parser.add_argument("--epoch-test-images", type=int, default=1024, help="its test images; SVHN: 26032")
    parser.add_argument("--json", default="", help="write the results here too")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",")]
    if set(rows) - set(ROWS):
        parser.error(f"unknown --rows {', '.join(sorted(set(rows) - set(ROWS)))}: choose from {', '.join(ROWS)}")
    checked = config.load("train", {"compile": args.compile, "eval_bs": args.eval_bs})  # one line if bad
    args.compile, args.compile_mode = checked.compile, checked.compile_mode

    device = runtime.pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    default_precision = runtime.resolve_precision(args.precision, device)
    cfg = config.load("train", {"dataset": "synthetic", "device": device.type})
    dataset = data.load(cfg)
    needed = batches_needed(args.batches) * args.bs  # a DataLoader row in one pass of its split
    loader_dataset = tiled_data(dataset, max(needed, dataset.n_train), max(needed, dataset.n_test))
    where = describe(device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"{where}; bs {args.bs}; {dataset.n_train} train / {dataset.n_test} test images in {dataset.folder}; "
          f"default precision {default_precision}; load average {' '.join(f'{v:.2f}' for v in load)}", flush=True)
    results = []
    for arch in args.archs.split(","):
        for round_ in range(args.rounds):
            for row in rows:
                # the tensor rows keep the split as it is: a tiled one would inflate their GPU peak memory
                result = run_row(row, arch, cfg, loader_dataset if row.endswith("DataLoader") else dataset,
                                 device, args, default_precision)
                results.append({**result, "round": round_ + 1})
                print(f"  {arch} {row:17s} {result['precision']} round {round_ + 1}: train {result['train_img_s']:8.0f} "
                      f"img/s  eval {result['eval_img_s']:8.0f} img/s  peak {result['peak_mb']:6.0f} MB", flush=True)
    best = {}
    print(f"\n{where}, bs {args.bs}, best of {args.rounds} rounds x {args.batches} batches "
          f"(a DataLoader with workers: at least 4 prefetch queues' worth)\n")
    print("| model | row | precision | layout | train img/s | eval img/s | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        for row in rows:
            mine = [r for r in results if r["arch"] == arch and r["row"] == row]
            best[arch, row] = b = {k: max(r[k] for r in mine) for k in ("train_img_s", "eval_img_s", "peak_mb")}
            print(f"| {arch} | {row} | {mine[0]['precision']} | {'channels_last' if mine[0]['channels_last'] else 'NCHW'} "
                  f"| {b['train_img_s']:,.0f} | {b['eval_img_s']:,.0f} | {b['peak_mb']:,.0f} |")
        ours = "+ bf16" if default_precision == "bf16" else "+ channels_last"
        for baseline in ("tuned DataLoader", "seed DataLoader"):
            if (arch, ours) in best and (arch, baseline) in best:
                print(f"| {arch} | **ours ({ours}) / {baseline}** | | | **{best[arch, ours]['train_img_s'] / best[arch, baseline]['train_img_s']:.2f}x** "
                      f"| **{best[arch, ours]['eval_img_s'] / best[arch, baseline]['eval_img_s']:.2f}x** | |")
        if (arch, ours) in best and (arch, "ceiling") in best:
            print(f"| {arch} | ours ({ours}) / ceiling | | | {best[arch, ours]['train_img_s'] / best[arch, 'ceiling']['train_img_s']:.2f} "
                  f"| {best[arch, ours]['eval_img_s'] / best[arch, 'ceiling']['eval_img_s']:.2f} | |")
    epochs = {}
    if args.epoch_images:
        for arch in args.archs.split(","):
            epochs[arch] = e = full_epoch(arch, cfg, dataset, args)
            steady = e["logged_train_img_s"][-1]
            ceiling = best.get((arch, "ceiling"), {}).get("train_img_s")
            print(f"\n{arch}: `train` run, {e['train_images']} train + {e['test_images']} test images, bs {e['bs']}, "
                  f"eval_bs {e['eval_bs']}, compile {e['compile']}, {e['precision']} ({where}):\n"
                  f"  full epoch (train, eval, checkpoints, logging): "
                  f"{', '.join(f'{s:.2f}' for s in e['full_epoch_s'])} s (epochs 1, 2; epoch 1 includes start-up), "
                  f"after the last epoch {e['after_last_epoch_s']:.2f} s\n"
                  f"  logged epoch_time_s {', '.join(f'{s:.2f}' for s in e['logged_epoch_time_s'])} s, "
                  f"train_images_per_s {', '.join(f'{s:.0f}' for s in e['logged_train_img_s'])}"
                  + (f"\n  train throughput / ceiling: {steady:.0f} / {ceiling:.0f} = {steady / ceiling:.2f}" if ceiling else ""),
                  flush=True)
            for key, series in sorted(e["system_metrics"].items()):
                print(f"  {key}: mean {sum(series) / len(series):.1f} over {len(series)} samples")
    if args.json:
        Path(args.json).write_text(json.dumps({"where": where, "load_average": load, "args": vars(args),
                                               "results": results, "epochs": epochs}, indent=1))


if __name__ == "__main__":
    main()
