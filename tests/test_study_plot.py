"""plots.study: the study at a glance draws what it is given (champion, validation bars)."""
import math

from PIL import Image

from pipeline import plots

GOLD, VAL_BAR, TEST_BAR = (0xD4, 0xA0, 0x00), (0x9B, 0xBC, 0xE0), (0x4A, 0x6F, 0xA5)


def rows(champion_at=None):
    stages = ["model_selection", "baseline", "tune_lr", "retrain"]
    return [{"stage": stage, "run_name": stage, "run_id": f"{i:032x}", "arch": "resnet",
             "best_acc": 20.0 + 20 * i, "test_acc_at_best": 18.0 + 20 * i if i else math.nan,
             "children": i + 1, "from_parent_weights": stage == "tune_lr",
             "champion": "svhn-classifier v1" if i == champion_at else ""}
            for i, stage in enumerate(stages)]


def colours(path):
    with Image.open(path) as image:
        assert image.width >= 800 and image.height >= 600
        return {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}


def test_study_marks_the_champion_and_draws_validation_bars(tmp_path):
    drawn = colours(plots.study(rows(champion_at=3), tmp_path / "study.png", "val", "a study"))
    assert {GOLD, VAL_BAR, TEST_BAR} <= drawn


def test_study_without_champion_or_validation_draws_neither(tmp_path):
    drawn = colours(plots.study(rows(), tmp_path / "study.png", "test"))
    assert TEST_BAR in drawn and GOLD not in drawn and VAL_BAR not in drawn
