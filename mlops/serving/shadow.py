"""Shadow traffic: mirror a share of production's requests to a candidate, answer from production.

The state's `shadow` entry (`{"release": id, "share": 0.1}`) turns it on. A mirrored request runs on
the candidate's engine at the same time as on production's; the user gets production's answer
(and its `x-mlops-release`), never the candidate's. Each pair is recorded: the prompt, both outputs,
whether they agree, both generation times, and any error, appended as one JSON line to the shadow
log and summed per candidate for the canary analysis (`/v1/mlops/stats`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlops.registry.releases import State
from mlops.serving.base import Engine
from mlops.serving.engine import GenRequest
from mlops.serving.faults import Fault
from mlops.serving.routing import shadow_target
from mlops.serving.shared_shadow import WINDOW, summary


@dataclass
class Pair:
    at: float
    prompt: str
    production: str
    shadow: str
    production_output: str | None
    shadow_output: str | None
    production_s: float
    shadow_s: float
    error: str | None = None  # the candidate's (what the analysis counts against it)
    production_error: str | None = None

    @property
    def agree(self) -> bool:
        return self.error is None and self.production_error is None and self.production_output == self.shadow_output

    def to_json(self) -> dict[str, Any]:
        rounded = {"production_s": round(self.production_s, 6), "shadow_s": round(self.shadow_s, 6)}
        return asdict(self) | rounded | {"agree": self.agree}


@dataclass
class _Series:
    pairs: deque[Pair] = field(default_factory=lambda: deque(maxlen=WINDOW))
    total: int = 0
    agreed: int = 0
    errors: int = 0


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


class Shadow:
    def __init__(self, log_path: str | None, timeout: float) -> None:
        self.log_path = Path(log_path) if log_path else None
        self.timeout = timeout
        self.pending = 0
        self._counter = 0
        self._series: dict[str, _Series] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def wants(self, st: State, release: str, key: str | None, pinned: bool) -> str | None:
        """The shadow release to mirror this request to, or None."""
        self._counter += 1
        return shadow_target(st, release, key, pinned, self._counter)

    def mirror(
        self, engine: Engine, target: str, req: GenRequest, fault: Fault | None = None
    ) -> asyncio.Future[tuple[str | None, float, str | None]]:
        """Start the candidate's generation now; the returned future gives (text, seconds, error).
        `fault`: the testing hook (faults.py), which fails the candidate's mirrored requests too."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str | None, float, str | None]] = loop.create_future()
        if fault is not None and fault.fire(target, req.prompt):
            self.pending += 1  # settled by `record`, as any mirrored request
            fut.set_result((None, 0.0, "injected fault (MLOPS_FAULT_RELEASE)"))
            return fut
        copy = GenRequest(
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            stop=req.stop,
            seed=req.seed,
            messages=req.messages,
            tools=req.tools,
        )
        t0 = time.perf_counter()

        def done(r: GenRequest) -> None:
            result = (r.text if not r.error else None, time.perf_counter() - t0, r.error)
            loop.call_soon_threadsafe(_settle, fut, result)

        copy.on_done = done
        self.pending += 1
        try:
            engine.submit(copy)
        except Exception as e:  # a full or closed candidate queue never affects the answer
            fut.set_result((None, 0.0, f"{type(e).__name__}: {e}"))
        return fut

    def record(
        self,
        fut: asyncio.Future[tuple[str | None, float, str | None]],
        prompt: str,
        production: str,
        target: str,
        production_output: str | None,
        production_s: float,
        production_error: str | None = None,
    ) -> None:
        """Once the candidate finishes (bounded by the request timeout), record the pair."""

        async def wait() -> None:
            try:
                text, secs, err = await asyncio.wait_for(fut, self.timeout)
            except TimeoutError:
                text, secs, err = None, self.timeout, "shadow request timed out"
            pair = Pair(time.time(), prompt, production, target, production_output, text, production_s, secs, err)
            pair.production_error = production_error
            self._add(pair)

        task = asyncio.get_running_loop().create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def abandon(self) -> None:
        self.pending -= 1

    def _add(self, pair: Pair) -> None:
        with self._lock:
            s = self._series.setdefault(pair.shadow, _Series())
            s.pairs.append(pair)
            s.total += 1
            s.agreed += pair.agree
            s.errors += pair.error is not None
            self.pending -= 1
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(pair.to_json()) + "\n")

    def window(self, since: float = 0.0) -> dict[str, dict[str, Any]]:
        """Per shadow release: mirrored, errors, agreement, and both sides' latency, since `since`."""
        with self._lock:
            snap = {k: [p for p in v.pairs if p.at >= since] for k, v in self._series.items()}
        out: dict[str, dict[str, Any]] = {}
        for rel, pairs in snap.items():
            ok = [p for p in pairs if p.error is None and p.production_error is None]
            out[rel] = summary(
                len(pairs),
                sum(p.error is not None for p in pairs),
                sum(p.agree for p in pairs),
                [p.shadow_s for p in ok],
                [p.production_s for p in ok],
                [p.to_json() for p in pairs if not p.agree],
            )
        return out

    def totals(self) -> dict[str, tuple[int, int, int]]:
        """Per shadow release: (mirrored, agreed, errors) since the server started."""
        with self._lock:
            return {k: (v.total, v.agreed, v.errors) for k, v in self._series.items()}
