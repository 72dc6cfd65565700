"""Writing a file whole or not at all: every file this pipeline writes for later reading (a
checkpoint, a synthetic .mat set, the decode cache, predict's CSV) goes through `atomic_write`."""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import socket
import stat
from pathlib import Path
from typing import IO, Iterator


TEMP_GLOB = ".*.tmp"  # what temp_name makes, as a folder's glob finds what a killed writer left


def proc_text(path: str) -> str:
    """A /proc file's text, stripped ("" where there is no /proc, or no such process)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def boot_id() -> str:
    return proc_text("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def pid_scope() -> str:
    """Host name, boot id and pid namespace: where a pid names one process. Containers may share a
    host name (--network host), a cloned machine its name, never a boot and a namespace."""
    boot, pidns = boot_id(), pid_namespace()
    if not boot or not pidns:  # no /proc: pids are never judged (drop_dead_writers_temps matches nothing)
        return f"{socket.gethostname()}-unknown-{os.getpid()}"
    return f"{socket.gethostname()}-{boot[:8]}-{pidns}"


def temp_name(path: Path) -> Path:
    """Where `atomic_write` writes `path` first: hidden, beside it, per machine and process (two
    writers of one file never share it, on a shared file system either)."""
    return path.with_name(f".{path.name}.{pid_scope()}.{os.getpid()}.tmp")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def drop_dead_writers_temps(path: Path) -> None:
    """Remove the temp files of `path` that a writer on this machine left when it was killed
    (SIGKILL, the OOM killer: no `finally` ran); those of live writers, and of other machines or
    containers (whose pids mean nothing here), stay."""
    mine = f".{path.name}.{pid_scope()}."
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = temp.name[len(mine):-len(".tmp")] if temp.name.startswith(mine) else ""
        if pid.isdigit() and not alive(int(pid)):
            temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_args) -> Iterator[IO]:
    """Open a temp file beside `path`; once the block ends, fsync it and rename it over `path`.
    A kill or an error before then leaves `path` as it was (absent, or the previous file whole).
    A symlink's target is what is written (the link stays), and a file replaced keeps its mode.
    What an earlier writer of `path` killed mid-write left beside it is removed first."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    drop_dead_writers_temps(target)
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
