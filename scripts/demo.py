"""The end of `make demo`: sample images to predict, then the predictions and the champion.

    python scripts/demo.py samples FOLDER key=value ...   # PNGs from the study's test split
    python scripts/demo.py report PREDICTIONS.csv [MODEL] # table, and MODEL's champion (svhn-classifier-synthetic)
    python scripts/demo.py ui EXPERIMENT                  # the address that opens EXPERIMENT in `mlflow ui`
    python scripts/demo.py with-pip-sources COMMAND ...   # COMMAND, with uv told where pip finds wheels

`samples` takes the study's own parameters (dataset=synthetic scale=demo ...), so the images
come from the test split the study held out. Each file is named after its index in that split
and its true digit (test0042_digit7.png); `report` reads the truth back from the name.
"""
from __future__ import annotations

import ast
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAME = re.compile(r"test(\d+)_digit(\d)\.png$")
# pip's settings and the uv variables that say the same thing (uv never reads pip's config)
PIP_TO_UV = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_INDEX",
             "find-links": "UV_FIND_LINKS", "constraint": "UV_CONSTRAINT",
             "cert": "SSL_CERT_FILE",  # uv's own CA bundle variable (uv has no --cert variable)
             "trusted-host": "UV_INSECURE_HOST", "no-index": "UV_OFFLINE"}  # no-index: see uv_sources
INDEXES = ("UV_DEFAULT_INDEX", "UV_INDEX")


def samples(folder: str, *pairs: str, count: int = 8) -> None:
    import numpy as np
    from PIL import Image

    from pipeline import config, data

    wrong = [pair for pair in pairs if "=" not in pair]
    if wrong:
        raise ValueError(f"{wrong[0]!r} is not key=value (the study's parameters, e.g. scale=demo)")
    cfg = config.load("main", dict(pair.split("=", 1) for pair in pairs))
    test = data.load(cfg).test
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("test*_digit*.png"):
        old.unlink()
    labels = test.labels.numpy()
    present = [digit for digit in range(10) if (labels == digit).any()]  # a small test split lacks some
    picks = [int(np.flatnonzero(labels == digit)[0]) for digit in present[:count]]
    for index in picks:
        image = test.images[index].permute(1, 2, 0).numpy()  # (32, 32, 3) uint8, as SVHN stores it
        Image.fromarray(image).save(out / f"test{index:04d}_digit{labels[index]}.png")
    print(f"wrote {len(picks)} images from the study's test split ({len(labels)} images, "
          f"never trained on) to {out}/", flush=True)


def report(predictions: str, model: str = "svhn-classifier-synthetic") -> int:
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.errors import first_line

    with open(predictions, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    missing = {"input", "label", "confidence"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"{predictions} has no prediction rows with {', '.join(sorted(missing))}: "
                         f"give the CSV that `predict` wrote")
    short = next((line for line, row in zip(lines, rows) if None in row.values()), None)
    if short is not None:
        raise ValueError(f"{predictions} line {short} has fewer fields than its header (cut short?): "
                         f"give the CSV that `predict` wrote")
    print(f"\n{'file':<24} {'true digit':>10} {'predicted':>10} {'confidence':>11}")
    right = 0
    for row in rows:
        found = NAME.search(row["input"])
        truth = found.group(2) if found else "?"
        right += truth == row["label"]
        mark = "" if truth == "?" else ("  ok" if truth == row["label"] else "  WRONG")
        print(f"{row['input']:<24} {truth:>10} {row['label']:>10} {float(row['confidence']):>10.1%}{mark}")
    print(f"{right} of {len(rows)} sample images read correctly")
    try:
        version = tracking.client().get_model_version_by_alias(model, "champion")
    except MlflowException as err:
        print(f"no champion registered ({first_line(err)})")
        return 1
    tags = version.tags
    split = tags.get("selected_on", "test")
    chosen = float(tags.get(f"best_{split}_acc", "nan"))
    test = float(tags.get("test_acc_at_best", "nan"))
    where = "the validation split" if split == "val" else "the test split"
    print(f"\nchampion: {model} version {version.version}, registered by {tags.get('stage', '?')} "
          f"(run {version.run_id}, arch {tags.get('arch', '?')})")
    print(f"  chosen on {where}: {chosen:.2f}%")
    print(f"  held-out test split: {test:.2f}% (images never used for training"
          + (" or for any choice)" if split == "val" else "; the seed's protocol also selects on them)"))
    return 0


def ui(experiment: str) -> int:
    """The address that opens the demo's experiment in `mlflow ui`."""
    import mlflow

    found = mlflow.MlflowClient().get_experiment_by_name(experiment)
    where = f"#/experiments/{found.experiment_id}" if found else ""
    print(f"then open http://127.0.0.1:5000/{where} (experiment {experiment}; main's run: summary.md "
          f"and plots/study.png)")
    return 0


def pip_value(printed: str) -> str:
    """A value as `pip config list` prints it: its repr (a pip.conf list over several lines reads
    '\\n/a\\n/b')."""
    try:
        return str(ast.literal_eval(printed.strip())).strip()
    except (ValueError, SyntaxError):
        return printed.strip().strip("'\"")


LISTS = ("UV_FIND_LINKS", "UV_INDEX", "UV_INSECURE_HOST")  # pip's lists: items on one line, or several


def uv_sources(listed: str, environ: dict[str, str]) -> dict[str, str]:
    """The UV_* variables that say what `pip config list` printed (`listed`) about where pip
    install finds wheels and whom it trusts: its PIP_* variables first, then its [install]
    section, then [global] (pip's own order; other sections are not pip install's). A variable
    set in `environ` wins."""
    rank = {":env:": 0, "install": 1, "global": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():  # e.g. global.extra-index-url='file:///a/simple file:///b/simple'
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        uv_name = PIP_TO_UV.get(name)
        if uv_name and section in rank and (uv_name not in found or rank[section] < found[uv_name][0]):
            found[uv_name] = (rank[section], pip_value(value))
    sources = {uv_name: " ".join(value.split()) if uv_name in LISTS else value
               for uv_name, (_, value) in found.items() if uv_name not in environ}
    sources.pop("UV_OFFLINE", None)
    links = environ["UV_FIND_LINKS"].split(",") if "UV_FIND_LINKS" in environ else \
        found["UV_FIND_LINKS"][1].split() if "UV_FIND_LINKS" in found else []
    on_disk = all("://" not in link or link.startswith("file://") for link in links)
    if found.get("UV_OFFLINE", (0, ""))[1].lower() in ("1", "true", "yes", "on") and on_disk and \
            not {"UV_OFFLINE", *INDEXES} & environ.keys():
        # pip's no-index: find-links only. uv has no variable for it; with every location on disk,
        # uv offline installs the same (with one elsewhere, or an index of yours, uv keeps its indexes)
        for name in INDEXES:
            sources.pop(name, None)
        sources["UV_OFFLINE"] = "1"
    if "UV_FIND_LINKS" in sources:  # pip separates them with spaces, uv with commas
        sources["UV_FIND_LINKS"] = ",".join(sources["UV_FIND_LINKS"].split())
    if "UV_INDEX" in sources and "UV_INDEX_STRATEGY" not in environ:
        sources["UV_INDEX_STRATEGY"] = "unsafe-best-match"  # pip's rule for pip's indexes: best version over all
    return sources


def with_pip_sources(*command: str) -> None:
    """Run COMMAND (`mlflow run ... --env-manager uv`) with uv told where pip finds wheels, so that
    it installs what pip would: on a machine with torch's wheels on disk, those, not a 3 GB
    download. Says in one line what it set."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        listed = ""
        print(f"with-pip-sources: cannot read pip's configuration ({type(err).__name__}): uv uses its own "
              f"defaults (PyPI)", file=sys.stderr)
    from pipeline.urls import redacted  # an index's token must not reach a CI log

    sources = uv_sources(listed, dict(os.environ))
    shown = {k: ",".join(" ".join(redacted(url) for url in part.split()) for part in v.split(","))
             for k, v in sources.items()}
    print(f"with-pip-sources: {' '.join(f'{k}={v}' for k, v in shown.items()) or 'nothing to set'}",
          file=sys.stderr, flush=True)
    try:
        os.execvpe(command[0], list(command), {**os.environ, **sources})
    except OSError as err:
        sys.exit(f"with-pip-sources: cannot run {command[0]}: {err.strerror}")


def main(argv: list[str]) -> int:
    from pipeline.errors import UserError, first_line

    command, *args = argv or ["help"]
    try:
        if command == "samples" and args:
            samples(*args)
            return 0
        if command == "report" and len(args) in (1, 2):
            return report(*args)
        if command == "ui" and len(args) == 1:
            return ui(*args)
        if command == "with-pip-sources" and args:
            with_pip_sources(*args)
    except (UserError, OSError, ValueError, csv.Error) as err:  # a bad argument or file: one line
        sys.exit(f"demo.py {command}: {first_line(err, None) or type(err).__name__}")
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
