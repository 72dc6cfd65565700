"""compile=<mode>: train.fit runs the model through torch.compile and trains as eager does.

One small compile of a tiny model on this CPU (about 3 s with inductor's cache warm, 9 s cold);
the CUDA graph modes (reduce-overhead, max-autotune) are measured by benchmarks/gpu_check.sh on
a GPU, not here. Kept out of mutation testing (pyproject's test selection) for its cost.
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from pipeline import train
from pipeline.train import Hyper

from support.digits import Tiny, batches

CPU = torch.device("cpu")


def test_eager_is_the_model_itself():
    model = Tiny()
    assert train.compiled(model, "") is model


def test_a_compiled_fit_trains_as_the_eager_one():
    torch.manual_seed(0)
    eager_model = Tiny()
    compiled_model = copy.deepcopy(eager_model)
    histories = []
    torch._dynamo.reset()
    counters.clear()
    for model, mode in ((eager_model, ""), (compiled_model, "default")):
        histories.append(train.fit(model, batches(1, bs=24), batches(2, bs=24), Hyper(epochs=2, lr=1e-2, compile=mode), CPU,
                                   torch.Generator().manual_seed(0), log=lambda m: None))
    assert counters["stats"]["unique_graphs"] >= 2  # the compiled fit ran compiled graphs (train, eval)
    eager, compiled = histories
    for a, b in zip(eager.epochs, compiled.epochs):
        assert (a.train_acc, a.test_acc) == (b.train_acc, b.test_acc)
        assert (b.train_loss, b.test_loss) == pytest.approx((a.train_loss, a.test_loss), rel=1e-5)
    for name, value in eager_model.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
