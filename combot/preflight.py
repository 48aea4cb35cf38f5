"""What `serve` makes sure of before it binds a port or starts a worker, each refusal one line.

- One server per database: the supervisor holds an exclusive lock on `<database>.serving` (an
  flock, so it is released however the process ends, kill -9 included) and writes its pid and port
  into it; a second `serve` of the same database reads them and exits at once, disturbing nothing.
- The database can be written: not a read-only file or folder, not a full disk.
- The port can be bound (the supervisor binds once and shares the socket with its workers, so
  another server already on the port is refused instead of sharing its connections).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

from combot.errors import CombotError

SERVING_SUFFIX = ".serving"
# Less free space than this at start is a full disk: a study needs room for its WAL and messages.
MIN_FREE_BYTES = 4 << 20
_PROBE_BYTES = 64 << 10


class ServeRefused(CombotError):
    """`serve` cannot start: another server has the database, or the database, disk or port is unusable."""


def serving_path(database: Path) -> Path:
    return Path(str(database) + SERVING_SUFFIX)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n // 1024} KB"


def check_writable(database: Path) -> None:
    """The database (or its folder, when it does not exist yet) can be written, and its disk has room."""
    folder = database.resolve().parent
    if database.exists() and not os.access(database, os.W_OK):
        raise ServeRefused(f"{database} is read-only: serve needs to write to it. Serve a writable copy with"
                           " --database, or read it with `combot export`, which works on read-only databases")
    if not os.access(folder, os.W_OK):
        raise ServeRefused(f"the folder {folder} is read-only (serve keeps {database.name}, its -wal and -shm"
                           " files and its lock there): choose a writable folder with --database")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ServeRefused(f"the disk holding {database} is full ({_size(free)} free): free some space first;"
                           " serve needs room for new messages and the write-ahead log")
    probe = folder / f".{database.name}.probe-{os.getpid()}"
    try:
        with open(probe, "wb") as out:
            out.write(b"\0" * _PROBE_BYTES)
            out.flush()
            os.fsync(out.fileno())
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ServeRefused(f"the disk holding {database} is full: free some space first; serve needs room"
                               " for new messages and the write-ahead log") from None
        if error.errno == errno.EROFS:
            raise ServeRefused(f"{folder} is on a read-only file system: serve a copy on a writable disk with"
                               " --database, or read it with `combot export`") from None
        raise ServeRefused(f"cannot write beside {database}: {error.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@contextlib.contextmanager
def claimed(database: Path, host: str, port: int) -> Iterator[None]:
    """Hold the one-server lock of `database` for as long as the block runs."""
    check_writable(database)
    path = serving_path(database)
    handle: IO[str] = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            raise ServeRefused(f"{database.name} is being served by pid {holder.get('pid', '?')} on port"
                               f" {holder.get('port', '?')}: stop that server first, or serve another"
                               " database with --database") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": host, "port": port}) + "\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays, its content is read only under the lock


def port_refusal(error: OSError, host: str, port: int) -> ServeRefused:
    """One line for a socket that cannot be bound."""
    if error.errno == errno.EADDRINUSE:
        return ServeRefused(f"port {port} is already in use by another program: stop it, or serve on another port"
                            " with --port (or [server] port)")
    if error.errno == errno.EACCES:
        return ServeRefused(f"port {port} needs root on this machine: use a port above 1023 with --port and put"
                            " a reverse proxy in front")
    if error.errno == errno.EADDRNOTAVAIL:
        return ServeRefused(f"{host} is not an address of this machine: use --host 0.0.0.0 (every interface)"
                            " or one of its addresses")
    return ServeRefused(f"cannot listen on {host}:{port}: {error.strerror}")
