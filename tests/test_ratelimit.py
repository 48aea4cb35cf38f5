from __future__ import annotations

from combot.ratelimit import RateLimiter


def test_a_flood_is_limited_per_key_and_recovers() -> None:
    clock = [0.0]
    limiter = RateLimiter(5, 60.0, clock=lambda: clock[0])
    assert all(limiter.allow("a") for _ in range(5))
    assert not limiter.allow("a")
    assert limiter.allow("b")  # another participant is unaffected
    clock[0] += 12.0  # one message's worth of time
    assert limiter.allow("a") and not limiter.allow("a")


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(0, 60.0)
    assert all(limiter.allow("a") for _ in range(1000))
