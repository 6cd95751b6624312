"""Fault injection for tests and drills: make one named release fail a share of its requests.

A testing hook, read by the local server from its environment:

    MLOPS_FAULT_RELEASE=<release id>   the release that misbehaves
    MLOPS_FAULT_RATE=0.1               the share of its requests answered 500 (0..1)
    MLOPS_FAULT_SEED=7                 optional: where in the cycle the first error falls
    MLOPS_FAULT_PATTERN='^zq'          optional: only requests whose prompt matches (re.search) count,
                                       a release bad on a traffic pattern its eval suite lacks

Requests mirrored to the release in a shadow step (shadow.py) fail the same way: the user still
gets production's answer, and the shadow window counts the error against the release.

The errors are spread evenly (error diffusion from a seeded phase): a rate of 0.1 fails exactly one
request in every ten the release takes, so a test that says "a release failing 10% of its requests
is never promoted" does not depend on luck. The failure is real as far as the rollout can tell: the
client gets HTTP 500 and the server's live stats count it against that release. Never set these
variables on a server that real users call.
"""

from __future__ import annotations

import os
import random
import re
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    release: str
    rate: float
    seed: int = 0
    pattern: str | None = None
    injected: int = field(default=0, compare=False)
    _acc: float = field(default=0.0, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be within 0..1, got {self.rate}")
        self._acc = random.Random(self.seed).random()

    def fire(self, release: str, prompt: str = "") -> bool:
        """True when this request (to `release`, asking `prompt`) must fail."""
        if release != self.release or self.rate <= 0:
            return False
        if self.pattern is not None and re.search(self.pattern, prompt) is None:
            return False
        with self._lock:
            self._acc += self.rate
            if self._acc >= 1.0:
                self._acc -= 1.0
                self.injected += 1
                return True
            return False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Fault | None:
        e = os.environ if env is None else env
        release = e.get("MLOPS_FAULT_RELEASE")
        if not release:
            return None
        rate, seed = float(e.get("MLOPS_FAULT_RATE", "1")), int(e.get("MLOPS_FAULT_SEED", "0"))
        return cls(release, rate, seed, e.get("MLOPS_FAULT_PATTERN") or None)
