"""Throughput: the seed's input pipeline against ours, in one process, alternating.

seed-style: torchvision's SVHN dataset, per-sample PIL transforms (RandomCrop, RandomRotation,
ToTensor, Normalize) in a DataLoader, as the seed feeds its model (CPU: num_workers=4; CUDA:
pin_memory, no workers), NCHW, fp32.
ours: the .mat decoded once to uint8 tensors, crop/rotation/normalisation on whole batches on
the training device, channels_last, bf16 autocast where the hardware computes bf16 natively
(CUDA; CPUs with AVX512-BF16 or AMX), and on CUDA the data resident on the GPU.
Same data (an SVHN-format .mat), models, batch size and device for both.

    python benchmarks/throughput.py                      # CPU, MyResNet and MyVgg, bs 256
    python benchmarks/throughput.py --device cuda --epoch-images 73257
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import config, data, models, train  # noqa: E402


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


def measure(batches, model, device, optimizer, batches_to_time, training, precision):
    """img/s over `batches_to_time` batches after one warm-up batch."""
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    model.train(training)
    seen, start = 0, None
    iterator = iter(batches)
    for index in range(batches_to_time + 1):
        try:
            x, y = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            x, y = next(iterator)
        with train.autocast(device, precision), torch.set_grad_enabled(training):
            out = model(x)
            loss = criterion(out.float(), y)
        if training:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if index == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        else:
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def run_pipeline(name, arch, cfg, dataset, device, args):
    torch.manual_seed(0)
    ours = name == "ours"
    model = models.build(arch).to(device)
    if ours:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if ours and args.compile else model
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.99)
    pipeline_cfg = cfg.replace(data_pipeline="tensor" if ours else "torchvision",
                               num_workers=0 if ours or device.type == "cuda" else 4)
    generator = torch.Generator().manual_seed(0)
    train_batches = data.batches(pipeline_cfg, dataset, "train", device, args.bs, generator, ours)
    test_batches = data.batches(pipeline_cfg, dataset, "test", device, args.bs, None, ours)
    precision = train.resolve_precision(args.precision, device) if ours else "fp32"
    reset_peak(device)
    train_ips = measure(train_batches, net, device, optimizer, args.batches, True, precision)
    eval_ips = measure(test_batches, net, device, optimizer, args.batches, False, precision)
    return {"arch": arch, "pipeline": name, "precision": precision, "train_img_s": train_ips,
            "eval_img_s": eval_ips, "peak_mb": peak_mb(device)}


def epoch_time(arch, dataset, device, args, images):
    """Seconds for one training epoch of `images` images on our pipeline (the set tiled)."""
    repeat = -(-images // dataset.n_train)
    x = dataset.train_images.repeat(repeat, 1, 1, 1)[:images]
    y = dataset.train_labels.repeat(repeat)[:images]
    torch.manual_seed(0)
    model = models.build(arch).to(device).to(memory_format=torch.channels_last)
    batches = data.TensorBatches(x, y, args.bs, train=True, augment_images=True, device=device,
                                 generator=torch.Generator().manual_seed(0), channels_last=True)
    hyper = train.Hyper(epochs=2, lr=1e-3, tol=0.0, patience=99, log_every=10**9, compile=args.compile,
                        precision=train.resolve_precision(args.precision, device))
    empty = data.TensorBatches(x[:args.bs], y[:args.bs], args.bs, train=False, augment_images=False,
                               device=device, channels_last=True)
    history = train.fit(model, batches, empty, hyper, device, torch.Generator().manual_seed(0),
                        log=lambda m: None)
    return history.epochs[-1].epoch_time_s, history.epochs[-1].train_images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archs", default="resnet,vgg")
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per pipeline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--precision", default="auto", help="ours: auto|fp32|bf16 (seed-style: fp32)")
    parser.add_argument("--epoch-images", type=int, default=0,
                        help="also time one full epoch of this many images on our pipeline")
    parser.add_argument("--json", default="", help="write the results here too")
    args = parser.parse_args()

    device = train.pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cfg = config.load("train", {"dataset": "synthetic", "device": device.type})
    dataset = data.load(cfg)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, bs {args.bs}, "
          f"{dataset.n_train} train / {dataset.n_test} test images in {dataset.folder}", flush=True)
    results = []
    for arch in args.archs.split(","):
        for round_ in range(args.rounds):
            for name in ("seed-style", "ours"):
                row = run_pipeline(name, arch, cfg, dataset, device, args)
                row["round"] = round_ + 1
                results.append(row)
                print(f"  {arch:7s} {name:10s} {row['precision']} round {round_ + 1}: train {row['train_img_s']:8.0f} img/s  "
                      f"eval {row['eval_img_s']:8.0f} img/s  peak {row['peak_mb']:7.0f} MB", flush=True)
    print("\n| model | pipeline | train img/s | eval img/s | peak memory (MB) |")
    print("|---|---|---|---|---|")
    summary = {}
    for arch in args.archs.split(","):
        for name in ("seed-style", "ours"):
            rows = [r for r in results if r["arch"] == arch and r["pipeline"] == name]
            best = {k: max(r[k] for r in rows) for k in ("train_img_s", "eval_img_s", "peak_mb")}
            summary[(arch, name)] = best
            print(f"| {arch} | {name} | {best['train_img_s']:.0f} | {best['eval_img_s']:.0f} | "
                  f"{best['peak_mb']:.0f} |")
        seed, ours = summary[(arch, "seed-style")], summary[(arch, "ours")]
        print(f"| {arch} | **ratio ours/seed** | **{ours['train_img_s'] / seed['train_img_s']:.2f}x** | "
              f"**{ours['eval_img_s'] / seed['eval_img_s']:.2f}x** | |")
    epochs = {}
    if args.epoch_images:
        for arch in args.archs.split(","):
            seconds, ips = epoch_time(arch, dataset, device, args, args.epoch_images)
            epochs[arch] = {"epoch_s": seconds, "train_img_s": ips}
            print(f"\n{arch}: one epoch of {args.epoch_images} images on our pipeline: {seconds:.2f} s "
                  f"(steady {ips:.0f} img/s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "epochs": epochs}, indent=1))


if __name__ == "__main__":
    main()
