"""Judging one step on the server's own counters (`/v1/mlops/stats`): a replayed canary step
(`analyse`) and a shadow step on its mirrored requests (`shadow_verdict`). Both the CI job that
drives a rollout (`--wait`, mlops/rollout.py) and the rollout controller (mlops/rollout_controller.py,
mlops/rollout_shadow.py) call them, so a step is judged the same way whoever drives it. The live
analysis on captured windows is mlops/rollout_analysis.py.
"""

from __future__ import annotations

from typing import Any

from mlops.config import RolloutCfg
from mlops.contracts import StepVerdict

# p95 over fewer requests than this is noise (on a busy machine one slow request is the p95):
# the latency comparison waits for enough samples, the error rate is judged on any number.
MIN_LATENCY_SAMPLES = 20
LATENCY_SLACK_S = 0.005  # differences below 5 ms are scheduling noise, not a regression


def analyse(
    step: int,
    pct: int,
    cand: dict[str, float],
    prod: dict[str, float],
    cfg: RolloutCfg,
    mode: str = "canary",
) -> StepVerdict:
    """Judge one step: the candidate's error rate, then (with enough samples on both sides) its p95."""
    reasons: list[str] = []
    notes: list[str] = []
    n = int(cand.get("requests", 0))
    if n == 0:
        reasons.append("candidate received no traffic in this step")
    if cand.get("error_rate", 0.0) > cfg.max_error_rate:
        reasons.append(
            f"error rate {cand['error_rate']:.1%} ({int(cand.get('errors', 0))}/{n}) > {cfg.max_error_rate:.1%}"
        )
    ok_c = n - int(cand.get("errors", 0))
    ok_p = int(prod.get("requests", 0)) - int(prod.get("errors", 0))
    p95c, p95p = cand.get("p95", 0.0), prod.get("p95", 0.0)
    if ok_c < MIN_LATENCY_SAMPLES or ok_p < MIN_LATENCY_SAMPLES:
        notes.append(f"latency not judged: {ok_c} candidate / {ok_p} production samples < {MIN_LATENCY_SAMPLES}")
    elif p95c > cfg.max_p95_ratio * p95p and p95c - p95p > LATENCY_SLACK_S:
        reasons.append(f"p95 {p95c * 1000:.1f} ms > {cfg.max_p95_ratio:g} x production's {p95p * 1000:.1f} ms")
    return StepVerdict(
        step=step,
        percent=pct,
        candidate=cand,
        production=prod,
        passed=not reasons,
        reasons=reasons,
        mode=mode,
        notes=notes,
    )


def seen(doc: dict[str, Any], release: str) -> dict[str, Any]:
    """The server's mirrored window of `release` in a `/v1/mlops/stats` answer."""
    return dict((doc.get("shadow") or {}).get(release) or {})


def shadow_verdict(doc: dict[str, Any], release: str, cfg: RolloutCfg, share: float) -> StepVerdict:
    """The shadow step judged on the mirrored requests of `doc`: the candidate's errors and p95
    against production's p95 on the same requests; agreement and a few disagreements recorded."""
    sh = seen(doc, release)
    n = int(sh.get("mirrored", 0))
    cand = {"requests": n, "errors": sh.get("errors", 0), "error_rate": sh.get("error_rate", 0.0)}
    cand["p95"] = sh.get("p95", 0.0)
    paired = {"requests": n, "errors": 0, "p95": sh.get("production_p95", 0.0)}
    v = analyse(0, 0, cand, paired, cfg, mode="shadow")
    v.extra = {
        "agreement": sh.get("agreement", 0.0),
        "shadow_share": share,
        "disagreements": sh.get("disagreements", []),
    }
    return v
