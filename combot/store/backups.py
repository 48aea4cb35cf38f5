"""A consistent copy of a live database, checked before it takes the target's name."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from combot.store import schema


@dataclass(frozen=True)
class Backup:
    path: Path
    size: int
    participants: int
    messages: int
    seconds: float


def backup(source: str | Path, target: str | Path) -> Backup:
    """A consistent snapshot of a live database, through SQLite's online backup API.

    One backup step over the whole file (pages=-1) runs inside one read transaction: in WAL mode the
    workers keep writing meanwhile, and the copy holds exactly what was committed when it began (a
    copy in several steps would start over after every write). The copy is made under a temporary
    name beside the target, switched to a single self-contained file (journal_mode DELETE), checked
    with integrity_check and only then renamed into place, so a cron job never leaves half a backup.
    """
    started = time.monotonic()
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    if target.exists() and target.resolve() == source.resolve():
        raise ValueError("the backup must go to another file than the database itself")
    pending = target.with_name(f".{target.name}.{os.getpid()}.pending")
    pending.unlink(missing_ok=True)
    pending.touch(mode=0o600)  # it holds e-mail addresses: readable by its owner only
    src = sqlite3.connect(str(source), timeout=schema.BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(str(pending), isolation_level=None)
    try:
        src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode = DELETE")
        problems = [row[0] for row in dst.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("the copy fails integrity_check: " + "; ".join(problems[:5]))
        tables = {row[0] for row in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        count = (lambda table: int(dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                 if table in tables else 0)
        participants, messages = count("participants"), count("messages")
        dst.close()
        with open(pending, "rb") as written:
            os.fsync(written.fileno())
        os.replace(pending, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        dst.close()
        pending.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    return Backup(target, target.stat().st_size, participants, messages, time.monotonic() - started)
