"""`Store`, a process's handle on the database: reads on one thread, writes group-committed on
another, so the event loop never waits on the disk."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from combot.errors import Unavailable
from combot.store import schema
from combot.store.schema import connect
from combot.store.transactions import WriteLock, transaction

T = TypeVar("T")


_UNAVAILABLE = ("locked", "busy", "disk is full", "disk i/o error", "unable to open", "readonly")


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        def set_result() -> None:
            if self.future.done():  # the request was cancelled (timeout, client gone) meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(set_result)


class Store:
    """A process's way to the database: reads on one thread, writes group-committed on another.

    `await store.read(fn, ...)` calls `fn(conn, ...)` on a read connection (WAL readers never wait
    for writers). `await store.run(fn, ...)` queues a write: the writer thread takes every write
    waiting, runs each in its own SAVEPOINT inside one `BEGIN IMMEDIATE` transaction, and answers
    them all only after the COMMIT: one fsync for many messages, each still on disk before its
    reply is sent. A write that fails rolls back alone. Across processes the writers take turns
    through `WriteLock`, fairly, and the kernel wakes the next one the moment it is free (SQLite's
    own busy handler polls with sleeps).
    """

    MAX_BATCH = 64

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="combot-db-read")
        self._read_conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._read_conn = await loop.run_in_executor(self._reader, connect, self.path)
        ready: asyncio.Future[None] = loop.create_future()
        self._writer = threading.Thread(target=self._write_loop, args=(loop, ready), name="combot-db-write",
                                        daemon=True)
        self._writer.start()
        await ready

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._read_conn is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        with _unavailable_on_busy():
            return await loop.run_in_executor(self._reader, partial(fn, self._read_conn, *args, **kwargs))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._writer is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, args, kwargs, future, loop))
        with _unavailable_on_busy():
            return await future

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
        if self._read_conn is not None:
            conn, self._read_conn = self._read_conn, None
            await asyncio.get_running_loop().run_in_executor(self._reader, conn.close)
        self._reader.shutdown(wait=True)

    def _write_loop(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = connect(self.path)
            lock = WriteLock(self.path)
        except BaseException as error:
            loop.call_soon_threadsafe(ready.set_exception, error)
            return
        loop.call_soon_threadsafe(ready.set_result, None)
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                batch = [job]
                stop = False
                while len(batch) < self.MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit(conn, lock, batch)
                if stop:
                    return
        finally:
            conn.close()
            lock.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, lock: WriteLock, batch: list[_Job]) -> None:
        # A write that has waited longer than the busy timeout (the database was locked by something
        # else for long) gets its 503 now rather than after waiting its turn again.
        patience = schema.BUSY_TIMEOUT_MS / 1000
        batch = _fresh(batch, patience)
        if not batch:
            return
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            # Waited for in the kernel, which wakes the next writer the moment the holder unlocks
            # (polling with sleeps wasted up to a sleep at every hand-off). Writes that waited past
            # the busy timeout meanwhile get their 503 here.
            lock.acquire()
            try:
                batch = _fresh(batch, patience)
                if not batch:
                    return
                with transaction(conn):
                    for job in batch:
                        conn.execute("SAVEPOINT job")
                        try:
                            value = job.fn(conn, *job.args, **job.kwargs)
                        except BaseException as error:
                            if not conn.in_transaction:
                                raise  # SQLite rolled back the whole batch (disk full, I/O error)
                            conn.execute("ROLLBACK TO job")
                            conn.execute("RELEASE job")
                            outcomes.append((job, None, error))
                        else:
                            conn.execute("RELEASE job")
                            outcomes.append((job, value, None))
            finally:
                lock.release()
        except BaseException as error:
            # BEGIN or COMMIT failed (locked for too long, disk full): nothing of the batch is stored.
            outcomes = [(job, None, error) for job in batch]
        for job, value, failure in outcomes:
            job.settle(value, failure)


def _fresh(batch: list[_Job], patience: float) -> list[_Job]:
    """The jobs that have not waited past the busy timeout; the others get their 503 now."""
    moment = time.monotonic()
    fresh = []
    for job in batch:
        if moment - job.queued_at > patience:
            job.settle(error=sqlite3.OperationalError("database is locked: waited too long for the write lock"))
        else:
            fresh.append(job)
    return fresh


class _unavailable_on_busy:
    """Turn SQLite's 'locked', 'disk full' and I/O errors into a 503 the page retries."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if isinstance(error, sqlite3.OperationalError) and any(word in str(error).lower() for word in _UNAVAILABLE):
            raise Unavailable("the server is busy storing messages; please try again in a moment") from error
