"""On a CUDA GPU only (skipped elsewhere; benchmarks/gpu_check.sh runs it first): an epoch of
train.fit over the tensor pipeline (augmented, normalised batches, the step, the epoch's sums,
evaluation) waits for the GPU a fixed number of times, however many batches it has. A host sync
per batch (a blocking copy, `.item()`) would leave the GPU idle between batches; torch's sync
debug mode reports each one."""
import os
import warnings

import pytest
import torch

# gpu_check.sh sets SVHN_REQUIRE_CUDA=1: there a missing GPU is a failure, not a skip
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("SVHN_REQUIRE_CUDA"),
                                reason="needs a CUDA GPU")


def syncs_in_one_epoch(train_images: int) -> int:
    """Host syncs in one epoch of train.fit: `train_images` training images at bs 64, 128 test images."""
    from pipeline import batching, models, runtime, train

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (train_images + 128, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (train_images + 128,), generator=generator)
    train_batches = batching.TensorBatches(images[:train_images], labels[:train_images], 64, train=True,
                                       augment_images=True, device=device, generator=generator, channels_last=True)
    test_batches = batching.TensorBatches(images[train_images:], labels[train_images:], 64, train=False,
                                      augment_images=False, device=device, channels_last=True)
    model = models.build("resnet").to(device, memory_format=torch.channels_last)
    hyper = train.Hyper(epochs=1, lr=1e-3, log_every=10**6, precision=runtime.resolve_precision("auto", device))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.fit(model, train_batches, test_batches, hyper, device, generator, log=lambda line: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_an_epoch_waits_for_the_gpu_as_often_with_twice_the_batches():
    syncs_in_one_epoch(128)  # warm: cuDNN, the allocators, lazy initialisation
    five, ten = syncs_in_one_epoch(320), syncs_in_one_epoch(640)
    assert five > 0  # the epoch's totals are read once: the debug mode does see syncs
    assert ten == five, f"{ten - five} more host syncs for 5 more batches: one or more per batch"
