"""Real handwritten digits in SVHN's .mat format, for a learning check on real images offline.

scikit-learn ships the UCI "optical recognition of handwritten digits" set inside its wheel
(1,797 scans of digits written by 43 people, 8x8 pixels, 17 grey levels), so it needs no network.
This writes them as SVHN-format train_32x32.mat / test_32x32.mat (X: 32x32x3xN uint8, y: Nx1 with
10 for the digit 0), upscaled bilinearly to 32x32 and grey in all three channels, split
stratified by a fixed seed. The pipeline then reads them like SVHN's own files:

    pip install scikit-learn==1.9.1      # only for this script; the project does not need it
    python benchmarks/real_digits.py data/real-digits
    python benchmarks/learnability.py --data-dir data/real-digits ...

Nothing is drawn or altered beyond the upscaling: these are the scans as scikit-learn has them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F


def svhn_format(images: np.ndarray, labels: np.ndarray) -> dict:
    """(N, 8, 8) ink levels 0-16 and digits 0-9 -> SVHN's X (32, 32, 3, N) uint8 and y (N, 1)."""
    ink = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(ink, size=(32, 32), mode="bilinear", align_corners=False)
    grey = (big.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()  # (N, 32, 32)
    x = np.repeat(grey[..., None], 3, axis=3).transpose(1, 2, 3, 0)           # (32, 32, 3, N)
    y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)     # SVHN writes 0 as 10
    return {"X": np.ascontiguousarray(x), "y": y}


def stratified_test_rows(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask: about test_fraction of each digit's rows, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        test[rng.permutation(rows)[: round(len(rows) * test_fraction)]] = True
    return test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folder", help="where to write train_32x32.mat and test_32x32.mat")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1412)
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("error: scikit-learn is not installed: pip install scikit-learn==1.9.1", file=sys.stderr)
        return 2
    digits = load_digits()
    test = stratified_test_rows(digits.target, args.test_fraction, args.seed)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", ~test), ("test", test)):
        scipy.io.savemat(folder / f"{split}_32x32.mat", svhn_format(digits.images[rows], digits.target[rows]))
        print(f"{folder / f'{split}_32x32.mat'}: {rows.sum()} images, "
              f"per digit {np.bincount(digits.target[rows]).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
