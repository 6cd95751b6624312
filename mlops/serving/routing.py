"""Which release answers a request: pins first, then a running A/B experiment's arm for a user key,
then a stable hash of the request key over weights."""

from __future__ import annotations

import hashlib
from typing import Any

from mlops.registry.releases import State


def bucket(key: str) -> int:
    """A stable 0..9999 bucket for a request key, the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000


def pick(state: State, key: str | None, pin: str | None = None, counter: int = 0) -> str | None:
    """The release for one request. `key` (a user id or header) keeps a user on one release;
    without a key, `counter` spreads requests by weight deterministically."""
    if pin:
        return pin
    live = state.live_routing()
    if key and (arm := experiment_arm(state.experiment, key, live)):
        return arm
    routes = sorted(live.items())  # sorted: the same order everywhere
    if not routes:
        return state.stages.get("production")
    point = bucket(key) if key else (counter * 7919) % 10_000
    edge = 0
    for release, weight in routes:
        edge += weight * 100
        if point < edge:
            return release
    return routes[-1][0]


def experiment_arm(exp: dict[str, Any], key: str, live: dict[str, int]) -> str | None:
    """A user's arm in a running experiment (mlops/flows/experiment.py): the hash is salted with
    the experiment's id, so a user keeps one arm for the experiment's life, and who was in the
    treatment of the last experiment (or canary) says nothing about this one. None: no experiment,
    or its arms are not both routed (a lease expired: production answers)."""
    if not exp or exp.get("status", "running") != "running":
        return None
    a, b = exp.get("baseline"), exp.get("release")
    if not (a in live and b in live):
        return None
    return str(b) if bucket(f"{exp.get('id')}:{key}") < int(exp.get("share", 0)) * 100 else str(a)


def shadow_target(st: State, release: str, key: str | None, pinned: bool, n: int) -> str | None:
    """The shadow release that production's request `n` (user `key`) is mirrored to, or None: only
    unpinned requests production answers, `share` of them, sticky by user (keyless ones spread evenly).
    The local server and the Modal gateway pick alike."""
    target = st.shadow.get("release")
    if not target or pinned or release == target or release != st.stages.get("production"):
        return None
    share = float(st.shadow.get("share", 0.0))
    point = bucket(f"shadow:{key}") if key else (n * 7919) % 10_000
    return str(target) if point < share * 10_000 else None
