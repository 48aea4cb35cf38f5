"""The bot's replies of one turn: the engine's texts, with the ones an LLM may write asked of it."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping

from combot import engine, store
from combot.llm import LLMReply
from combot.worker import Resources


async def bot_messages(res: Resources, participant: Any, factors: Mapping[str, str], step: engine.Step,
                        started: float) -> list[store.NewMessage]:
    """The replies to store: the engine's, with the ones an LLM may write asked of it concurrently.

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
        if allowed is not None and position >= allowed:
            return offline(reply, "participant limit")
        system = res.study.llm_prompt(reply.llm_task or "", factors, step.state.problem)
        if system is None:
            return offline(reply, "no prompt")
        outcome = await llm.complete(system, reply.source_text or reply.text)
        if isinstance(outcome, LLMReply):
            return store.NewMessage("bot", reply.kind, outcome.text, "llm", model=outcome.model,
                                    latency_ms=outcome.latency_ms)
        return offline(reply, outcome.reason)

    made = iter(await asyncio.gather(*(written(r, i) for i, r in enumerate(wanted))))
    return [next(made) if r.llm_task else offline(r) for r in step.replies]
