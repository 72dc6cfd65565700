"""Label images with a registered model, and the evaluation report on the test split.

Inputs: one image file (any size, RGB or grey), a folder of them, or an SVHN-format .mat.
Each image is resized to SVHN's 32x32 RGB; the model applies the seed's test transform itself.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import plots, registry, tracking
from .config import Config
from .errors import PredictError, first_line
from .files import atomic_write


@dataclass
class Inputs:
    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # each (32,32,3) uint8
    labels: np.ndarray | None = None
    failures: list[str] = field(default_factory=list)


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it: such an image is refused as well
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return np.asarray(as_shown(img).resize((32, 32), Image.BILINEAR), dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise PredictError(f"skipped image {path}: {found.group(1) if found else 'too many'} pixels, over "
                           f"PIL's limit of {Image.MAX_IMAGE_PIXELS} (an oversized image or a "
                           f"decompression bomb); shrink it to include it") from None
    except Exception as err:  # PIL's decoders raise what they like (a broken PNG chunk: SyntaxError)
        raise PredictError(f"cannot read image {path}: {type(err).__name__}: "
                           f"{first_line(err, None, 'unreadable')}; "
                           f"skipped it (replace or remove the file)") from None


def as_shown(img):
    """An image in 8-bit RGB as a viewer shows it: turned as its EXIF orientation says (a phone
    stores a photo sideways and tags it), transparency over white (the hidden pixels are often
    black, and a black digit on them vanished), 16-bit grey scaled to 8 bits (not clipped to white)."""
    from PIL import Image, ImageOps

    # a PGM with more than 8 bits opens as I on 0-65535, whatever its values (asked before the
    # transpose, whose copy has no format)
    sixteen_bits = img.mode.startswith("I;16") or (img.mode == "I" and (img.format == "PPM"
                                                                       or img.getextrema()[1] > 255))
    img = ImageOps.exif_transpose(img)
    if sixteen_bits:
        img = img.convert("I").point(lambda value: value / 257).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def folder_files(folder: Path) -> tuple[list[Path], list[str], list[Path]]:
    """(the folder's visible files, one line per symlink that leads out of it, not followed, its
    visible subfolders, not read)."""
    root = folder.resolve()
    files, refused, folders = [], [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            try:
                target = entry.resolve(strict=True)
                inside = target.is_relative_to(root)
            except (OSError, RuntimeError):  # dangling or a loop
                target, inside = None, False
            if not inside:
                refused.append(f"skipped {entry}: a symlink to {target or 'nowhere'}, outside the input "
                               f"folder, not followed (copy the file into {folder} to include it)")
                continue
        if entry.is_file():
            files.append(entry)
        elif entry.is_dir():
            folders.append(entry)
    return files, refused, folders


def printable(name: str) -> str:
    """A file name as UTF-8 text: bytes that are not (a Latin-1 name) are written as \\xe9."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def input_path(source: str) -> Path:
    """cfg.input as a path that is there; checked before the model loads, and again when read."""
    if not source:
        raise PredictError("no input given: pass -P input=<image, folder of images, or .mat>")
    try:
        path = Path(source).expanduser()
        there = path.exists()
        empty = there and path.is_dir() and folder_files(path)[:2] == ([], [])
    except (RuntimeError, OSError) as err:  # ~nosuchuser, or a folder this user may not read
        raise PredictError(f"cannot read input {source}: {type(err).__name__}: {first_line(err, None, 'refused')}; "
                           f"pass an image, a folder of images, or a .mat that you can read") from None
    if not there:
        raise PredictError(f"input {path} does not exist: pass an image, a folder of images, or a .mat")
    if empty:  # 0 predictions and exit 0 would hide the mistake
        raise PredictError(f"input folder {path} holds no visible files (subfolders and dot-files are not "
                           f"read): put images (png, jpg, ...) in it, or pass -P input=<image or .mat>")
    return path


def collect(source: str) -> Inputs:
    path = input_path(source)
    inputs = Inputs()
    if path.is_file() and path.suffix.lower() == ".mat":
        split = "test" if "test" in path.name else "train"
        try:
            if data_mod.mat_has_labels(path):
                images, labels = data_mod.read_mat(path, split, verify=False)
                inputs.labels = labels.numpy()
            else:  # images to label, without answers: no accuracy
                images = data_mod.read_unlabelled_mat(path)
        except data_mod.DataError as err:
            raise PredictError(str(err)) from None
        inputs.images = list(images.permute(0, 2, 3, 1).numpy())
        inputs.names = [f"{path.name}[{i}]" for i in range(len(images))]
        return inputs
    files, refused, folders = folder_files(path) if path.is_dir() else ([path], [], [])
    for folder in folders:  # not an input that failed: said, not counted
        print(f"not read: {folder} is a folder (subfolders are not read; pass -P input={folder} to label "
              f"its images)", flush=True)
    for line in refused:
        print(line, flush=True)
        inputs.failures.append(line)
    for file in files:
        try:
            inputs.images.append(read_image(file))
            inputs.names.append(printable(file.name if path.is_dir() else str(file)))
        except PredictError as err:
            print(str(err), flush=True)
            inputs.failures.append(str(file))
    return inputs


def load_model(model_uri: str):
    """(the model at `model_uri`, pt2 only (registry.load_pt2), the URI of the one version loaded:
    an alias pinned); a refusal or a failed load is one line."""
    try:
        pinned = registry.pinned(model_uri)
        return registry.load_pt2(pinned), pinned
    except registry.ModelRefused as err:
        raise PredictError(str(err)) from None
    except Exception as err:
        tracking.raise_if_refused(err)
        raise PredictError(f"cannot load model {model_uri} ({type(err).__name__}: "
                           f"{first_line(err, 200)}): run `mlflow run . -e "
                           f"retrain` to register one, or pass -P model_uri=<uri>") from None


probabilities = registry.probabilities


def diverged(probs: np.ndarray) -> str:
    """What is wrong with `probs` when any image's are NaN or infinite (registry.not_finite), or ''."""
    bad = registry.not_finite(probs)
    return f"the model's outputs are not finite (NaN or inf) for {bad} of {len(probs)} images: its weights diverged" \
        if bad else ""


def finite(probs: np.ndarray) -> np.ndarray:
    """`probs`, refused when any image's are not finite: their argmax would read as digit 0."""
    problem = diverged(probs)
    if problem:
        raise PredictError(f"{problem}, so it labels nothing; pass -P model_uri=<another model>")
    return probs


def unwritable(output: Path, reason: str) -> str:
    return f"cannot write output {output} ({reason}): pass -P output=<a .csv file in a folder you can write>"


def writable_output(output: str, source: str = "") -> Path:
    """cfg.output as a path predict can write, its folder made; checked before the model loads.
    Never the input (`source`) itself, nor a file in the input folder, which the next run would read.
    A path the system cannot even look at (a name too long, a folder this user cannot enter, a
    symlink loop, ~nosuchuser) is one line too."""
    try:
        return checked_output(output, source)
    except PredictError:
        raise
    except (OSError, RuntimeError) as err:  # RuntimeError: Path.resolve's loop, expanduser's user
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err, None, type(err).__name__)
        raise PredictError(unwritable(Path(output), reason)) from None


def checked_output(output: str, source: str) -> Path:
    path = Path(output).expanduser()
    given = Path(source).expanduser().resolve() if source else None
    if given is not None and path.resolve() == given:
        raise PredictError(f"output {path} is the input: writing it would overwrite the input; pass "
                           f"-P output=<another .csv file>")
    if given is not None and given.is_dir() and path.resolve().parent == given:
        raise PredictError(f"output {path} is in the input folder {source}, whose files predict reads: pass "
                           f"-P output=<a .csv file outside it>")
    if path.is_dir():
        raise PredictError(f"output {path} is a folder: pass a file in it, e.g. -P output={path / 'predictions.csv'}")
    blocking = next((folder for folder in path.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise PredictError(f"cannot write output {path}: {blocking} is a file, not a folder; pass "
                           f"-P output=<a .csv file in a folder you can write>")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PredictError(unwritable(path, err.strerror or type(err).__name__)) from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PredictError(unwritable(path, "Permission denied"))
    return path


def predict(cfg: Config, run_id: str | None, model=None) -> int:
    """Write cfg.output with `model` (default: cfg.champion_uri's); return the exit code (1 when
    some inputs could not be read)."""
    model = load_model(cfg.champion_uri)[0] if model is None else model
    inputs = collect(cfg.input)
    if not inputs.names:  # an output of 0 rows would replace the last good one
        raise PredictError(f"none of the {len(inputs.failures)} inputs could be read (listed above), so nothing "
                           f"was written: replace or remove them")
    probs = finite(probabilities(model, np.stack(inputs.images)) if inputs.images else np.zeros((0, 10)))
    labels, confidence = probs.argmax(1), probs.max(1) if len(probs) else probs
    output = writable_output(cfg.output, cfg.input)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["input", "label", "confidence"])
    for name, label, conf in zip(inputs.names, labels, confidence):
        writer.writerow([name, int(label), f"{float(conf):.4f}"])
    try:  # whole or not at all: a kill or a full disk leaves an earlier output as it was
        with atomic_write(output, "w", newline="", encoding="utf-8") as fh:  # as the logged copy
            fh.write(table.getvalue())
    except OSError as err:
        raise PredictError(unwritable(output, err.strerror or type(err).__name__)) from None
    print(f"wrote {len(inputs.names)} predictions to {output.resolve()}", flush=True)  # mlflow run: the project folder
    if run_id:
        client = tracking.client()
        client.log_text(run_id, table.getvalue(), output.name)  # what this run wrote, whoever writes the file next
        client.set_tag(run_id, "stage", "predict")
        metrics = {"n_predictions": len(inputs.names), "n_failed": len(inputs.failures)}
        if inputs.labels is not None:
            metrics["accuracy"] = 100.0 * float((labels == inputs.labels).mean())
        tracking.log_epoch(run_id, 0, metrics)
    if inputs.labels is not None:
        print(f"accuracy on {len(labels)} labelled images: "
              f"{100.0 * float((labels == inputs.labels).mean()):.3f}%", flush=True)
    if inputs.failures:
        print(f"{len(inputs.failures)} of {len(inputs.failures) + len(inputs.names)} inputs could not "
              f"be read or were skipped (listed above)", flush=True)
        return 1
    return 0


def confusion_metrics(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, list[float], float]:
    """(10x10 confusion matrix, rows = true digit; accuracy per true digit in percent, 0 for a
    digit with no images, which the report then leaves out; overall accuracy in percent)."""
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    totals = matrix.sum(1)
    per_digit = [100.0 * matrix[d, d] / totals[d] if totals[d] else 0.0 for d in range(10)]
    return matrix, per_digit, 100.0 * float((predicted == truth).mean())


def evaluation_report(model, images: torch.Tensor, labels: torch.Tensor, run_id: str,
                      folder: str = "evaluation", gallery_size: int = 32, *,
                      skip_if_diverged: bool = False) -> dict[str, float]:
    """Confusion matrix, per-digit accuracy (table and bars) and a gallery of mistakes. A model
    whose outputs are not finite gets none: refused, or (skip_if_diverged: a stage's own model,
    which registration then keeps off the alias) said in one line."""
    nhwc = images.permute(0, 2, 3, 1).numpy()
    truth = labels.numpy()
    probs = probabilities(model, nhwc)
    problem = diverged(probs) if skip_if_diverged else ""
    if problem:
        print(f"no evaluation report: {problem}", flush=True)
        return {}
    predicted = finite(probs).argmax(1)
    matrix, per_digit, accuracy = confusion_metrics(truth, predicted)
    totals = matrix.sum(1)
    wrong = np.flatnonzero(predicted != truth)[:gallery_size]
    client = tracking.client()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = ["| digit | test images | correct | accuracy (%) |", "|---|---|---|---|"]
        table += [f"| {d} | {totals[d]} | {matrix[d, d]} | {per_digit[d]:.2f} |" for d in range(10)]
        (tmp / "per_digit_accuracy.md").write_text("\n".join(table) + "\n")
        plots.confusion(matrix, tmp / "confusion_matrix.png")
        plots.per_digit([per_digit[d] if totals[d] else math.nan for d in range(10)],  # no bar: no image
                        tmp / "per_digit_accuracy.png")
        plots.gallery(images[wrong].numpy(), truth[wrong], predicted[wrong], tmp / "misclassified.png")
        client.log_artifacts(run_id, str(tmp), folder)
    present = [d for d in range(10) if totals[d]]  # a digit with no test image has no accuracy, not 0%
    metrics = {f"test_acc_digit_{d}": per_digit[d] for d in present}
    metrics["eval_test_acc"] = accuracy
    tracking.log_epoch(run_id, 0, metrics)
    hardest = sorted(present, key=lambda d: per_digit[d])[:3]
    print("hardest digits: " + ", ".join(f"{d} ({per_digit[d]:.1f}%)" for d in hardest), flush=True)
    return metrics


def evaluate(cfg: Config, run_id: str, model=None) -> dict[str, float]:
    """The `evaluate` entry point: the report for `model` (default: cfg.champion_uri's) on cfg's
    test split."""
    model = load_model(cfg.champion_uri)[0] if model is None else model
    dataset = data_mod.load(cfg)
    tracking.client().set_tag(run_id, "stage", "evaluate")
    tracking.log_datasets(run_id, dataset, roles=("test",))  # what it reads
    return evaluation_report(model, dataset.test_images, dataset.test_labels, run_id)
