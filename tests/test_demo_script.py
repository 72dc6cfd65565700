"""scripts/demo.py samples and report, the end of `make demo`, run as the Makefile runs them: the
sample images are the study's own test images, named after their truth, which report reads back;
a bad argument or file is one line and a non-zero exit, never a traceback."""
import csv
import subprocess
import sys

import numpy as np
from PIL import Image

from support.store import PROJECT

DEMO = PROJECT / "scripts" / "demo.py"


def demo(*args, env=None):
    return subprocess.run([sys.executable, str(DEMO), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_samples_are_the_studys_test_images_and_report_counts_them_against_their_names(colour_data, tmp_path,
                                                                                       monkeypatch):
    from pipeline import config, data

    pairs = ["dataset=svhn", "verify=false", f"data_dir={colour_data / 'right'}"]
    out = tmp_path / "samples"
    done = demo("samples", out, *pairs)
    assert done.returncode == 0, done.stderr
    test = data.load(config.load("main", dict(p.split("=", 1) for p in pairs))).test
    written = sorted(out.glob("*.png"))
    assert len(written) == 8
    for path in written:
        index, digit = int(path.name[4:8]), int(path.name.split("digit")[1][0])
        assert int(test.labels[index]) == digit
        assert np.array_equal(np.asarray(Image.open(path)), test.images[index].permute(1, 2, 0).numpy())
    predictions = tmp_path / "predictions.csv"
    with open(predictions, "w", newline="") as file:
        rows = csv.writer(file)
        rows.writerow(["input", "label", "confidence"])
        for n, path in enumerate(written):  # the first three right, the rest wrong
            truth = int(path.name.split("digit")[1][0])
            rows.writerow([path.name, truth if n < 3 else (truth + 1) % 10, 0.5])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    done = demo("report", predictions, "no-such-model")
    assert "3 of 8 sample images read correctly" in done.stdout
    assert done.stdout.count("  WRONG") == 5
    assert done.returncode == 1 and "no champion registered" in done.stdout  # nothing registered here


def test_a_bad_argument_or_file_is_one_line_and_a_non_zero_exit(tmp_path):
    not_csv = tmp_path / "notes.txt"
    not_csv.write_text("just some words\n")
    cut = tmp_path / "cut.csv"
    cut.write_text('input,label,confidence\n\n"test0001\ndigit1.png",1,0.9\ntest0002_digit2.png,2\n')
    cases = [(("samples", tmp_path / "s", "scale"), "'scale' is not key=value"),
             (("samples", tmp_path / "s", "lr=abc"), "lr='abc' is not a number"),
             (("report", tmp_path / "missing.csv"), "No such file or directory"),
             (("report", not_csv), "has no prediction rows with confidence, input, label"),
             (("report", cut), "line 5 has fewer fields than its header")]
    for args, said in cases:
        done = demo(*args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"demo.py {args[0]}: ") and said in line
    assert not (tmp_path / "s").exists()  # refused before it made the folder


def test_samples_from_a_test_split_that_lacks_some_digits_are_the_digits_it_has(tmp_path):
    from pipeline import config, data

    pairs = ["dataset=synthetic", "synthetic_train=40", "synthetic_test=5", f"data_dir={tmp_path / 'data'}"]
    labels = data.load(config.load("main", dict(p.split("=", 1) for p in pairs))).test.labels.tolist()
    assert len(set(labels)) < 8  # five images cannot hold eight digits
    done = demo("samples", tmp_path / "s", *pairs)
    assert done.returncode == 0, done.stderr
    written = {int(path.name.split("digit")[1][0]): int(path.name[4:8]) for path in (tmp_path / "s").glob("*.png")}
    assert written == {digit: labels.index(digit) for digit in set(labels)}  # each digit's first image
