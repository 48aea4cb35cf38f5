"""Reply timing: when the participant sees each bot reply, designed per cell, never an accident.

A cell's `[[timing]]` block (combot.toml) chooses a mode:

- "matched" (the default with an LLM): a reply that did not use the LLM is held for a delay drawn
  from the study's recent successful LLM reply times, so every cell's reply times follow the same
  distribution; without any LLM reply yet, the typing model below decides.
- "typing": a human-like delay, `base + characters / chars_per_second`, times a random factor in
  `1 +- jitter`, clipped to `[min, max]`; a reply that took longer to compute is shown when ready.
- "none" (the default without an LLM): shown when computed.

A turn's later replies (the empathy statement before the closing one) follow the one before
them after their own typing delay ("typing", "matched") or at once ("none").

`plan` is pure: given the replies, the compute time and the sample, it says when each reply is
shown. `RecentLatencies` is the worker's cached sample, read from the database every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Awaitable, Callable, Mapping, Sequence

log = logging.getLogger("combot.timing")

MODES = ("matched", "typing", "none")
# No designed delay may come near the request time limit.
MAX_SECONDS = 30.0


@dataclass(frozen=True)
class Timing:
    """A cell's reply timing: the mode and the typing model (seconds, characters per second)."""

    mode: str = "none"
    base: float = 0.8
    chars_per_second: float = 40.0
    jitter: float = 0.2
    min: float = 1.0
    max: float = 6.0

    @classmethod
    def from_values(cls, values: Mapping[str, Any], default_mode: str) -> Timing:
        known = {f.name for f in fields(cls)}
        given = {name: value for name, value in values.items() if name in known}
        given.setdefault("mode", default_mode)
        return cls(**given)

    def describe(self) -> str:
        """One line for the dashboard: what this cell's timing is designed to be."""
        typing = (f"{self.base:g} s + characters / {self.chars_per_second:g} per s, +-{self.jitter:.0%},"
                  f" {self.min:g}-{self.max:g} s")
        if self.mode == "none":
            return "none: shown when computed"
        if self.mode == "typing":
            return "typing: " + typing
        return "matched to recent LLM reply times (until there are some, typing: " + typing + ")"


def typing_ms(timing: Timing, text: str, rng: random.Random) -> int:
    """The typing model's delay for `text`, in milliseconds."""
    seconds = timing.base + len(text) / timing.chars_per_second
    seconds *= 1 + rng.uniform(-timing.jitter, timing.jitter)
    return round(1000 * min(timing.max, max(timing.min, seconds)))


@dataclass(frozen=True)
class Outgoing:
    """A reply as timing sees it: its text and whether an LLM wrote it."""

    text: str
    by_llm: bool = False


def first_delay_ms(timing: Timing, reply: Outgoing, sample: Sequence[int], rng: random.Random) -> int:
    """The designed delay of a turn's first reply, from the participant's message."""
    if timing.mode == "none":
        return 0
    if timing.mode == "matched":
        if reply.by_llm:
            return 0  # its own compute time is the very thing the others are matched to
        if sample:
            return int(rng.choice(sample))
    return typing_ms(timing, reply.text, rng)


def hold_limit_ms(request_timeout: float) -> int:
    """The longest the server may hold a turn's first reply: MAX_SECONDS, and never more than half
    the request timeout. A turn is stored only when its first reply is due, so a hold the request
    timeout cut short would store nothing, answer 503, and every retry would be held and cut again."""
    return round(1000 * min(MAX_SECONDS, request_timeout / 2))


def plan(timing: Timing, replies: Sequence[Outgoing], compute_ms: int, sample: Sequence[int],
         rng: random.Random, limit_ms: int = round(MAX_SECONDS * 1000)) -> list[int]:
    """`shown_ms` of each reply: milliseconds from the participant's message to the reply being shown.

    The first is shown at its designed delay (held no longer than `limit_ms`, see `hold_limit_ms`)
    or when computed, whichever is later; each later one follows the one before it after its own
    typing delay (none in mode "none").
    """
    shown: list[int] = []
    for position, reply in enumerate(replies):
        if position == 0:
            shown.append(max(compute_ms, min(limit_ms, first_delay_ms(timing, reply, sample, rng))))
        else:
            gap = 0 if timing.mode == "none" else typing_ms(timing, reply.text, rng)
            shown.append(shown[-1] + gap)
    return shown


class RecentLatencies:
    """The study's recent successful LLM reply times (ms), as one worker sees them.

    Read from the database at most every `refresh` seconds; a request that finds the sample stale
    starts a reload in the background and uses the sample it has. While the sample is empty (a new
    study, or one whose LLM has not answered lately) it is read at most every `empty_refresh`
    seconds and the request waits for that read, so the first LLM replies are used at once.
    """

    def __init__(self, load: Callable[[], Awaitable[Sequence[int]]], refresh: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, empty_refresh: float = 0.5):
        self._load = load
        self.refresh = refresh
        self.empty_refresh = empty_refresh
        self.clock = clock
        self._values: tuple[int, ...] = ()
        self._loaded_at: float | None = None
        self._pending: asyncio.Task[None] | None = None

    async def get(self) -> tuple[int, ...]:
        every = self.refresh if self._values else self.empty_refresh
        if self._loaded_at is None or self.clock() - self._loaded_at >= every:
            if self._pending is None:
                self._pending = asyncio.get_running_loop().create_task(self._reload())
            if not self._values:
                await asyncio.shield(self._pending)
        return self._values

    async def _reload(self) -> None:
        try:
            self._values = tuple(int(v) for v in await self._load() if v is not None)
        except Exception:  # a busy database: keep the old sample, try again after `refresh`
            log.warning("could not read recent LLM reply times", exc_info=True)
        finally:
            self._loaded_at = self.clock()
            self._pending = None


class Punctual:
    """Sleeps that end on time on average: an event loop wakes from a timed sleep late, by a
    rounding to its poll's millisecond and the process's own wake-up (~1 ms on a quiet 8-worker
    server), so a reply held for its designed delay was shown that much later than an LLM reply of
    the same designed time, whose lateness is already inside the LLM reply times it is drawn from
    (bench/timing_matched.py: client time minus `shown_ms`, median 8.3 ms held against 7.2 ms LLM,
    enough for a two-sample test to tell the cells apart). Each worker keeps its recent lateness
    and starts each sleep that much earlier (its median, never more than the sleep itself)."""

    def __init__(self, window: int = 101, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self._late: deque[float] = deque(maxlen=window)
        self._clock = clock
        self._sleep = sleep

    def lateness(self) -> float:
        """Seconds: the median lateness of the recent sleeps (0 before any)."""
        return statistics.median(self._late) if self._late else 0.0

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        clock = self._clock or asyncio.get_running_loop().time
        early = min(max(0.0, self.lateness()), seconds)
        due = clock() + seconds - early
        await self._sleep(seconds - early)
        self._late.append(clock() - due)
