"""predict: reading inputs (images, folders, .mat), labelling them with a model, the CSV and the
evaluation report, with in-memory models whose answers are known."""
import contextlib
import csv
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config, predict, synthetic
from pipeline.errors import PredictError
from support.digits import svhn_labels
from support.faults import disk_full_midway


class Answers(torch.nn.Module):
    """A served-model stand-in: digit (red channel mean // 26) with probability 0.5 + digit / 20,
    the rest spread evenly, so each test image's label and confidence are known."""

    def forward(self, images):  # NHWC uint8, as the served Classifier takes them
        digits = (images[..., 0].float().mean(dim=(1, 2)) // 26).long().clamp(0, 9)
        sure = (0.5 + digits.float() / 20)[:, None]
        hot = torch.nn.functional.one_hot(digits, 10).float()
        return hot * sure + (1 - hot) * (1 - sure) / 9


def image_of(digit: int) -> np.ndarray:
    return np.full((32, 32, 3), digit * 26 + 5, dtype=np.uint8)


def test_a_folder_is_read_in_name_order_and_unreadable_files_are_named_not_fatal(tmp_path, capsys):
    Image.fromarray(image_of(3)).save(tmp_path / "b.png")
    Image.fromarray(np.full((64, 48, 3), 7 * 26 + 5, dtype=np.uint8)).save(tmp_path / "a.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    inputs = predict.collect(str(tmp_path))
    assert inputs.names == ["a.jpg", "b.png"] and inputs.labels is None
    assert [image.shape for image in inputs.images] == [(32, 32, 3), (32, 32, 3)]  # resized to 32x32
    assert inputs.failures == [str(tmp_path / "notes.txt")]
    assert f"cannot read image {tmp_path / 'notes.txt'}" in capsys.readouterr().out


def test_an_image_is_read_as_a_viewer_shows_it(tmp_path):
    stored = np.zeros((32, 32, 3), dtype=np.uint8)
    stored[:16] = 255  # white top half, as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise, so the white half is on the right
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=100, exif=exif)
    phone = predict.read_image(tmp_path / "phone.jpg")
    assert phone[:, :16].mean() < 30 and phone[:, 16:].mean() > 225

    digit = np.zeros((32, 32, 4), dtype=np.uint8)  # black everywhere, opaque only where the digit is
    digit[8:24, 12:20, 3] = 255
    Image.fromarray(digit, "RGBA").save(tmp_path / "sticker.png")
    sticker = predict.read_image(tmp_path / "sticker.png")
    assert (sticker[8:24, 12:20] == 0).all() and (sticker[:4] == 255).all()  # a black digit on white

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))  # 16-bit grey, dark to light
    dark = np.full((32, 32), 250, dtype=np.uint16)  # 16 bits, every value below 256: nearly black
    for name in ("scan.png", "scan.pgm", "dark.png", "dark.pgm"):
        grey = dark if name.startswith("dark") else ramp
        Image.fromarray(grey).save(tmp_path / name)
        scan = predict.read_image(tmp_path / name)
        assert np.abs(scan[..., 0].astype(int) - np.round(grey / 257).astype(int)).max() <= 1, name


def test_a_mat_file_brings_its_labels_and_bad_inputs_are_one_line(tmp_path):
    images = np.stack([image_of(d) for d in (1, 0, 9)], axis=-1)  # SVHN's (32, 32, 3, N)
    synthetic.write_mat(tmp_path / "test_32x32.mat", images, svhn_labels(np.array([1, 0, 9])))
    inputs = predict.collect(str(tmp_path / "test_32x32.mat"))
    assert inputs.names == ["test_32x32.mat[0]", "test_32x32.mat[1]", "test_32x32.mat[2]"]
    assert inputs.labels.tolist() == [1, 0, 9]  # SVHN's 10 is the digit 0
    assert np.array_equal(inputs.images[2], image_of(9))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"")
    for source, expected in (("", "no input given"), (str(tmp_path / "nowhere"), "does not exist"),
                             (str(tmp_path / "empty"), f"input folder {tmp_path / 'empty'} holds no visible files")):
        with pytest.raises(PredictError, match=expected) as err:
            predict.collect(source)
        assert "\n" not in str(err.value)


def test_a_mat_without_labels_is_labelled_without_an_accuracy(tmp_path):
    import scipy.io

    images = np.stack([image_of(d) for d in (6, 2)], axis=-1)
    scipy.io.savemat(tmp_path / "to_label.mat", {"X": images})
    inputs = predict.collect(str(tmp_path / "to_label.mat"))
    assert inputs.labels is None and inputs.names == ["to_label.mat[0]", "to_label.mat[1]"]
    assert np.array_equal(inputs.images[0], image_of(6)) and np.array_equal(inputs.images[1], image_of(2))
    scipy.io.savemat(tmp_path / "floats.mat", {"X": images.astype(np.float32)})
    with pytest.raises(PredictError, match=r"floats.mat: X is float32, not uint8; SVHN stores X"):
        predict.collect(str(tmp_path / "floats.mat"))


def test_predict_writes_each_inputs_label_and_confidence_and_reports_accuracy(tmp_path, capsys):
    images = np.stack([image_of(d) for d in (4, 4, 2)], axis=-1)
    synthetic.write_mat(tmp_path / "test_32x32.mat", images, svhn_labels(np.array([4, 5, 2])))
    cfg = config.load("predict", {"input": str(tmp_path / "test_32x32.mat"), "output": str(tmp_path / "out.csv")})
    assert predict.predict(cfg, None, Answers()) == 0
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [(r["input"], r["label"], r["confidence"]) for r in rows] == [
        ("test_32x32.mat[0]", "4", "0.7000"), ("test_32x32.mat[1]", "4", "0.7000"), ("test_32x32.mat[2]", "2", "0.6000")]
    assert "accuracy on 3 labelled images: 66.667%" in capsys.readouterr().out


def test_an_output_that_fails_mid_write_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """A full disk (or a kill) after the header: one line, and the CSV an earlier run wrote is as
    it was, with no half-written file beside it."""
    images = np.stack([image_of(d) for d in (4, 2)], axis=-1)
    synthetic.write_mat(tmp_path / "test_32x32.mat", images, svhn_labels(np.array([4, 2])))
    cfg = config.load("predict", {"input": str(tmp_path / "test_32x32.mat"), "output": str(tmp_path / "out.csv")})
    assert predict.predict(cfg, None, Answers()) == 0
    before = (tmp_path / "out.csv").read_bytes()
    header_only = disk_full_midway(predict.atomic_write, keep=lambda text: text.splitlines(keepends=True)[0])
    monkeypatch.setattr(predict, "atomic_write", header_only)  # the header is on disk, then the disk is full
    with pytest.raises(PredictError) as err:
        predict.predict(cfg, None, Answers())
    assert str(err.value).startswith(f"cannot write output {tmp_path / 'out.csv'} (No space left on device)")
    assert (tmp_path / "out.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "test_32x32.mat"]


def test_predict_exits_1_when_some_inputs_could_not_be_read(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(image_of(6)).save(folder / "six.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = config.load("predict", {"input": str(folder), "output": str(tmp_path / "out.csv")})
    assert predict.predict(cfg, None, Answers()) == 1
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [(r["input"], r["label"]) for r in rows] == [("six.png", "6")]


def broken_png(path):
    """A PNG whose second IDAT chunk has a type no PNG has: PIL raises SyntaxError as it decodes."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    second = data.find(b"IDAT", data.find(b"IDAT") + 4)
    path.write_bytes(data[:second] + b"ID!T" + data[second + 4:])


def test_any_image_a_decoder_fails_on_and_a_name_that_is_not_utf8_are_one_line_each_not_fatal(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    broken_png(folder / "broken.png")
    Image.fromarray(image_of(6)).save(folder / os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name, from an old zip
    cfg = config.load("predict", {"input": str(folder), "output": str(tmp_path / "out.csv")})
    assert predict.predict(cfg, None, Answers()) == 1
    assert f"cannot read image {folder / 'broken.png'}: SyntaxError: broken PNG file" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert [(r["input"], r["label"]) for r in rows] == [("caf\\xe9.png", "6")]


def test_when_no_input_can_be_read_nothing_is_written_and_the_earlier_output_stays(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "out.csv").write_text("input,label,confidence\nsix.png,6,0.8000\n")
    cfg = config.load("predict", {"input": str(tmp_path / "notes.txt"), "output": str(tmp_path / "out.csv")})
    with pytest.raises(PredictError) as refused:
        predict.predict(cfg, None, Answers())
    assert str(refused.value) == ("none of the 1 inputs could be read (listed above), so nothing was written: "
                                  "replace or remove them")
    assert (tmp_path / "out.csv").read_text() == "input,label,confidence\nsix.png,6,0.8000\n"


def test_an_input_that_cannot_be_looked_at_is_one_line():
    with pytest.raises(PredictError) as refused:
        predict.input_path("~no_such_user_here/six.png")
    assert str(refused.value).startswith("cannot read input ~no_such_user_here/six.png: RuntimeError: ")


def test_the_run_logs_the_predictions_it_wrote_though_another_command_writes_the_file_next(
        tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    Image.fromarray(image_of(6)).save(tmp_path / "six.png")
    real_atomic_write = predict.atomic_write

    @contextlib.contextmanager
    def then_another_predict_writes_it(path, *args, **kwargs):
        with real_atomic_write(path, *args, **kwargs) as fh:
            yield fh
        path.write_text("input,label,confidence\nother.png,1,0.5500\n")  # before this run logs it

    monkeypatch.setattr(predict, "atomic_write", then_another_predict_writes_it)
    run_id = store.client.create_run("0").info.run_id
    cfg = config.load("predict", {"input": str(tmp_path / "six.png"), "output": str(tmp_path / "out.csv")})
    assert predict.predict(cfg, run_id, Answers()) == 0
    logged = store.client.download_artifacts(run_id, "out.csv", str(tmp_path / "logged"))
    assert open(logged).read().splitlines() == ["input,label,confidence", f"{tmp_path / 'six.png'},6,0.8000"]


def test_confusion_metrics_count_each_true_digit_as_a_row():
    truth = np.array([0, 0, 1, 1, 1, 9])
    predicted = np.array([0, 1, 1, 1, 7, 9])
    matrix, per_digit, accuracy = predict.confusion_metrics(truth, predicted)
    assert matrix[0].tolist()[:2] == [1, 1] and matrix[1, 1] == 2 and matrix[1, 7] == 1 and matrix[9, 9] == 1
    assert matrix.sum() == 6
    assert per_digit[0] == 50.0 and per_digit[1] == pytest.approx(200 / 3) and per_digit[9] == 100.0
    assert per_digit[5] == 0.0  # no images of 5
    assert accuracy == pytest.approx(400 / 6)


def test_an_input_or_output_predict_cannot_use_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from pipeline import __main__ as cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # were a run made, it goes here
    Image.fromarray(image_of(6)).save(tmp_path / "six.png")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    too_long, looping = tmp_path / "out" / f"{'a' * 300}.csv", tmp_path / "loop" / "out.csv"
    for output, expected in ((tmp_path, f"output {tmp_path} is a folder: pass a file in it, e.g. "
                                        f"-P output={tmp_path / 'predictions.csv'}"),
                             (tmp_path / "a_file" / "sub" / "out.csv",
                              f"cannot write output {tmp_path / 'a_file' / 'sub' / 'out.csv'}: {tmp_path / 'a_file'} "
                              f"is a file, not a folder; pass -P output=<a .csv file in a folder you can write>"),
                             (too_long, predict.unwritable(too_long, "File name too long")),
                             (looping, predict.unwritable(looping, f"Symlink loop from '{looping}'"))):
        cfg = config.load("predict", {"input": str(tmp_path / "six.png"), "output": str(output)})
        with pytest.raises(PredictError) as refused:
            predict.predict(cfg, None, Answers())
        assert str(refused.value) == expected
        loaded = []
        monkeypatch.setattr(predict, "load_model", loaded.append)
        assert cli.main(["predict", "--input", str(tmp_path / "six.png"), "--output", str(output)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {expected}"] and loaded == []
    nowhere, empty = tmp_path / "nowhere", tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    for source, line in ((nowhere, f"input {nowhere} does not exist: pass an image, a folder of images, or a .mat"),
                         (empty, f"input folder {empty} holds no visible files (subfolders and dot-files are not "
                                 f"read): put images (png, jpg, ...) in it, or pass -P input=<image or .mat>")):
        assert cli.main(["predict", "--input", str(source), "--output", str(tmp_path / "out.csv")]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {line}"] and loaded == []
    assert not (tmp_path / "mlflow.db").exists()  # no run made
    nested = tmp_path / "new" / "folder" / "out.csv"  # a folder that is not there yet is made
    cfg = config.load("predict", {"input": str(tmp_path / "six.png"), "output": str(nested)})
    assert predict.predict(cfg, None, Answers()) == 0 and nested.read_text().splitlines()[1] == f"{tmp_path / 'six.png'},6,0.8000"


def test_predict_never_writes_over_its_input_and_says_which_subfolders_it_did_not_read(tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(image_of(6)).save(folder / "six.png")
    Image.fromarray(image_of(2)).save(folder / "more" / "two.png")
    for source, output, line in (
            (folder / "six.png", folder / "six.png",
             f"output {folder / 'six.png'} is the input: writing it would overwrite the input; pass "
             f"-P output=<another .csv file>"),
            (folder, folder / "predictions.csv",  # the next run would read it as an input
             f"output {folder / 'predictions.csv'} is in the input folder {folder}, whose files predict reads: pass "
             f"-P output=<a .csv file outside it>")):
        cfg = config.load("predict", {"input": str(source), "output": str(output)})
        with pytest.raises(PredictError) as refused:
            predict.predict(cfg, None, Answers())
        assert str(refused.value) == line
    assert (folder / "six.png").read_bytes()[:4] == b"\x89PNG" and not (folder / "predictions.csv").exists()
    capsys.readouterr()
    cfg = config.load("predict", {"input": str(folder), "output": str(tmp_path / "out.csv")})
    assert predict.predict(cfg, None, Answers()) == 0  # a subfolder is said, not a failed input
    assert [r["input"] for r in csv.DictReader(open(tmp_path / "out.csv"))] == ["six.png"]
    assert (f"not read: {folder / 'more'} is a folder (subfolders are not read; pass -P input={folder / 'more'} "
            f"to label its images)") in capsys.readouterr().out


class Diverged(torch.nn.Module):
    """A model whose weights diverged: NaN for every image (argmax would read digit 0)."""

    def forward(self, images):
        return torch.full((len(images), 10), float("nan"))


def test_a_model_that_outputs_nan_labels_nothing(tmp_path, store, monkeypatch, capsys):
    Image.fromarray(image_of(6)).save(tmp_path / "six.png")
    cfg = config.load("predict", {"input": str(tmp_path / "six.png"), "output": str(tmp_path / "out.csv")})
    line = ("the model's outputs are not finite (NaN or inf) for 1 of 1 images: its weights diverged, so it labels "
            "nothing; pass -P model_uri=<another model>")
    with pytest.raises(PredictError, match=r"^" + line.replace("(", r"\(").replace(")", r"\)") + "$"):
        predict.predict(cfg, None, Diverged())
    assert not (tmp_path / "out.csv").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    images = torch.from_numpy(np.stack([image_of(d) for d in (1, 2)])).permute(0, 3, 1, 2).contiguous()
    run_id = store.client.create_run("0").info.run_id
    with pytest.raises(PredictError, match="for 2 of 2 images"):
        predict.evaluation_report(Diverged(), images, torch.tensor([1, 2]), run_id)
    # a stage's own model: no report, said, and its registration keeps it off the alias
    assert predict.evaluation_report(Diverged(), images, torch.tensor([1, 2]), run_id, skip_if_diverged=True) == {}
    assert store.client.get_run(run_id).data.metrics == {}  # no 10% from NaN rows read as digit 0
    assert not store.artifacts(run_id)
    assert "no evaluation report: the model's outputs are not finite (NaN or inf) for 2 of 2 images: its weights " \
           "diverged" in capsys.readouterr().out


def test_a_digit_without_test_images_has_no_accuracy_and_is_never_the_hardest(store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    images = torch.from_numpy(np.stack([image_of(d) for d in (1, 2, 2)])).permute(0, 3, 1, 2).contiguous()
    run_id = store.client.create_run("0").info.run_id
    metrics = predict.evaluation_report(Answers(), images, torch.tensor([1, 2, 3]), run_id)  # the last read as 2
    assert metrics == {"test_acc_digit_1": 100.0, "test_acc_digit_2": 100.0, "test_acc_digit_3": 0.0,
                       "eval_test_acc": pytest.approx(200 / 3)}
    assert "hardest digits: 3 (0.0%), 1 (100.0%), 2 (100.0%)" in capsys.readouterr().out
