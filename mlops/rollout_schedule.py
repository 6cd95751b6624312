"""The rollout controller as a scheduled function: one invocation of functions/controller.py on
Modal (the Modal twin runs it on its clock, mlops/backends/modal_twin_schedule.py).

An invocation loads the config the controller was deployed with (modal_controller.py's bundle),
opens one `Controller` per deployed model against the real registry (the deployed storage), the
routing Dict (through ModalBackend, with the container's `ModalAPI`) and the gateway's live stats,
and ticks each. Nothing lives between invocations but the registry: a rollout's state is its
record (with the guardrail's reference window and checkpoint: mlops/rollout_guard.py `reference`, `save`),
and an invocation gives its lease back when it ends, so the next one carries on at once.

The schedule's period is coarser than `deploy.rollout.interval` (a container start per tick would
cost more than it judges): while a rollout needs the controller (it drives the canary, or the
guardrail bake after promotion) or an `--auto-stop` experiment runs, an invocation keeps ticking
at the controller's own pace (`Controller.period()`, a quarter of the interval) for up to its
period less a margin, then returns, so one invocation runs at a time; with nothing to advance
it ticks once and returns.
A tick that fails is logged and tried again at the next tick (or invocation).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlops.backends.modal_api import ModalAPI
from mlops.backends.modal_controller import unpack
from mlops.backends.modal_settings import CLIENT_KEY_ENV, CONTROLLER_BUNDLE_ENV, KEYS_ENV
from mlops.registry import rollouts

log = logging.getLogger("mlops.controller")

MARGIN_S = 10.0  # of a period, left for the container's start and the next invocation's


def budget(period_s: float) -> float:
    """How long one invocation may keep ticking: its period less a margin (a quarter of a short one)."""
    return max(period_s - min(MARGIN_S, period_s / 4), 0.0)


def needs_controller(st: Any) -> bool:
    """A record the controller advances (its canary, or the guardrail bake after promotion), or an
    experiment it stops by itself (`--auto-stop`: looked at every `interval`, not once a period)."""
    rec = rollouts.running(st)
    if rec is not None and (rec.get("driver") == "controller" or rec.get("phase") == "bake_after_promote"):
        return True
    exp = st.experiment or {}
    return bool(exp) and exp.get("status", "running") == "running" and bool(exp.get("auto_stop"))


def run_invocation(
    api: ModalAPI,
    period_s: float,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] = print,
) -> list[str]:
    """One scheduled invocation (see the module docstring); what its ticks did."""
    from mlops.config import load
    from mlops.rollout_controller import for_models

    env = os.environ if environ is None else environ
    deadline = clock() + budget(period_s)
    key = env.get(CONTROLLER_BUNDLE_ENV)
    if not key:
        raise RuntimeError(f"{CONTROLLER_BUNDLE_ENV} is not set: deploy functions/controller.py through mlops")
    s = api.settings
    url = api.web_url(s.gateway_app, "gateway")
    if not url:
        say(f"controller: {s.gateway_app} is not deployed: nothing to judge through")
        return []
    # the controller presents one of the gateway's keys (the Secret's) where a run presents $MLOPS_API_KEY
    keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip()]
    if keys and environ is None:
        os.environ.setdefault(s.api_key_env or CLIENT_KEY_ENV, keys[0])
    done: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mlops-controller-") as tmp:
        path = unpack(b"".join(api.volume_read(key)), Path(tmp), s.storage)
        controllers = for_models(load(path, check_files=False), url)
        for c in controllers:
            c.backend._api = api  # type: ignore[attr-defined]  # the container's own (ModalBackend)
        try:
            while True:
                busy = False
                for c in controllers:
                    try:
                        did = c.tick()
                        # what the tick read: a tick that moved the record is followed by another anyway
                        busy |= bool(did) or needs_controller(c.seen)
                    except Exception as e:  # a store or endpoint hiccup: the next tick tries again
                        say(f"controller ({c.model}): tick failed: {getattr(e, 'headline', None) or repr(e)}")
                        busy = True
                        continue
                    if did:
                        done.append(f"{c.model}: {did}")
                        say(f"controller ({c.model}): {did}")
                pause = min(c.period() for c in controllers) if controllers else 0.0
                if not busy or clock() + pause >= deadline:
                    return done
                time.sleep(pause)
        finally:
            for c in controllers:
                _hand_over(c)
                c.backend.close()  # a warm container runs the next invocation: its marks end here


def _hand_over(c: Any) -> None:
    """What the next invocation needs of this one: where the guardrail's judging stopped (saved,
    mlops/rollout_guard.py `save`), and the lease it holds, dropped so the next need not wait out
    its TTL (only when it is ours: `stop()` publishes, and a publish stops apps no state references;
    `stop()` saves too). A failure is logged: the next judges from further back, or waits the TTL."""
    from mlops.rollout_guard import save

    try:
        if (c.registry.read_state()[0].lease or {}).get("token") == c.token:
            c.stop()
        else:
            save(c)
    except Exception as e:
        log.warning("controller (%s): could not hand over to the next invocation: %r", c.model, e)
