"""What the registered model computes and how its predictions are scored, without MLflow:
the served Classifier against the training-time evaluation path, and the evaluation metrics."""
import numpy as np
import pytest
import torch

from pipeline import batching, models
from pipeline.predict import confusion_metrics
from pipeline.registry import Classifier


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = models.build("resnet")
    with torch.no_grad():  # running statistics of a shifted input, so BatchNorm is not the identity
        for _ in range(3):
            net(torch.randn(16, 3, 28, 28) * 2 + 0.5)
    return net.eval()


def training_time_probabilities(net, nchw_uint8):
    """How training evaluates a test image: CenterCrop(28), ToTensor, Normalize, then the net."""
    with torch.no_grad():
        return torch.softmax(net(batching.normalise(batching.center_crop(nchw_uint8))), dim=1)


def test_classifier_equals_the_training_time_evaluation_path(net):
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    expected = training_time_probabilities(net, images)
    with torch.no_grad():
        served = Classifier(net).eval()(images.permute(0, 2, 3, 1).contiguous())  # SVHN's (N,32,32,3)
    assert served.shape == (8, 10)
    assert torch.allclose(served, expected, atol=1e-6)
    assert torch.equal(served.argmax(1), expected.argmax(1))
    # the premise: without the normalisation (or with another crop) the answer differs
    with torch.no_grad():
        unnormalised = torch.softmax(net(batching.center_crop(images).float() / 255), dim=1)
        shifted = torch.softmax(net(batching.normalise(images[..., 1:29, 1:29])), dim=1)
    assert not torch.allclose(unnormalised, expected, atol=1e-3)
    assert not torch.allclose(shifted, expected, atol=1e-3)


def test_classifier_state_carries_the_seed_normalisation(net):
    buffers = dict(Classifier(net).named_buffers())
    assert buffers["mean"].flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert buffers["std"].flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_confusion_metrics_count_rows_by_true_digit():
    truth = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    predicted = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 9])
    matrix, per_digit, accuracy = confusion_metrics(truth, predicted)
    expected = np.zeros((10, 10), dtype=np.int64)
    for t, p in zip(truth, predicted):
        expected[t, p] += 1
    assert matrix.dtype == np.int64 and np.array_equal(matrix, expected)
    assert matrix[0, 1] == 1 and matrix[1, 0] == 0  # rows are the truth, columns the prediction
    assert per_digit == pytest.approx([200 / 3, 50.0, 100.0, 50.0, 0, 0, 0, 0, 0, 0])
    assert per_digit[4:] == [0.0] * 6  # digits without images read 0, not nan
    assert accuracy == pytest.approx(60.0)


def test_confusion_metrics_of_perfect_and_hopeless_predictions():
    truth = np.arange(20) % 10
    matrix, per_digit, accuracy = confusion_metrics(truth, truth)
    assert np.array_equal(matrix, 2 * np.eye(10, dtype=np.int64)) and per_digit == [100.0] * 10
    assert accuracy == 100.0
    _, per_digit, accuracy = confusion_metrics(truth, (truth + 1) % 10)
    assert per_digit == [0.0] * 10 and accuracy == 0.0
