"""Writing a file whole or not at all: every file this pipeline writes for later reading (a
checkpoint, a synthetic .mat set, the decode cache, predict's CSV) goes through `atomic_write`."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO, Iterator


TEMP_GLOB = ".*.tmp"  # what temp_name makes, as a folder's glob finds what a killed writer left


def temp_name(path: Path) -> Path:
    """Where `atomic_write` writes `path` first: hidden, beside it, per process (two writers of one
    file never share it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_args) -> Iterator[IO]:
    """Open a temp file beside `path`; once the block ends, fsync it and rename it over `path`.
    A kill or an error before then leaves `path` as it was (absent, or the previous file whole).
    A symlink's target is what is written (the link stays), and a file replaced keeps its mode."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        with open(tmp, mode, **open_args) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
