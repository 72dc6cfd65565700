"""Every random number generator a run uses (torch, its data generator, numpy, Python, CUDA):
seeded together, and saved and restored together so a resumed run draws what it would have."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(generator: torch.Generator, device: torch.device | None = None) -> dict:
    """Every RNG's state as tensors and plain numbers, loadable with weights_only=True; CUDA's only
    for the one device a run trains on (a CPU run never starts CUDA, and a resume that sees fewer
    GPUs, or others, restores it to the device it trains on then)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if device is not None and device.type == "cuda":
        state["cuda"] = [torch.cuda.get_rng_state(device)]
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device | None = None) -> None:
    """`state` back into every RNG; CUDA's into `device` when it is a GPU. The first saved state is
    the trained device's (a run trains on one; older checkpoints hold every visible GPU's)."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    if state.get("cuda") and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)
