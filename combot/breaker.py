"""The LLM's circuit breaker: a dead or hanging LLM costs participants the timeout only a few times.

After `failures` LLM calls in a row end in a timeout or an error (see `counts_as_failure`), the
breaker opens: for `cooldown` seconds nobody calls the LLM and the offline paraphraser answers at
once (`fallback_reason = "circuit open"`). Then it is half-open: exactly one call, the probe, goes
to the LLM while everyone else still gets the offline text; a probe that succeeds closes the
breaker, one that fails opens it for another cool-down.

The state is shared by every worker of one server through a 24-byte file beside the database
(`<database>.llm-breaker`), read and written under an flock: a hanging LLM is noticed once for the
whole server rather than once per worker (with 8 workers a per-worker run of failures would need
eight times as many participants to wait). The lock is held for one read and one write of that
file, microseconds, so it is taken on the event loop. Without a file (tests, `llm-check`) the state
lives in the process.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# run of failures, open until (epoch seconds, 0: closed), probe lease until (epoch seconds, 0: none)
_FORMAT = "<qdd"
_SIZE = struct.calcsize(_FORMAT)
# Fallback reasons that mean the service answered (a reply we would not show): it is alive.
_ALIVE_PREFIXES = ("bad response",)
OPEN_REASON = "circuit open"


def counts_as_failure(reason: str) -> bool:
    """Timeouts, a full worker, connection failures, HTTP errors and unexpected errors; not a reply
    that was merely unfit to show (the service answered, quickly)."""
    return not reason.startswith(_ALIVE_PREFIXES) and reason != OPEN_REASON


@dataclass(frozen=True)
class State:
    run: int = 0
    open_until: float = 0.0
    probe_until: float = 0.0


class _MemoryState:
    def __init__(self) -> None:
        self.state = State()

    def update(self, change: Callable[[State], State]) -> State:
        self.state = change(self.state)
        return self.state


class _FileState:
    """The state in a small file shared by the server's workers, changed under an exclusive flock."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def update(self, change: Callable[[State], State]) -> State:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, _SIZE, 0)
            before = State(*struct.unpack(_FORMAT, raw)) if len(raw) == _SIZE else State()
            after = change(before)
            if after != before:
                os.pwrite(self.fd, struct.pack(_FORMAT, after.run, after.open_until, after.probe_until), 0)
            return after
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class CircuitBreaker:
    """`admit()` before an LLM call ("call", "probe" or None: use the offline text), `record()` after."""

    def __init__(self, failures: int, cooldown: float, *, path: str | Path | None = None,
                 probe_lease: float = 10.0, clock: Callable[[], float] = time.time):
        self.failures = failures  # 0: never open
        self.cooldown = cooldown
        # A probe whose worker died never reports back: after this long another call may probe.
        self.probe_lease = probe_lease
        self.clock = clock
        self._state: _MemoryState | _FileState = _FileState(Path(path)) if path else _MemoryState()

    def admit(self) -> str | None:
        if self.failures <= 0:
            return "call"
        verdict: list[str | None] = [None]

        def change(state: State) -> State:
            now = self.clock()
            if not state.open_until:
                verdict[0] = "call"
                return state
            if now < state.open_until or now < state.probe_until:
                return state  # open, or half-open with a probe already out
            verdict[0] = "probe"
            return State(state.run, state.open_until, now + self.probe_lease)

        self._state.update(change)
        return verdict[0]

    def record(self, failed: bool, probe: bool = False) -> None:
        if self.failures <= 0:
            return

        def change(state: State) -> State:
            if not failed:
                return State()
            run = state.run + 1
            probe_until = 0.0 if probe else state.probe_until
            if probe or (run >= self.failures and not state.open_until):
                return State(run, self.clock() + self.cooldown, probe_until)
            return State(run, state.open_until, probe_until)

        self._state.update(change)

    def state(self) -> State:
        return self._state.update(lambda state: state)

    def close(self) -> None:
        if isinstance(self._state, _FileState):
            self._state.close()
