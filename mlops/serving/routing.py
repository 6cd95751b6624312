"""Which release answers a request: pins first, then a stable hash of the request key over weights."""

from __future__ import annotations

import hashlib

from mlops.registry.releases import State


def bucket(key: str) -> int:
    """A stable 0..9999 bucket for a request key, the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000


def pick(state: State, key: str | None, pin: str | None = None, counter: int = 0) -> str | None:
    """The release for one request. `key` (a user id or header) keeps a user on one release;
    without a key, `counter` spreads requests by weight deterministically."""
    if pin:
        return pin
    routes = sorted(state.live_routing().items())  # sorted: the same order everywhere
    if not routes:
        return state.stages.get("production")
    point = bucket(key) if key else (counter * 7919) % 10_000
    edge = 0
    for release, weight in routes:
        edge += weight * 100
        if point < edge:
            return release
    return routes[-1][0]
