"""Retrying an HTTP call: tenacity does the loop; callers say what is worth retrying.

The first attempt runs before tenacity is imported or set up: almost every call succeeds at once,
and an eval makes one call per case, so the loop's machinery is paid for only by calls that fail.

Both callers (the eval harness asking an endpoint, the judge client asking a judge) raise
`Retryable` for an attempt worth repeating, with the server's Retry-After as a hint when it gave
one, and return their answer otherwise. Which failures retry differs per caller and stays there.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tenacity import RetryCallState

T = TypeVar("T")


class Retryable(Exception):
    """This attempt failed in a way another attempt may not: `wait_s` is the server's hint, if any."""

    def __init__(self, reason: str, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait_s = wait_s
        self.attempts = 1


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: '1', '0.2', or an HTTP date. None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        secs = when.timestamp() - time.time()
    if secs != secs:  # NaN
        return None
    return max(0.0, secs)


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    retries: int,
    backoff: Callable[[int], float],
    on_retry: Callable[[Retryable, int, float], None] | None = None,
) -> T:
    """Run `attempt` until it returns, at most `retries` more times while it raises Retryable.

    `backoff(n)` is the wait before retry n+1 when the server gave no hint. `on_retry(error,
    retry_number, wait_s)` is told before each wait (for counters and logs). When attempts run
    out, the last Retryable is raised with `attempts` set.
    """

    try:
        return await attempt()
    except Retryable as e:
        if retries <= 0:
            raise
        first = e
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

    calls = 0

    async def again() -> T:
        """The attempt already made counts as tenacity's first: it raises what it raised."""
        nonlocal calls
        calls += 1
        if calls == 1:
            raise first
        return await attempt()

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = exc.wait_s if isinstance(exc, Retryable) else None
        return hint if hint is not None else backoff(state.attempt_number - 1)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(exc, Retryable):
            on_retry(exc, state.attempt_number, state.upcoming_sleep)

    loop = AsyncRetrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait,
        retry=retry_if_exception_type(Retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return await loop(again)
    except Retryable as e:
        e.attempts = int(loop.statistics.get("attempt_number", 1))
        raise
