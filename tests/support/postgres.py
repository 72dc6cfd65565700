"""A real PostgreSQL 15 for the tests, in a temporary folder, on 127.0.0.1 only.

Debian's `postgresql` package puts its programs in /usr/lib/postgresql/15/bin (`.ci/run` installs
it where it is missing). initdb refuses to run as root: as root, the cluster is made and run by
the `postgres` user, in a folder that user owns.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from support.processes import free_port

BIN = Path(os.environ.get("SVHN_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def available() -> str:
    """"" when a PostgreSQL 15 can be started here, else why not."""
    if not (BIN / "initdb").exists():
        return f"no PostgreSQL 15 at {BIN} (apt-get install -y postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as"
    return ""


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    """One running server; `url(db)` is a SQLAlchemy URL (psycopg 3) for database `db`."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        # CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database) as connection:
            return connection.execute(sql).fetchall()


@contextlib.contextmanager
def postgres():
    """Start a fresh PostgreSQL 15 (trust authentication, loopback only); stop and remove it after."""
    folder = Path(tempfile.mkdtemp(prefix="svhn-pg-"))
    data = folder / "data"
    try:  # the folder goes whatever fails, initdb and start included
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        port = free_port()
        run = dict(check=True, capture_output=True, text=True, timeout=120)
        options = f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off"
        try:
            subprocess.run(_as_owner([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                      "--no-sync"]), **run)
            subprocess.run(_as_owner([str(BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                      str(folder / "log"), "-w", "start"]), **run)
        except subprocess.CalledProcessError as err:  # why, before the folder (and its log) goes
            log = (folder / "log").read_text()[-2000:] if (folder / "log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {err}\n{err.stderr}\n{log}") from None
        yield Postgres(folder, port)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_owner([str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
