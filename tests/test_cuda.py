"""On a CUDA GPU only (skipped elsewhere; benchmarks/gpu_check.sh runs it first): the tensor
pipeline's training and evaluation batches, and the model step on them, queue their work without
waiting for the GPU. A host sync per batch (a blocking copy, `.item()`) would leave the GPU idle
between batches; torch's sync debug mode turns any such sync into an error."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_an_epoch_of_tensor_batches_and_model_steps_never_syncs_the_host():
    from pipeline import data, models, train

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (300,), generator=generator)
    model = models.build("resnet").to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    precision = train.resolve_precision("auto", device)
    batches = {train_: data.TensorBatches(images, labels, 64, train=train_, augment_images=train_,
                                          device=device, generator=generator, channels_last=True)
               for train_ in (True, False)}
    for train_, feed in batches.items():  # one epoch each, warm: cuDNN and the allocator set up
        run_epoch(model, feed, optimizer, criterion, device, precision, train_)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seen = {train_: run_epoch(model, feed, optimizer, criterion, device, precision, train_)
                for train_, feed in batches.items()}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seen == {True: 300, False: 300}


def run_epoch(model, feed, optimizer, criterion, device, precision, training) -> int:
    from pipeline import train

    model.train(training)
    seen = 0
    for x, y in feed:
        with train.autocast(device, precision), torch.set_grad_enabled(training):
            loss = criterion(model(x).float(), y)
        if training:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seen += len(y)
    return seen
