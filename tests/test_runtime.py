"""runtime: the device, precision and evaluation batch size a command resolves once."""
from pathlib import Path

import pytest
import torch

from pipeline import config, runtime
from pipeline.errors import ConfigError

CPU = torch.device("cpu")


def test_precision_and_device_choices():
    assert runtime.resolve_precision("fp32", CPU) == "fp32"
    assert runtime.resolve_precision("bf16", CPU) == "bf16"
    assert runtime.resolve_precision("auto", CPU) == ("bf16" if runtime.native_cpu_bf16() else "fp32")
    assert runtime.pick_device("cpu") == CPU
    assert runtime.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            runtime.pick_device("cuda")
        assert str(err.value) == ("parameter device=cuda, but no CUDA GPU is visible: "
                                  "use -P device=auto or -P device=cpu")


def test_native_bf16_follows_the_cpu_flags(monkeypatch, tmp_path):
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert runtime.native_cpu_bf16() == (" avx512_bf16" in text or " amx_bf16" in text)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "Path", lambda _: cpuinfo)  # the flags of other CPUs
    for flags, native in [("fpu avx2 avx512f", False), ("fpu avx512_bf16 sse", True),
                          ("fpu amx_bf16 amx_tile", True), ("fpu avx512_bf16 amx_bf16", True)]:
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        assert runtime.native_cpu_bf16() is native, flags
    cpuinfo.unlink()
    assert runtime.native_cpu_bf16() is False  # unreadable: assume emulated bf16


def test_auto_precision_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: False)
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    assert runtime.resolve("cpu", "auto").precision == "fp32"
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    assert runtime.resolve_precision("auto", CPU) == "bf16"
    assert runtime.resolve("cpu", "auto") == runtime.Runtime(CPU, "bf16", 0)


def test_eval_batch_size_is_bs_on_a_cpu_and_at_least_1024_on_cuda_unless_given():
    cpu, cuda = runtime.Runtime(CPU, "fp32"), runtime.Runtime(torch.device("cuda"), "bf16")
    assert [cpu.eval_batch_size(bs) for bs in (64, 2048)] == [64, 2048]
    assert [cuda.eval_batch_size(bs) for bs in (64, 2048)] == [1024, 2048]
    given = runtime.of(config.load("train", {"bs": "64", "eval_bs": "300", "device": "cpu"}))
    assert given.eval_batch_size(64) == 300
    assert runtime.Runtime(torch.device("cuda"), "bf16", 300).eval_batch_size(64) == 300


def test_params_record_what_auto_resolved_to():
    params = runtime.Runtime(CPU, "bf16", 0).params(bs=96, data_pipeline="tensor")
    assert params == {"device_resolved": "cpu", "precision_resolved": "bf16", "data_pipeline": "tensor",
                      "torch_threads": str(torch.get_num_threads()), "eval_bs_resolved": "96"}


def test_the_allocator_keeps_large_buffers_in_the_heap_unless_the_user_set_it(monkeypatch):
    """In a fresh process (mallopt is per process): glibc's thresholds are raised, so a 64 MiB
    buffer comes from the heap (arena grows) instead of its own mmap; a user's MALLOC_* is left."""
    import subprocess
    import sys

    probe = """
import ctypes
from pipeline import runtime
print(runtime.tune_allocator())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks  # blocks that have an mmap of their own
libc.malloc(64 << 20)
print(libc.mallinfo2().hblks - before)
"""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    tuned = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert tuned.stdout.split("\n")[:2] == ["allocator: glibc mmap/trim thresholds 256 MiB", "0"]  # no mmap'ed block
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    left = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert left.stdout.split("\n")[0].endswith("left as set") and left.stdout.split("\n")[1] == "1"  # mmap'ed
