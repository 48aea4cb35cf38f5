"""The bot's replies of one turn: the engine's texts, with the ones an LLM may write asked of it."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from combot import engine, store
from combot.llm import Fallback, LLMReply
from combot.timing import Outgoing, Punctual, hold_limit_ms, plan
from combot.worker import Resources


@dataclass
class EarlyCall:
    """An LLM call started while the first message is still being classified."""

    system: str
    text: str
    task: asyncio.Task[LLMReply | Fallback]

    def cancel(self) -> None:
        self.task.cancel()


def start_early(res: Resources, participant: Any, factors: Mapping[str, str], state: engine.State, text: str,
                seed: int, link_values: Mapping[str, str]) -> EarlyCall | None:
    """Start the first message's LLM call before its problem type is known, when it can be known.

    The engine is pure, so the reply it would give for every problem type is computed up front.
    Only when every type has an LLM-written reply is a call started (with the prompt most of them
    share): a type answered from a script would waste it. If the label then asks for another
    prompt (the catch-all's own, say), the early call is cancelled and the right one made; the
    participant waits for the LLM alone instead of for the classifier and then the LLM.
    """
    llm = res.llm
    if llm is None or not engine.needs_classification(state):
        return None
    # "hi": the opener head will ask again, and a re-prompt needs no LLM (one provider call spared).
    if res.classifier.opener is not None and engine.likely_reprompted(res.study, state, text):
        return None
    allowed = llm.config.calls_allowed(participant["turns"])
    if allowed is not None and allowed < 1:
        return None
    calls: Counter[tuple[str, str]] = Counter()
    for problem in res.study.problem_types:
        step = engine.respond(res.study, factors, state, text, problem=problem, seed=seed, link_values=link_values)
        wanted = [r for r in step.replies if r.llm_task]
        if not wanted:
            return None
        system = res.study.llm_prompt(wanted[0].llm_task or "", factors, step.state.problem)
        if system is None:
            return None
        calls[(system, wanted[0].source_text or wanted[0].text)] += 1
    (system, user), _ = calls.most_common(1)[0]
    return EarlyCall(system, user, asyncio.ensure_future(llm.complete(system, user)))


async def bot_messages(res: Resources, participant: Any, factors: Mapping[str, str], step: engine.Step,
                       started: float, early: EarlyCall | None = None) -> list[store.NewMessage]:
    """The replies to store: the engine's, with the ones an LLM may write asked of it concurrently.

    An `early` call with the same prompt and text as a reply's is used for it; otherwise the
    caller cancels it.

    Any LLM failure keeps the engine's offline text (produced_by 'template') and records why; the
    adapter gives up within its timeout, so a participant never waits longer or sees an error.
    """
    def offline(reply: engine.Reply, reason: str | None = None) -> store.NewMessage:
        return store.NewMessage("bot", reply.kind, reply.text, reply.produced_by,
                                latency_ms=int((time.perf_counter() - started) * 1000), fallback_reason=reason)

    llm = res.llm
    wanted = [r for r in step.replies if r.llm_task]
    if llm is None or not wanted:
        return [offline(r) for r in step.replies]
    # The engine gives at most one LLM-writable reply per turn (tests/test_llm.py holds it to that),
    # so `turns` bounds the LLM replies so far; the count is read only when that bound could reach the
    # cap. Under load every read waits in the worker's database queue (p95 0.3 s at 300 participants).
    allowed = llm.config.calls_allowed(participant["turns"])
    if allowed is not None and allowed < len(wanted):
        allowed = llm.config.calls_allowed(await res.store.read(store.llm_reply_count, participant["id"]))

    async def written(reply: engine.Reply, position: int) -> store.NewMessage:
        nonlocal early
        if allowed is not None and position >= allowed:
            return offline(reply, "participant limit")
        system = res.study.llm_prompt(reply.llm_task or "", factors, step.state.problem)
        if system is None:
            return offline(reply, "no prompt")
        user = reply.source_text or reply.text
        if early is not None and (early.system, early.text) == (system, user):
            outcome, early = await early.task, None
        else:
            outcome = await llm.complete(system, user)
        if isinstance(outcome, LLMReply):
            # latency_ms has one meaning for every reply: from the participant's message until its text
            # was ready (the model's call alone would leave out the wait for a slot).
            return store.NewMessage("bot", reply.kind, outcome.text, "llm", model=outcome.model,
                                    latency_ms=int((time.perf_counter() - started) * 1000))
        return offline(reply, outcome.reason)

    made = iter(await asyncio.gather(*(written(r, i) for i, r in enumerate(wanted))))
    return [next(made) if r.llm_task else offline(r) for r in step.replies]


async def timed(res: Resources, factors: Mapping[str, str], replies: Sequence[store.NewMessage],
                started: float, classified: bool = False) -> list[store.NewMessage]:
    """The replies with `compute_ms` (now) and `shown_ms` (when each is due), by the cell's timing.

    In "matched" mode a reply to an opening the classifier read is drawn from LLM replies to
    openings (they include the classification), any other from LLM replies to follow-ups, so each
    kind of turn has the same reply times in every cell; the other kind's sample stands in while a
    kind has none yet."""
    # Rounded, not truncated: a held reply is due at an LLM reply time drawn from these, and truncation
    # would show it half a millisecond before the LLM replies it copies, on average.
    compute_ms = round((time.perf_counter() - started) * 1000)
    timing = res.study.timing(factors)
    sample: Sequence[int] = ()
    if timing.mode == "matched":
        pools = [res.opening_latencies, res.latencies] if classified else [res.latencies, res.opening_latencies]
        for pool in pools:
            if pool is not None and (sample := await pool.get()):
                break
    shown = plan(timing, [Outgoing(r.text, r.produced_by == "llm") for r in replies], compute_ms, sample,
                 random.Random(), hold_limit_ms(res.study.settings["server.request_timeout"]))
    return [replace(r, compute_ms=compute_ms, shown_ms=due) for r, due in zip(replies, shown)]


# This worker's held replies (one per process: each worker has its own event loop).
_punctual = Punctual()


async def hold(replies: Sequence[store.NewMessage], started: float) -> None:
    """Wait (an idle coroutine, no thread) until the turn's first reply is due, `shown_ms` after the
    participant's message arrived (`started`, a perf_counter time), before the turn is stored.

    An LLM reply is stored when its text arrives and sent when stored; a held reply is stored when
    it is due and sent when stored: the same path through the store at the same moment of the turn,
    so the commit adds the same to both (held after the commit, a held reply's commit came when the
    messages of a turn arrive together, the LLM's a second later, and the cells differed by that).
    Nothing acknowledged waits unstored: the participant has no answer until the turn is stored,
    and a retry of the same message is then answered from the store at once. The turn's later
    replies are paced by the client from their `delay_ms`."""
    if replies and replies[0].shown_ms is not None:
        # `plan` already held the designed delay within `hold_limit_ms`; past it, shown_ms is
        # the compute time, which has passed.
        await _punctual.sleep(started + replies[0].shown_ms / 1000 - time.perf_counter())


def delays_ms(replies: Sequence[Any]) -> list[int]:
    """Each reply's `delay_ms` for the client: milliseconds after the turn's first reply is shown."""
    first = replies[0]["shown_ms"] if replies else None
    return [max(0, row["shown_ms"] - first) if first is not None and row["shown_ms"] is not None else 0
            for row in replies]
