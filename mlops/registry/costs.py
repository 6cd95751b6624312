"""The registry's cost records: one small object per spend (a training run, a suite's eval), kept
under `costs/<YYYY-MM>/` in the store, so a month's spend is the same on every machine and survives
the runner that spent it (a CI job, a laptop). `budget:` in mlops.yaml is checked against their sum.

A record holds the spend keys of `budget:` (train_gpu_hours, train_usd, judge_tokens, judge_usd,
eval_gpu_hours, serve_gpu_hours, usd) that it adds, and what it was (kind, model, release).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

from mlops.config import Config
from mlops.contracts import BudgetDoc, BudgetLine, EvalCost
from mlops.errors import OverBudget
from mlops.registry.store import Store
from mlops.util import now

PREFIX = "costs"
KEYS = ("train_gpu_hours", "train_usd", "judge_tokens", "judge_usd", "eval_gpu_hours", "serve_gpu_hours", "usd")


def month_of(at: dt.datetime | None = None) -> str:
    return (at or dt.datetime.now(dt.UTC)).strftime("%Y-%m")


def _gpu_price(cfg: Config, gpu: str | None) -> float:
    if not gpu:
        return 0.0
    name = gpu.partition(":")[0].upper()
    return {k.upper(): v for k, v in cfg.prices.gpu_per_hour.items()}.get(name, 0.0)


def gpu_count(gpu: str | None) -> int:
    if not gpu:
        return 0
    _, _, n = gpu.partition(":")
    return int(n) if n.isdigit() else 1


def train_spend(run: dict[str, Any]) -> dict[str, float]:
    """A training run record (the manifest's `train`): GPU-hours; on a CPU, the run's CPU-hours
    (`cpu_seconds`, every thread), or its wall hours where a record lacks them."""
    on_gpu = bool(run.get("gpu_type")) and float(run.get("gpu_seconds") or 0) > 0
    if on_gpu:
        seconds = float(run.get("gpu_seconds") or 0)
    else:
        seconds = float(run.get("cpu_seconds") or run.get("seconds") or 0)
    usd = float(run.get("cost_usd") or 0.0)
    return {"train_gpu_hours": seconds / 3600, "train_usd": usd, "usd": usd}


def eval_spend(cfg: Config, cost: EvalCost) -> dict[str, float]:
    """A suite's eval: judge tokens and their dollars; on Modal, the GPU-hours the release served it."""
    prices = cfg.prices.judge_per_1m_tokens
    tokens = float(cost.judge_prompt_tokens + cost.judge_completion_tokens)
    judge_usd = sum((j.prompt_tokens + j.completion_tokens) * prices.get(j.judge, 0.0) / 1e6 for j in cost.judges)
    gpu_hours = 0.0
    gpu_usd = 0.0
    if cfg.backend == "modal":
        gpu = cfg.deploy.resources.gpu
        gpu_hours = cost.wall_s / 3600 * max(gpu_count(gpu), 1)
        gpu_usd = cost.wall_s / 3600 * _gpu_price(cfg, gpu) * max(gpu_count(gpu), 1)
    return {"judge_tokens": tokens, "judge_usd": judge_usd, "eval_gpu_hours": gpu_hours, "usd": judge_usd + gpu_usd}


def record(store: Store, kind: str, model: str | None, release: str | None, spend: dict[str, float]) -> str:
    """Write one cost record (its own object: concurrent writers lose nothing). Returns its key."""
    at = now()
    key = f"{PREFIX}/{at[:7]}/{at.replace(':', '')}-{kind}-{release or 'none'}-{secrets.token_hex(3)}.json"
    doc = {"at": at, "kind": kind, "model": model, "release": release} | {
        k: round(float(spend.get(k, 0.0)), 9) for k in KEYS
    }
    store.put(key, json.dumps(doc, sort_keys=True).encode())
    return key


def records(store: Store, month: str) -> list[dict[str, Any]]:
    out = []
    for key in store.list(f"{PREFIX}/{month}"):
        blob = store.get(key)
        if blob is None:
            continue
        try:
            doc = json.loads(blob.data)
        except ValueError:
            continue  # a torn record (a writer killed mid-put on a store without atomic puts): not counted
        if isinstance(doc, dict):
            out.append(doc)
    return out


def month_spend(store: Store, month: str | None = None) -> dict[str, float]:
    """Every spend key summed over the month's records."""
    return _sum(records(store, month or month_of()))


def _sum(docs: list[dict[str, Any]]) -> dict[str, float]:
    total = dict.fromkeys(KEYS, 0.0)
    for doc in docs:
        for k in KEYS:
            try:
                total[k] += float(doc.get(k) or 0.0)
            except (TypeError, ValueError):
                continue
    return total


# ---------------------------------------------------------------------------- against budget:

UNITS = {
    "train_gpu_hours": "GPU-h",
    "eval_gpu_hours": "GPU-h",
    "serve_gpu_hours": "GPU-h",
    "judge_tokens": "tokens",
    "train_usd": "$",
    "judge_usd": "$",
    "usd": "$",
}


def fmt(key: str, v: float) -> str:
    unit = UNITS.get(key, "")
    if unit == "$":
        return f"${v:,.4f}" if v < 1 else f"${v:,.2f}"
    if unit == "tokens":
        return f"{v:,.0f} tokens"
    return f"{v:.4g} {unit}"


def document(
    cfg: Config, store: Store, est: dict[str, float], basis: list[str], release: str | None = None
) -> BudgetDoc:
    """Spend against every cap: this month's records, and `est` (the next run) on top; with
    `release`, what that release's own records this month add up to."""
    b = cfg.budget
    month = month_of()
    docs = records(store, month)
    spent = _sum(docs)
    mine = _sum([d for d in docs if d.get("release") == release]) if release is not None else {}
    lines = []
    for scope, caps in (("run", b.per_run), ("month", b.per_month)):
        for key, cap in caps.model_dump().items():
            if cap is None:
                continue
            used = spent.get(key, 0.0) if scope == "month" else 0.0
            e = est.get(key)
            over = used + (e or 0.0) > cap
            lines.append(BudgetLine(scope=scope, key=key, cap=cap, spent=used, estimate=e, left=cap - used, over=over))
    return BudgetDoc(month=month, spent=spent, estimate=est, basis=basis, lines=lines, release=mine)


def check(doc: BudgetDoc) -> None:
    """OverBudget (exit 1) naming the first cap the estimate takes past its limit, or the month's
    serving cap when serving is already past it (serving is spent before a run can estimate it)."""
    for line in doc.lines:
        if line.scope == "month" and line.key == "serve_gpu_hours" and line.spent > line.cap:
            raise OverBudget(
                f"over budget: budget.per_month.serve_gpu_hours ({doc.month}): serving has spent "
                f"{fmt(line.key, line.spent)} this month, over the cap {fmt(line.key, line.cap)}; nothing new was "
                "run or deployed (raise the cap, stop release apps, or wait for next month)"
            )
        if line.over and line.estimate:
            where = f"per_run.{line.key}" if line.scope == "run" else f"per_month.{line.key} ({doc.month})"
            spent = f" + {fmt(line.key, line.spent)} spent this month" if line.scope == "month" else ""
            raise OverBudget(
                f"over budget: budget.{where}: this run's estimate {fmt(line.key, line.estimate)}{spent} "
                f"exceeds the cap {fmt(line.key, line.cap)}; nothing was spent (raise the cap or wait for next month)"
            )


def lines(doc: BudgetDoc) -> list[str]:
    """What `mlops plan` prints: the estimate, and each cap with what is left."""
    out = [f"budget {doc.month}: " + "; ".join(doc.basis) if doc.basis else f"budget {doc.month}: nothing to spend"]
    spend = [f"{k} {fmt(k, v)}" for k, v in doc.estimate.items() if v]
    if spend:
        out.append("  a push would spend: " + ", ".join(spend))
    for line in doc.lines:
        est = "—" if line.estimate is None else fmt(line.key, line.estimate)
        spent = f", spent {fmt(line.key, line.spent)}, left {fmt(line.key, line.left)}" if line.scope == "month" else ""
        flag = ": OVER" if line.over and (line.estimate or line.key == "serve_gpu_hours") else ""
        out.append(f"  {line.scope} {line.key}: estimate {est} of cap {fmt(line.key, line.cap)}{spent}{flag}")
    return out
