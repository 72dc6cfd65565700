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


def study(rows: list[dict], path: Path, split: str, title: str = "") -> Path:
    """The study at a glance: the stages in order, each linked to its parent by lineage (solid
    when it starts from the parent's best.pt, dashed when the parent is lineage only), with its
    run name and id, arch, accuracy and children; the champion's stage is outlined in gold.
    rows: dicts with stage, run_name, run_id, arch, best_acc, test_acc_at_best, children,
    from_parent_weights, champion ("" or e.g. "svhn-classifier v3")."""
    from matplotlib.patches import FancyBboxPatch

    count = len(rows)
    split_name = "val" if split == "val" else "test"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(2.3 * count, 8), 8.2),
                                      gridspec_kw={"height_ratios": [1.15, 1]})
    top.set_xlim(-0.1, count - 0.1)
    top.set_ylim(-0.15, 1.25)
    top.axis("off")
    width = 0.72
    for i, row in enumerate(rows):
        champion = bool(row.get("champion"))
        top.add_patch(FancyBboxPatch((i, 0.05), width, 0.8, boxstyle="round,pad=0.02",
                                     facecolor="#fff4cc" if champion else "#eef3fb",
                                     edgecolor="#d4a000" if champion else "#4a6fa5",
                                     linewidth=3 if champion else 1.2))
        centre = i + width / 2
        top.text(centre, 0.76, row["stage"], ha="center", va="center", fontsize=11, fontweight="bold")
        lines = [f"run: {row['run_name']}", f"id {row['run_id'][:8]}", f"arch {row['arch'] or '?'}"]
        if split == "val":
            lines.append(f"val {_percent(row['best_acc'])}")
        lines.append(f"test {_percent(row['test_acc_at_best'])}")
        lines.append(f"{row['children']} child run{'s' if row['children'] != 1 else ''}")
        top.text(centre, 0.42, "\n".join(lines), ha="center", va="center", fontsize=8.5, linespacing=1.5)
        if champion:
            top.text(centre, 0.98, f"\u2605 champion\n{row['champion']}", ha="center", va="center",
                     fontsize=9.5, fontweight="bold", color="#a07800")
        if i:
            weights = row.get("from_parent_weights")
            top.annotate("", xy=(i - 0.02, 0.45), xytext=(i - 1 + width + 0.02, 0.45),
                         arrowprops={"arrowstyle": "-|>", "color": "#333333", "lw": 1.6,
                                     "linestyle": "-" if weights else "--"})
            top.text(i - (1 - width) / 2, 0.5, "best.pt" if weights else "run id", ha="center",
                     va="bottom", fontsize=8, color="#333333")
    top.text(-0.05, -0.1, "arrows: parent \u2192 stage (parent_run_id); solid: starts from the parent's "
             "best.pt, dashed: lineage only (trains from scratch, as in the seed)", fontsize=8,
             color="#555555")
    if title:
        top.set_title(title, fontsize=12)

    positions = np.arange(count)
    test = [row["test_acc_at_best"] for row in rows]
    bars = [(test, "test acc at the selected checkpoint", "#4a6fa5")]
    if split == "val":
        bars.insert(0, ([row["best_acc"] for row in rows], "best val acc (selection)", "#9bbce0"))
    step = 0.8 / len(bars)
    for k, (values, label, colour) in enumerate(bars):
        x = positions - 0.4 + step * (k + 0.5)
        drawn = bottom.bar(x, np.nan_to_num(values), step * 0.95, label=label, color=colour)
        for rect, value in zip(drawn, values):
            bottom.text(rect.get_x() + rect.get_width() / 2, rect.get_height() + 1, _percent(value, 1),
                        ha="center", va="bottom", fontsize=8)
    for i, row in enumerate(rows):
        if row.get("champion"):
            bottom.axvspan(i - 0.45, i + 0.45, color="#fff4cc", zorder=0)
    bottom.set_xticks(positions, [row["stage"] for row in rows])
    bottom.set_xlim(-0.5, count - 0.5)
    bottom.set_ylim(0, 112)
    bottom.set_ylabel("accuracy (%)")
    bottom.legend(loc="upper left", fontsize=8, ncols=2)
    bottom.set_title(f"best of each stage (selection on {split_name})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _percent(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}%"
