"""One budget for the whole loop: what a push would spend, against `budget:` and this month's records.

The estimate of a run, before it runs:
- **training**, per model the plan retrains: its last runs' cost per step (median of up to three,
  GPU-hours and dollars from their run records) times the steps the config asks for now (a
  duration-bound run: that duration);
- **judges**, per suite: cases x judge-based metrics x the judge's `repeat`, less the cases whose
  answers this machine has cached for the release (mlops/cache.py), times the tokens per call the
  model's last evals used, priced by `prices.judge_per_1m_tokens`;
- **eval GPU time** (backend: modal): the last eval's seconds per case times the cases.

A run whose estimate takes any cap past its limit stops before it spends anything: OverBudget
(exit 1), one line naming the cap with the estimate. This month's spend is read from the registry's
cost records (mlops/registry/costs.py), so it is the same on every machine.
"""

from __future__ import annotations

import statistics
from typing import Any

from mlops.config import Loaded, _duration
from mlops.contracts import EvalResult
from mlops.registry import costs
from mlops.registry.releases import Registry

HISTORY = 3  # runs per model whose cost per step is averaged (median) into the estimate


def _runs(reg: Registry, model: str) -> list[dict[str, Any]]:
    """The model's last training run records, newest first."""
    out = []
    for e in reg.index():
        if e.get("model") != model:
            continue
        m = reg.manifest(e["id"])
        run = (m or {}).get("train")
        if isinstance(run, dict) and run.get("steps"):
            out.append(run)
        if len(out) >= HISTORY:
            break
    return out


def train_estimate(loaded: Loaded, reg: Registry, model: str) -> tuple[dict[str, float], str]:
    steps = loaded.cfg.models[model].train.steps
    runs = _runs(reg, model)
    if not runs:
        return {}, f"train {model}: no earlier run to estimate from (not checked against the caps)"
    per_step = {
        k: statistics.median(costs.train_spend(r)[k] / int(r["steps"]) for r in runs)
        for k in ("train_gpu_hours", "train_usd")
    }
    if isinstance(steps, str):  # bound by wall time: that time, at the last runs' price per hour
        hours = _duration(steps) / 3600
        last = costs.train_spend(runs[0])
        usd = last["train_usd"] / last["train_gpu_hours"] * hours if last["train_gpu_hours"] else 0.0
        est = {"train_gpu_hours": hours, "train_usd": usd}
        return est | {"usd": usd}, f"train {model}: {steps} (duration-bound)"
    est = {k: v * steps for k, v in per_step.items()}
    basis = f"train {model}: {steps} steps x the cost per step of its last {len(runs)} run(s)"
    return est | {"usd": est["train_usd"]}, basis


def _cached_cases(loaded: Loaded, release: str | None, n: int) -> int:
    """Cases whose endpoint answers for `release` this machine has cached: a rerun asks neither the
    endpoint nor the judges for them (the judge prompts embed the same answers)."""
    if release is None:
        return 0
    from mlops.cache import SegmentCache

    # the harness's answer cache (flows.session.cache_dir(loaded) / "eval")
    return min(n, len(SegmentCache(loaded.root / ".mlops" / "cache" / "eval").load(release)))


def eval_estimate(
    loaded: Loaded, reg: Registry, model: str, release: str | None = None
) -> tuple[dict[str, float], list[str]]:
    """Judge calls and tokens, and eval GPU time on Modal, of evaluating `release` (None: a new one)."""
    from mlops.config import metric_name
    from mlops.evals.harness import JUDGE_BASED, load_cases, metric_specs

    cfg = loaded.cfg
    est = dict.fromkeys(("judge_tokens", "judge_usd", "eval_gpu_hours", "usd"), 0.0)
    basis: list[str] = []
    last: dict[str, EvalResult] | None = None
    for suite in cfg.evals:
        judged = [
            str(spec["judge"])
            for spec in metric_specs(loaded, suite)
            if isinstance(spec, dict) and metric_name(spec) in JUDGE_BASED and spec.get("judge") in cfg.judges
        ]
        if not judged and cfg.backend != "modal":
            continue  # nothing here costs judge tokens or GPU time: the cases need not be read
        last = _last_evals(reg, model) if last is None else last
        n = len(load_cases(loaded, suite))
        cached = _cached_cases(loaded, release, n)
        per_judge: dict[str, int] = {}
        for judge in judged:
            per_judge[judge] = per_judge.get(judge, 0) + (n - cached) * cfg.judges[judge].repeat
        calls = sum(per_judge.values())
        prev_res = last.get(suite)
        prev = prev_res.cost if prev_res is not None else None
        if calls:
            if prev is not None and prev.judge_calls:
                per_call = (prev.judge_prompt_tokens + prev.judge_completion_tokens) / prev.judge_calls
                tokens = per_call * calls
                usd = sum(c * per_call * cfg.prices.judge_per_1m_tokens.get(j, 0.0) / 1e6 for j, c in per_judge.items())
                est["judge_tokens"] += tokens
                est["judge_usd"] += usd
                est["usd"] += usd
                basis.append(
                    f"eval {suite}: {calls:,} judge calls ({cached} of {n} cases cached) x {per_call:,.0f} tokens a call"
                )
            else:
                basis.append(f"eval {suite}: {calls:,} judge calls; no earlier eval gives tokens a call")
        if cfg.backend == "modal" and prev_res is not None and prev is not None and prev.wall_s > 0:
            share = (n - cached) / max(prev_res.n, 1)  # the last eval's seconds per case, for these cases
            spend = costs.eval_spend(cfg, prev)
            est["eval_gpu_hours"] += spend["eval_gpu_hours"] * share
            est["usd"] += (spend["usd"] - spend["judge_usd"]) * share
            basis.append(
                f"eval {suite}: {spend['eval_gpu_hours'] * share:.3g} GPU-h at the last eval's "
                f"{prev.wall_s / max(prev_res.n, 1):.2f} s a case"
            )
    return est, basis


def _last_evals(reg: Registry, model: str) -> dict[str, EvalResult]:
    """suite -> the stored result of the model's newest release evaluated on it (its cost and n)."""
    out: dict[str, EvalResult] = {}
    for e in reg.index()[:20]:
        if e.get("model") != model:
            continue
        for suite in list(reg.store.list(f"releases/{e['id']}/evals")):
            name = suite.rsplit("/", 1)[-1].removesuffix(".json")
            if name not in out and (r := reg.get_eval(e["id"], name)) is not None:
                out[name] = r
    return out


def estimate(
    loaded: Loaded, reg: Registry, train: list[str], evaluate: list[str], release: str | None = None
) -> tuple[dict[str, float], list[str]]:
    """What a run that trains the models in `train` and evaluates the models in `evaluate` would
    spend (spend keys of `budget:`), and one line per part on how it was estimated."""
    total = dict.fromkeys(costs.KEYS, 0.0)
    basis = []
    for model in train:
        est, why = train_estimate(loaded, reg, model)
        basis.append(why)
        for k, v in est.items():
            total[k] += v
    for model in evaluate:
        est, lines = eval_estimate(loaded, reg, model, release)
        basis += lines
        for k, v in est.items():
            total[k] += v
    total.pop("serve_gpu_hours")
    return total, basis
