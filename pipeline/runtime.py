"""Where and how the arithmetic runs: device, precision and evaluation batch size.

Resolved once per command into a `Runtime` (the CLI for a stage, or the driver of a stage with
executor=ray) and passed down: nothing below resolves `device=auto` or `precision=auto` again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

AUTO_EVAL_BS_CUDA = 1024
# glibc's malloc: above 32 MiB (its dynamic mmap cap) every large activation buffer is mmap'ed and
# unmapped each step, and freed heap top is trimmed back to the kernel; 256 MiB for both keeps them
# in the heap. MyVgg's CPU training step at bs 32: 191 -> 119 ms (MyResNet: unchanged)
ALLOCATOR_THRESHOLD = 256 * 1024 * 1024
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def tune_allocator() -> str:
    """Raise glibc's mmap and trim thresholds in this process (what MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ do, for processes we start or not: Ray workers too). Left alone
    where either variable is set (the user's choice) or the C library is not glibc. Returns what
    was done (benchmarks/allocator.py prints it)."""
    import ctypes
    import os

    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return "allocator: MALLOC_*_THRESHOLD_ set in the environment: left as set"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "allocator: not glibc: left as it is"
    done = mallopt(M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD)
    return f"allocator: glibc mmap/trim thresholds {ALLOCATOR_THRESHOLD >> 20} MiB" if done else \
        "allocator: glibc refused the thresholds: left as it is"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str                  # fp32 | bf16 (autocast)
    eval_bs: int = 0                # the eval_bs param; 0 = automatic (eval_batch_size)

    @property
    def device_type(self) -> str:
        return self.device.type

    def eval_batch_size(self, bs: int) -> int:
        """eval_bs, or when it is 0: bs on a CPU (1024 measured no faster there, at 4x the memory),
        max(bs, 1024) on CUDA (a quarter of the kernel launches and host round trips)."""
        if self.eval_bs:
            return self.eval_bs
        return max(bs, AUTO_EVAL_BS_CUDA) if self.device_type == "cuda" else bs

    def params(self, bs: int, data_pipeline: str) -> dict[str, str]:
        """What `device=auto`, `precision=auto` and `eval_bs=0` resolved to, and torch's threads."""
        return {"device_resolved": str(self.device), "precision_resolved": self.precision,
                "data_pipeline": data_pipeline, "torch_threads": str(torch.get_num_threads()),
                "eval_bs_resolved": str(self.eval_batch_size(bs))}


def resolve(device: str = "auto", precision: str = "auto", eval_bs: int = 0) -> Runtime:
    """The Runtime that these params resolve to on this machine (device=cuda without a GPU: refused)."""
    picked = pick_device(device)
    return Runtime(picked, resolve_precision(precision, picked), eval_bs)


def of(cfg) -> Runtime:
    """The Runtime of a Config's device, precision and eval_bs (compile on a CPU without a C++
    compiler: refused)."""
    resolved = resolve(cfg.device, cfg.precision, cfg.eval_bs)
    if cfg.compile_mode and resolved.device_type == "cpu":
        check_cpp_compiler(cfg.compile)
    return resolved


def check_cpp_compiler(mode: str) -> None:
    """Inductor builds CPU kernels with a C++ compiler and Python's headers: without them the first
    training step fails with a traceback, after the run exists. The compiler is found as inductor
    finds it (CXX, then g++), Python.h where it looks (sysconfig's include path)."""
    import sysconfig

    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - InvalidCxxCompiler, or a compiler that does not run
        raise ConfigError(f"-P compile={mode} needs a C++ compiler on CPU, and none works here "
                          f"({type(err).__name__}): install g++ (or set CXX to one), or pass -P compile=false") from None
    headers = Path(sysconfig.get_path("include"))
    if not (headers / "Python.h").is_file():
        raise ConfigError(f"-P compile={mode} needs Python's C headers on CPU, and {headers}/Python.h is not there: "
                          f"install them (python3-dev, or your Python's -dev package), or pass -P compile=false")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parameter device=cuda, but no CUDA GPU is visible: use -P device=auto or -P device=cpu")
    return torch.device(name)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA GPUs with native bf16 and on CPUs with it (measured 2x faster here), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":  # emulated bf16 (e.g. an RTX 2060S) is slower than fp32
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if native_cpu_bf16() else "fp32"
