"""CPU per LLM call in a worker: Combot's adapter (combot/llmhttp.py) against httpx, side by side.

Both send the same chat-completions request to the fake LLM (its own process, answering after
`--latency` s) with `--concurrency` calls at once, and count this process's CPU time per call
(event loop, client, JSON, the adapter's checks). Alternating rounds; medians are printed.

    python bench/llm_client_cpu.py --concurrency 1 8 40 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx

from combot.fakellm import running_fake_llm
from combot.llm import LLM, LLMConfig, LLMReply, parse_completion

SYSTEM = "You paraphrase what a customer tells you about a bad experience, in one or two sentences. " * 6
TEXT = "I ordered a standing lamp and when it arrived the shade was cracked and the switch did not work."


async def cpu_per_call(call: Callable[[], Awaitable[None]], concurrency: int, calls: int) -> float:
    """This process's CPU seconds per call, `concurrency` calls at once, after one warm-up round."""
    await asyncio.gather(*(call() for _ in range(concurrency)))  # connections up
    rounds = calls // concurrency
    started = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(call() for _ in range(concurrency)))
    return (time.process_time() - started) / (rounds * concurrency)


async def combot_calls(url: str, concurrency: int, calls: int) -> float:
    async with LLM(LLMConfig(base_url=url, model="fake", timeout=30, max_in_flight=max(concurrency, 1))) as llm:
        async def call() -> None:
            outcome = await llm.complete(SYSTEM, TEXT)
            assert isinstance(outcome, LLMReply), outcome

        return await cpu_per_call(call, concurrency, calls)


async def httpx_calls(url: str, concurrency: int, calls: int) -> float:
    """The adapter's old way: httpx.AsyncClient pools of 8 connections, the body streamed."""
    payload = {"model": "fake", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEXT}],
               "temperature": 0.7, "max_tokens": 150}
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    clients = [httpx.AsyncClient(timeout=30, limits=limits) for _ in range(-(-concurrency // 8))]
    in_turn = itertools.cycle(clients)

    async def call() -> None:
        async with next(in_turn).stream("POST", url + "/chat/completions", json=payload) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
        parse_completion(bytes(body), "fake")

    try:
        return await cpu_per_call(call, concurrency, calls)
    finally:
        for client in clients:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 40])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args()
    with running_fake_llm(latency=args.latency) as url:
        for concurrency in args.concurrency:
            calls = max(args.calls, concurrency)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(asyncio.run(combot_calls(url, concurrency, calls)) * 1000)
                theirs.append(asyncio.run(httpx_calls(url, concurrency, calls)) * 1000)
            print(f"{concurrency:>4} at once: combot {statistics.median(ours):.3f} ms CPU per call, "
                  f"httpx {statistics.median(theirs):.3f} ms, ratio {statistics.median(ours) / statistics.median(theirs):.2f}"
                  f" (medians of {args.rounds})", flush=True)


if __name__ == "__main__":
    main()
