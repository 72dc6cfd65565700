"""Figures: the seed's plotsample and plotloss, sweep comparisons, and the evaluation report."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def samples(images: np.ndarray, labels: np.ndarray, path: Path, seed: int = 0, count: int = 5) -> Path:
    """The seed's plotsample: `count` random images (N,3,H,W uint8) with their labels."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
    fig, axes = plt.subplots(1, len(picks), figsize=(2 * len(picks), 2.4))
    for ax, i in zip(np.atleast_1d(axes), picks):
        ax.imshow(np.transpose(images[i], (1, 2, 0)))
        ax.set_title(str(int(labels[i])))
        ax.axis("off")
    return _save(fig, path)


def loss(train_loss: list[float], test_loss: list[float], path: Path,
         val_loss: list[float] | None = None) -> Path:
    """The seed's plotloss: train vs test loss per epoch (and validation, when held out)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    epochs = range(1, len(train_loss) + 1)
    ax.plot(epochs, train_loss, color="red", marker="o", label="Trainloss")
    ax.plot(epochs, test_loss, color="orange", marker="o", label="Testloss")
    if val_loss:
        ax.plot(epochs, val_loss, color="blue", marker="o", label="Validationloss")
    ax.set_xlabel("Epochs")
    ax.set_ylabel("Loss (mean per sample)")
    ax.legend()
    return _save(fig, path)


def comparison(curves: dict[str, list[float]], path: Path, metric: str = "test_acc") -> Path:
    """One line per child run (repeat or sweep point): `metric` per epoch."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("Epochs")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    return _save(fig, path)


def confusion(matrix: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > matrix.max() / 2 else "black")
    fig.colorbar(im)
    return _save(fig, path)


def per_digit(accuracy: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(10), accuracy, color="steelblue")
    ax.set_xticks(range(10))
    ax.set_xlabel("digit")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    return _save(fig, path)


def gallery(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, path: Path,
            columns: int = 8) -> Path:
    """Misclassified images (N,3,H,W uint8) titled true -> predicted."""
    count = max(len(images), 1)
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p in zip(axes.flat, images, truth, predicted):
        ax.imshow(np.transpose(img, (1, 2, 0)))
        ax.set_title(f"{t} -> {p}", fontsize=8, color="red")
    return _save(fig, path)
