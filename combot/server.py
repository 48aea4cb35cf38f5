"""The multi-process launcher: binds once, runs N Hypercorn workers, and replaces any that die.

Hypercorn's own `hypercorn.run.run` stops the whole server when one worker exits with an error
(a crash, an OOM kill), which would end a running study. Here a dead worker is logged and
replaced while the others keep serving; SIGTERM or SIGINT asks every worker to finish its
in-flight requests and exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from hypercorn.config import Config

from combot import preflight, store
from combot.accesslog import PrivateLogger
from combot.settings import OPTIONS
from combot.study import Study

log = logging.getLogger("combot.server")

# A worker that keeps dying at start-up (a broken model file, an unreadable database) should stop
# the server with a clear message instead of being restarted forever.
CRASH_WINDOW_SECONDS = 30.0
MAX_CRASHES_IN_WINDOW = 10


@dataclass(frozen=True)
class ServeOptions:
    config_path: str | None
    database: Path
    host: str
    port: int
    workers: int
    graceful_timeout: float
    max_requests: int
    access_log: str
    request_timeout: float
    certfile: str = ""
    keyfile: str = ""
    keep_alive_timeout: float = 75.0


def hypercorn_config(options: ServeOptions) -> Config:
    config = Config()
    host = f"[{options.host}]" if ":" in options.host and not options.host.startswith("[") else options.host
    config.bind = [f"{host}:{options.port}"]
    config.application_path = "combot.web:create_app()"
    config.workers = options.workers
    config.graceful_timeout = options.graceful_timeout
    config.keep_alive_timeout = options.keep_alive_timeout
    config.backlog = 2048
    if options.max_requests > 0:
        config.max_requests = options.max_requests
        config.max_requests_jitter = max(1, options.max_requests // 10)
    if options.access_log:
        config.accesslog = options.access_log
    config.errorlog = "-"
    config.logger_class = PrivateLogger  # participant ids, never session tokens or query strings
    if options.certfile:
        # Hypercorn's own TLS (and HTTP/2 through ALPN); the certificate is read by each worker.
        config.certfile = str(Path(options.certfile).resolve())
        config.keyfile = str(Path(options.keyfile).resolve())
    return config


# Set in a worker process: the event its app sets once it can answer (see `notify_ready`).
_ready_event: Any = None


def notify_ready() -> None:
    """Called by the app once its lifespan has loaded everything; tells the supervisor."""
    if _ready_event is not None:
        _ready_event.set()


# How long a thread waiting for the GIL lets the running one go on (Python's default: 5 ms). A
# worker's writer thread holds the cross-process write lock while it runs a transaction, and gives
# the GIL up at every SQLite call; with the event loop busy (parsing, JSON) it waited up to 5 ms to
# win it back each time, so every process's writes waited behind a lock held ~10x longer than the
# work in it. bench/write_lock.py, 8 processes, a busy loop in each: 811-841 writes/s at 5 ms,
# 2,635-2,821 at 0.5 ms (1 ms: 2,113; 0.1 ms: 1,216, switching costs more than it saves).
WORKER_SWITCH_INTERVAL = 0.0005


class _Stop:
    """What a worker's Hypercorn polls (every 0.1 s) to know it must finish its requests and exit:
    the supervisor's shutdown event, or the supervisor gone (`kill -9`, the out-of-memory killer),
    seen as the end of a pipe only the supervisor holds open. Without the second, workers whose
    supervisor was killed went on serving the port, unsupervised, until someone killed each one."""

    def __init__(self, event: Any, supervisor: Connection | None):
        self.event = event
        self.supervisor = supervisor

    def is_set(self) -> bool:
        if self.event.is_set():
            return True
        if self.supervisor is None:
            return False
        try:
            return self.supervisor.poll()  # nothing is ever sent: readable means the other end closed
        except (EOFError, OSError):
            return True


def _worker(config: Config, sockets: Any, shutdown_event: Any, ready_event: Any = None,
            study_env: dict[str, str] | None = None, supervisor: Connection | None = None) -> None:
    global _ready_event
    from hypercorn.asyncio.run import asyncio_worker

    from combot import graceful

    graceful.install()  # a stop answers every request it takes
    _ready_event = ready_event
    sys.setswitchinterval(WORKER_SWITCH_INTERVAL)
    # The study version the supervisor checked, handed over here rather than through the exec'd
    # environment (whose single strings are limited to 128 KiB).
    os.environ.update(study_env or {})

    # Hypercorn logs its own messages; Combot's get one handler of their own (not the root's, which
    # would print Hypercorn's twice).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    combot_log = logging.getLogger("combot")
    combot_log.addHandler(handler)
    combot_log.setLevel(logging.INFO)
    combot_log.propagate = False
    asyncio_worker(config, sockets, _Stop(shutdown_event, supervisor))  # type: ignore[arg-type]


def worker_context() -> Any:
    """Workers are forked from a forkserver that has imported what they all need (combot.preload),
    so those pages are shared; where there is no forkserver (not Linux/macOS), fresh interpreters."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["combot.preload"])
    return ctx


def serve(study: Study, options: ServeOptions, on_ready: Any = None) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit code. `study` is stamped (its version set)."""
    store.check_database(options.database)
    # Workers learn the study and database from the environment (and the arguments, see study_env).
    if options.config_path:
        os.environ["COMBOT_CONFIG"] = str(Path(options.config_path).resolve())
    else:
        os.environ.pop("COMBOT_CONFIG", None)
    # Every resolved setting goes to the workers through its environment variable, so flags the
    # user passed here win there too.
    worker_env = {"COMBOT_CONFIG": os.environ.get("COMBOT_CONFIG", "")}
    for opt in OPTIONS:
        value = study.settings[f"{opt.section}.{opt.name}"]
        os.environ[opt.env_name] = worker_env[opt.env_name] = opt.to_env(value)
    os.environ["COMBOT_DB"] = worker_env["COMBOT_DB"] = str(options.database.resolve())
    # numpy's OpenBLAS would start a thread per core at import (in the forkserver, before forking);
    # the classifier's head is one small matrix product.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    # Handed to each worker with its arguments, not only through the environment: a forkserver keeps
    # the environment it started with, and the study text may pass an environment string's 128 KiB.
    study_env = {**worker_env, "COMBOT_STUDY_TEXT": study.version_text, "COMBOT_STUDY_VERSION": study.version,
                 "COMBOT_STUDY_HEAD_SHA256": study.head_sha256, "COMBOT_STUDY_ENCODER_SHA256": study.encoder_sha256}
    config = hypercorn_config(options)
    # One socket, bound here and shared with the workers: without SO_REUSEPORT (which Hypercorn sets
    # for several workers) a port another server holds is refused instead of silently shared.
    config.workers = 1
    try:
        sockets = config.create_sockets()
    except OSError as error:
        raise preflight.port_refusal(error, options.host, options.port) from None
    config.workers = options.workers
    ctx = worker_context()
    shutdown_event = ctx.Event()
    first_ready = ctx.Event()
    # Workers hold the reading end; this process alone holds the writing end, so its death, however
    # abrupt, reaches every worker (see _Stop).
    watched_end, alive = ctx.Pipe(duplex=False)
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            log.info("received %s: finishing in-flight requests", signal.Signals(signum).name)
        stopping = True
        shutdown_event.set()

    # Workers inherit "ignore SIGINT", so Ctrl-C in a terminal reaches only this supervisor, which
    # then shuts every worker down gracefully through the shared event.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes: list[BaseProcess] = []
    crashes: list[float] = []
    exit_code = 0

    def start_one() -> None:
        process = ctx.Process(target=_worker, kwargs={"config": config, "sockets": sockets,
                                                      "shutdown_event": shutdown_event, "ready_event": first_ready,
                                                      "study_env": study_env, "supervisor": watched_end},
                              daemon=False)
        process.start()
        processes.append(process)

    try:
        # One worker first, alone on the CPU, so the first participant is answered as soon as it can
        # be; the rest start once it is ready (eight cold starts at once on two cores take seconds).
        signal.signal(signal.SIGTERM, stop)
        start_one()
        deadline = time.monotonic() + 60
        while not (first_ready.wait(0.05) or stopping or processes[0].exitcode is not None
                   or time.monotonic() > deadline):
            pass
        for _ in range(options.workers - 1):
            start_one()
        # Only now: workers started above inherit "ignore SIGINT" (an ignored signal survives exec).
        signal.signal(signal.SIGINT, stop)
        if on_ready is not None:
            on_ready()
        while not stopping:
            wait([p.sentinel for p in processes], timeout=1.0)
            for process in [p for p in processes if p.exitcode is not None]:
                process.join()
                processes.remove(process)
                if stopping:
                    continue
                if process.exitcode == 0:
                    log.info("worker %s recycled; starting a new one", process.pid)
                else:
                    log.error("worker %s died (exit code %s); starting a replacement", process.pid, process.exitcode)
                    moment = time.monotonic()
                    crashes[:] = [t for t in crashes if moment - t < CRASH_WINDOW_SECONDS] + [moment]
                    if len(crashes) > MAX_CRASHES_IN_WINDOW:
                        log.error("workers keep dying; stopping the server. See the errors above.")
                        exit_code = 1
                        stopping = True
                        shutdown_event.set()
                        break
                start_one()
        deadline = time.monotonic() + options.graceful_timeout + 5
        for process in processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
        for process in processes:
            if process.exitcode is None:
                log.warning("worker %s did not stop in time; terminating it", process.pid)
                process.terminate()
                process.join(5)
    finally:
        signal.signal(signal.SIGINT, previous)
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()
        alive.close()
        watched_end.close()
    return exit_code


def bound_url(host: str, port: int, tls: bool = False) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}/"
