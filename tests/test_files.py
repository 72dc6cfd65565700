"""files.atomic_write: a file is written whole or not at all, through a symlink, keeping its mode."""
import os
import socket
import subprocess
import sys

import pytest

from pipeline.files import atomic_write, pid_scope, temp_name


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


def test_what_a_killed_writer_left_beside_the_file_is_removed_and_a_live_or_remote_writers_temp_stays(tmp_path):
    """Remote: another machine, or a container with this host name (another pid namespace)."""
    path = tmp_path / "predictions.csv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = pid_scope()
    same_name_other_container = f"{socket.gethostname()}-{host.split('-')[-2]}-0"  # no real namespace is 0
    left = {name: tmp_path / f".predictions.csv.{name}.tmp"
            for name in (f"{host}.{dead.pid}", f"{host}.{live.pid}", f"elsewhere.{dead.pid}",
                         f"{same_name_other_container}.{dead.pid}")}
    other_file = tmp_path / f".labels.csv.{host}.{dead.pid}.tmp"  # another file's: not ours to judge
    try:
        for temp in (*left.values(), other_file):
            temp.write_text("half")
        with atomic_write(path, "w") as fh:
            fh.write("whole\n")
    finally:
        live.kill()
        live.wait()
    assert path.read_text() == "whole\n"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["predictions.csv", left[f"{host}.{live.pid}"].name, left[f"elsewhere.{dead.pid}"].name,
         left[f"{same_name_other_container}.{dead.pid}"].name, other_file.name])
    assert temp_name(path).name == f".predictions.csv.{host}.{os.getpid()}.tmp"
