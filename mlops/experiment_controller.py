"""Stops an A/B experiment by itself: the rollout controller's hook for `mlops experiment start --auto-stop`.

Every `deploy.rollout.interval` the rollout controller (`mlops serve`'s controller process, the
scheduled function on Modal: wherever `Controller.tick()` runs) replays the running experiment's
traffic through its sequential test (mlops/flows/experiment.py `analyse`) and ends it

- at the test's verdict (`winner A`, `winner B`, or `no difference` once `--max-samples` per arm
  were seen), promoting a winning B when started with `--promote-winner`; a losing B just ends;
- at `--max-duration` without a verdict: `inconclusive`, production stays.

Stopping at the first crossing keeps the false-positive rate at alpha: the mSPRT's p-value is
always valid (mlops/evals/sequential.py), so a stop at any look, however chosen, is covered; this
is what it was picked for. The stop is `experiment.stop`, the same compare-and-swap `mlops
experiment stop [--promote-winner]` makes, with `controller:experiment` as the one who decided
(in the archived record, the release's history and `mlops experiment status --json`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mlops.backends.base import Backend
from mlops.errors import UsageError
from mlops.evals.sequential import CONTINUE
from mlops.registry.releases import State

log = logging.getLogger("mlops.controller")

DECIDED_BY = "controller:experiment"


class ExperimentWatch:
    """One model's experiment auto-stop; `tick(state)` is called on every controller tick."""

    def __init__(self, backend: Backend, interval: float, clock: Callable[[], float]) -> None:
        self.backend = backend
        self.interval = interval  # a replay reads the whole window since the start: not every tick
        self.clock = clock
        self._due: dict[str, float] = {}  # experiment id -> when to look next
        self.last: dict[str, Any] | None = None  # the last look's report (tests, logs)

    def tick(self, st: State) -> str | None:
        """Judge the running experiment when a look is due; what it did, or None."""
        rec = st.experiment
        if not rec or rec.get("status", "running") != "running" or not rec.get("auto_stop"):
            return None
        now = self.clock()
        if now < self._due.get(rec["id"], 0.0):
            return None
        self._due = {rec["id"]: now + self.interval}
        from mlops.flows import experiment as exp
        from mlops.flows.session import Session

        s = Session(self.backend.loaded, self.backend.registry, self.backend)
        report = exp.analyse(s, rec)
        self.last = report
        auto = rec["auto_stop"]
        limit = auto.get("max_duration_s")
        if report["decision"] != CONTINUE:
            why = f"the sequential test decided: {report['decision']} at {report['decided_at']} observations"
        elif limit is not None and now - float(rec["started_at_s"]) >= float(limit):
            why = f"no verdict within --max-duration {float(limit):g} s: {exp.INCONCLUSIVE}"
        else:
            return None
        try:
            final = exp.stop(s, DECIDED_BY, promote_winner=bool(auto.get("promote_winner")), reason=why)
        except UsageError as e:  # stopped by hand meanwhile: theirs stands
            log.info("experiment controller: %s", e.headline)
            return None
        return f"stopped experiment {rec['id']}: {why}; {final['status']}, production is {final['production']}"
