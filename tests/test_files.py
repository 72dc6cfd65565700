"""files.atomic_write: a file is written whole or not at all, through a symlink, keeping its mode."""
import os

import pytest

from pipeline.files import atomic_write


def test_an_error_mid_write_leaves_the_file_as_it_was_and_no_temp_file(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("before\n")
    with pytest.raises(OSError):
        with atomic_write(path, "w") as fh:
            fh.write("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "before\n" and os.listdir(tmp_path) == ["out.csv"]


def test_a_symlink_is_written_through_and_a_replaced_file_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared" / "predictions.csv"
    shared.parent.mkdir()
    shared.write_text("old\n")
    shared.chmod(0o640)
    link = tmp_path / "out.csv"
    link.symlink_to(shared)
    with atomic_write(link, "w") as fh:
        fh.write("new\n")
    assert link.is_symlink() and shared.read_text() == "new\n"
    assert shared.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(shared.parent)) == ["predictions.csv"]
