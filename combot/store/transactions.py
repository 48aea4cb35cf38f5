"""What brackets every piece of work on the database: the writers' cross-process lock, write
transactions (`BEGIN IMMEDIATE`) and read snapshots."""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path
from typing import Any


class WriteLock:
    """Every process's writer takes turns through this lock, fairly, woken the moment it is free.

    Two flocks, both waited for in the kernel: the `.lock-queue` file admits one waiter at a time
    to wait for the `.lock` file itself, which the writers hold for one transaction each. The holder
    cannot take `.lock` again while someone waits for it, because to wait it must first get through
    the queue, which that waiter holds: so the lock passes to another process at every release
    (one flock alone let the busiest process re-take it at once, every time, and the others' writes
    timed out: bench/write_lock.py). A dead process's flocks are released by the kernel. A holder
    keeps `.lock` for one transaction, bounded by SQLite's busy timeout.
    """

    def __init__(self, path: str | Path):
        self._queue = open(f"{path}.lock-queue", "a+b")
        self._lock = open(f"{path}.lock", "a+b")

    def acquire(self) -> None:
        fcntl.flock(self._queue, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        self._queue.close()
        self._lock.close()


class transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`: takes the write lock up front, so it never fails half-way on a lock."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        # Inside a transaction already (the Store's group commit): a savepoint, so a failure rolls
        # back this piece of work alone.
        self.nested = self.conn.in_transaction
        self.conn.execute("SAVEPOINT nested" if self.nested else "BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if self.nested:
            if not self.conn.in_transaction:
                return  # SQLite already rolled back everything (disk full, I/O error); the error goes on
            if kind is not None:
                self.conn.execute("ROLLBACK TO nested")
            self.conn.execute("RELEASE nested")
            return
        if kind is None:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                # After an I/O error, a full disk or SQLITE_BUSY at COMMIT, SQLite may leave the
                # transaction open; it would hold this process's write lock for good.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _read_snapshot(conn: sqlite3.Connection) -> Any:
    """Several reads that must see one moment: a read transaction, unless one is open already."""
    from contextlib import nullcontext

    if conn.in_transaction:
        return nullcontext()
    return snapshot(conn)


class snapshot:
    """`BEGIN` ... `COMMIT` around reads, so they all see the same moment (WAL lets writers go on)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN")
        return self.conn

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self.conn.execute("COMMIT")
