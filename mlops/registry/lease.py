"""The rollout lease: one writer of the routing at a time.

The lease lives in `state.json` itself (`"lease": {owner, token, acquired_at, heartbeat_at,
expires_at}`), so taking it, renewing it and every routing move it guards are one compare-and-swap
of one document, on every store (flock'd local directory, S3 If-Match/If-None-Match):

- a pipeline takes the lease before it trains and holds it, renewed by a heartbeat thread, until
  it promotes or gives up; every state write it makes checks in the same CAS that the lease is still
  its own (and renews it). A second pipeline waits, bounded, then fails naming the holder (exit 4).
- an operator's `mlops rollback` never waits: it drops whatever lease is there in the same write
  that moves production, so the pipeline's next write finds the lease gone and stops (exit 3)
  without promoting. A recorded operator rollback always wins.
- a writer that dies stops renewing: once `expires_at` passes the server routes the canary's share
  back to production by itself (`State.live_routing`), and the next pipeline takes the expired
  lease and puts the routing back in that same write. A live lease is never torn down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from mlops.errors import GateFailed, InfraError
from mlops.registry.releases import Registry, State
from mlops.registry.rollouts import finish, running, settle

log = logging.getLogger("mlops.lease")

DEFAULT_TTL_S = 30.0  # a dead writer's canary share is back on production within this long
POLL_S = 0.2


class LeaseHeld(InfraError):
    """Another pipeline holds the rollout lease (exit 4: retrying later is sensible)."""


class LeaseLost(GateFailed):
    """The lease was taken away (an operator rollback): the pipeline stops without promoting (exit 3)."""


def live(lease: dict[str, Any], at: float | None = None) -> bool:
    return bool(lease.get("token")) and float(lease.get("expires_at", 0)) > (time.time() if at is None else at)


def describe(lease: dict[str, Any]) -> str:
    left = float(lease.get("expires_at", 0)) - time.time()
    beat = time.time() - float(lease.get("heartbeat_at", 0))
    return f"{lease.get('owner', '?')} (last heartbeat {beat:.0f}s ago, expires in {max(left, 0):.0f}s)"


def recover_routing(st: State) -> bool:
    """Put all traffic back on production, dropping canary weights and shadow; True if it changed."""
    prod = st.stages.get("production")
    want = {prod: 100} if prod else {}
    if st.stages.get("canary") is None and st.routing in (want, {}) and not st.shadow:
        return False
    st.stages["canary"] = None
    st.routing, st.shadow = want, {}
    return True


class Lease:
    """A held rollout lease. Install it on a Registry (`registry.lease = lease`) so that every state
    write this process makes is conditional on still holding it."""

    def __init__(
        self,
        registry: Registry,
        owner: str,
        ttl: float = DEFAULT_TTL_S,
        publish: Callable[[State], None] | None = None,
    ) -> None:
        self.registry = registry
        # where the serving side reads the state when it is not the store (Modal's Dict): lease
        # writes (recovery, renewals) must reach it too, or the gateway would see the lease expire
        self.publish = publish
        self.owner = owner
        self.ttl = ttl
        self.token = secrets.token_hex(8)
        self.lost: str | None = None
        self.lost_event = threading.Event()  # set the moment this process learns it lost the lease
        self.recovered = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _mine(self, at: float) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "token": self.token,
            "acquired_at": at,
            "heartbeat_at": at,
            "expires_at": at + self.ttl,
        }

    def guard(self, change: Callable[[State], State | None]) -> Callable[[State], State | None]:
        """`change`, run only while the state still carries this lease; it renews the lease too."""

        def guarded(st: State) -> State | None:
            cur = st.lease or {}
            if cur.get("token") != self.token:
                raise self._lost(st)
            new = change(st)
            if new is not None:
                now = time.time()
                new.lease = dict(cur) | {"heartbeat_at": now, "expires_at": now + self.ttl}
            return new

        return guarded

    def _lost(self, st: State) -> LeaseLost:
        cur = st.lease or {}
        if cur.get("token"):
            who = f"it is now held by {cur.get('owner')}"
        else:
            who = f"{st.actor or 'someone'} took it at {st.updated_at} ({st.reason or 'no reason given'})"
        self.lost = f"lost the rollout lease: {who}"
        self.lost_event.set()
        return LeaseLost(f"{self.lost}; stopped without promoting (run `mlops releases` to see the routing)")

    # ------------------------------------------------------------------ acquire / renew / release

    def acquire(self, wait: float, say: Callable[[str], None] = lambda m: None) -> Lease:
        """Take the lease, waiting at most `wait` seconds for a live holder; a dead holder's rollout
        is recovered (all traffic to production) in the same write that takes the lease."""
        deadline = time.monotonic() + wait
        told = False
        while True:
            holder: dict[str, Any] = {}

            def take(st: State) -> State | None:
                nonlocal holder
                cur = st.lease or {}
                if live(cur) and cur.get("token") != self.token:
                    holder = cur
                    return None
                self.recovered = recover_routing(st)
                if cur.get("token") and running(st) and st.rollout.get("phase") in ("shadow", "canary"):
                    # the canary of a writer that died: it ends here, and the record says why
                    finish(st, "aborted", f"its driver {cur.get('owner')} stopped renewing the lease", self.owner)
                    self.recovered = True
                st.lease = self._mine(time.time())
                return st

            st = self._write(take, reason=f"rollout lease taken by {self.owner}")
            if (st.lease or {}).get("token") == self.token:
                if self.recovered:
                    say(
                        f"recovered an interrupted rollout (its lease had expired): all traffic back to production (state v{st.version})"
                    )
                self._start_heartbeat()
                settle(self.registry)
                return self
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"another rollout holds the lease: {describe(holder)}; waited {wait:.0f}s "
                    "(retry later, or raise deploy.rollout.lease_wait)"
                )
            if not told:
                say(f"waiting up to {wait:.0f}s for the rollout lease held by {describe(holder)}")
                told = True
            time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.01)))

    def _start_heartbeat(self) -> None:
        self.registry.lease = self
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="lease-heartbeat")
        self._beat.start()

    def renew(self) -> None:
        # update_state applies the guard (which renews) since this lease is installed on the registry
        self._write(lambda st: st, reason="lease heartbeat", quiet=True)

    def _write(self, change: Callable[[State], State | None], reason: str, quiet: bool = False) -> State:
        st = self.registry.update_state(change, reason=reason, actor=self.owner, quiet=quiet)
        if self.publish is not None:
            self.publish(st)
        return st

    def _heartbeat(self) -> None:
        # a third of the TTL: two heartbeats may fail (store hiccup) before the lease expires
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost:
                log.warning("%s", self.lost)
                return
            except Exception as e:  # keep beating: the lease survives until its expiry
                log.warning("lease heartbeat failed: %s", getattr(e, "headline", e))

    def release(self) -> None:
        """Give the lease back (if still held); the routing stays as the last write left it."""
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=30)
        if self.registry.lease is self:
            self.registry.lease = None
        if self.lost is not None:
            return

        def drop(st: State) -> State | None:
            if (st.lease or {}).get("token") != self.token:
                return None
            st.lease = {}
            return st

        with contextlib.suppress(Exception):  # an expired lease is as good as released
            self._write(drop, reason=f"rollout lease released by {self.owner}")


def owner_name(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def held(
    registry: Registry,
    kind: str,
    ttl: float,
    wait: float,
    say: Callable[[str], None] = lambda m: None,
    publish: Callable[[State], None] | None = None,
) -> Iterator[Lease]:
    lease = Lease(registry, owner_name(kind), ttl, publish).acquire(wait, say)
    try:
        yield lease
    finally:
        lease.release()


def rollout_lease(
    registry: Registry, rollout: Any, say: Callable[[str], None], publish: Callable[[State], None] | None = None
) -> contextlib.AbstractContextManager[Lease]:
    """The pipeline's lease, with the TTL and bounded wait of `deploy.rollout`; `publish` is the
    backend's hook that pushes a state to the serving side."""
    return held(registry, "pipeline", float(rollout.lease_ttl), float(rollout.lease_wait), say, publish)


def bake(registry: Registry, seconds: float) -> None:
    """Sleep through a canary's bake, but wake (LeaseLost) as soon as the heartbeat finds the lease
    taken away: a pre-empted pipeline stops within a heartbeat, not at the end of a long bake."""
    lease = registry.lease
    if lease is None:
        time.sleep(seconds)
    elif lease.lost_event.wait(seconds):
        raise lease._lost(registry.read_state()[0])


def preempt(st: State) -> dict[str, Any] | None:
    """For an operator's write: drop any lease in the same CAS; return the lease it dropped, if live."""
    cur = st.lease or {}
    st.lease = {}
    return cur if live(cur) else None
