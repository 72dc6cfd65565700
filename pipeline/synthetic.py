"""A deterministic, learnable, SVHN-like digit set written in SVHN's own .mat format.

Each image is a house-number crop: a centred digit on a coloured background, with parts of
neighbouring (distractor) digits at the edges, a slight tilt, uneven lighting, blur and noise.
Image i of a split depends only on (seed, split, i), so a larger set extends a smaller one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .errors import DataError
from .files import atomic_write

GENERATOR_VERSION = 6  # 6: the same images as 5, in files with a fixed header (MAT_HEADER)
HARD_FRACTION = 0.1
SPLIT_IDS = {"train": 0, "test": 1}
_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _luminance(colour) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _contrasting_colours(rng: np.random.Generator, low: float, high: float) -> tuple[tuple, tuple]:
    """Background and digit colours `low`..`high` apart in luminance; mostly dark digits on
    light plates, as on most house-number plates, sometimes the reverse."""
    dark_digit = rng.random() < 0.7
    while True:
        bg = rng.integers(0, 256, 3)
        fg = rng.integers(0, 256, 3)
        contrast = _luminance(bg) - _luminance(fg)
        if low < (contrast if dark_digit else -contrast) < high:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 32x32x3 uint8 image of `label`."""
    hard = rng.random() < HARD_FRACTION  # faded, blurred plates: what makes real SVHN hard
    bg, fg = _contrasting_colours(rng, 35, 70) if hard else _contrasting_colours(rng, 120, 256)
    canvas = 48  # drawn larger, then cropped, so rotation leaves no corners
    img = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(20, 29))
    font = _font(size)
    cx = canvas / 2 + rng.uniform(-2.0, 2.0)
    cy = canvas / 2 + rng.uniform(-2.0, 2.0)
    draw.text((cx, cy), str(label), fill=fg, font=font, anchor="mm")
    spacing = size * rng.uniform(0.85, 1.05)
    for side in (-1, 1):  # neighbours of a house number, cut off by the crop
        if rng.random() < 0.6:
            draw.text((cx + side * spacing, cy), str(int(rng.integers(10))), fill=fg, font=font,
                      anchor="mm")
    img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, fillcolor=bg)
    off = (canvas - 32) // 2
    img = img.crop((off, off, off + 32, off + 32))
    radius = float(rng.uniform(1.0, 1.6) if hard else rng.uniform(0.0, 1.0))
    if radius > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(img, dtype=np.float32)
    ramp = np.linspace(-1, 1, 32, dtype=np.float32)
    direction = rng.uniform(-1, 1, 2).astype(np.float32)
    light = 1 + 0.25 * (direction[0] * ramp[None, :] + direction[1] * ramp[:, None])
    pixels = pixels * light[..., None] + rng.normal(0, rng.uniform(2, 10), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate(split: str, count: int, seed: int = 1412) -> tuple[np.ndarray, np.ndarray]:
    """(X: (32,32,3,N) uint8, y: (N,1) uint8 with 10 meaning digit 0), as in SVHN's .mat."""
    images = np.empty((32, 32, 3, count), dtype=np.uint8)
    labels = np.empty((count, 1), dtype=np.uint8)
    for i in range(count):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
        digit = int(rng.integers(10))
        images[..., i] = render(digit, rng)
        labels[i, 0] = 10 if digit == 0 else digit
    return images, labels


MAT_HEADER = b"MATLAB 5.0 MAT-file, written by svhn-mlflow".ljust(116)


def write_mat(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically, so two processes making the same set never read a half-written file."""
    import scipy.io

    with atomic_write(path) as fh:
        scipy.io.savemat(fh, {"X": images, "y": labels})
        # the 116-byte header text says when it was written: the same set must be the same bytes
        # (its SHA-256 is the data digest that keys reuse, resume and the champion's comparison)
        fh.seek(0)
        fh.write(MAT_HEADER)


def ensure(folder: Path, train_count: int, test_count: int, seed: int = 1412) -> Path:
    """Make (once) a folder holding train_32x32.mat and test_32x32.mat; return it."""
    target = folder / f"n{train_count}-{test_count}-s{seed}-v{GENERATOR_VERSION}"
    for split, count in (("train", train_count), ("test", test_count)):
        path = target / f"{split}_32x32.mat"
        if not path.exists():
            print(f"generating synthetic SVHN-format {split} set: {count} images -> {path}", flush=True)
            try:
                write_mat(path, *generate(split, count, seed))
            except OSError as err:  # a read-only project, a data_dir under a file, a full disk
                raise DataError(f"cannot write the synthetic set to {target} ({err.strerror or type(err).__name__}): "
                                f"pass -P data_dir=<a folder you can write>") from None
    return target
