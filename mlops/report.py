"""The eval report: a release against production, from stored results only (no model is called).

`build_report` gathers the numbers (a JSON-able dict: what `mlops report --json` prints);
`to_markdown` renders the pull-request comment / job summary:

1. the hidden marker line (the workflow finds its sticky comment by it), then the verdict and
   every gate with its numbers;
2. metric | production | candidate | delta | interval | threshold | verdict;
3. the worst regressed cases: input, expected, both outputs;
4. a Mermaid `xychart-beta` per gated metric over the last releases;
5. cost: training seconds (GPU-seconds on a GPU), tokens, endpoint and judge calls.

The markdown stays under MAX_CHARS whatever the suite size: cells are cut, the case list is
bounded, and a section that does not fit is left out with a note (never cut mid-table or
mid-chart). Text from cases and outputs is escaped, so a model's output cannot break the layout,
inject HTML or @-mention anyone.
"""

from __future__ import annotations

import html
import os
from typing import Any

from mlops.evals.gates import Sample, check_gates

MARKER = "<!-- mlops-eval-report -->"
MAX_CHARS = 60_000  # GitHub rejects comments over 65,536; a margin for the workflow's own lines
WORST_CASES = 8  # per suite
MAX_WORST = 12  # in all
TREND_RELEASES = 10
CELL = 160  # characters of case text per table cell
JSON_TEXT = 2_000  # characters of case text kept in the JSON report
MAX_GATE_LINES = 60
STATUS_EVENTS = ("promoted", "rejected", "rolled_back", "gates_passed", "gates_failed", "evaluated")


# ---------------------------------------------------------------------------- the numbers


def build_report(s: Any, release: str) -> dict[str, Any]:
    """Everything the report shows, for `release` against production (or, for production itself,
    against the previous release)."""
    reg = s.registry
    prod_reg = getattr(s, "production_registry", reg)  # production may live in a baseline registry
    cfg = s.loaded.cfg
    manifest = reg.require(release)
    history = reg.history(release)
    st, _ = prod_reg.read_state()
    prod = st.stages.get("production")
    if prod and prod != release:
        baseline, baseline_stage = prod, "production"
    elif prod == release and st.stages.get("previous"):
        baseline, baseline_stage = st.stages.get("previous"), "previous"
    else:
        baseline, baseline_stage = None, None
    cand = {suite: reg.get_eval(release, suite) for suite in cfg.evals}
    base = {suite: prod_reg.get_eval(baseline, suite) if baseline else None for suite in cfg.evals}
    evaluated = {k: v for k, v in cand.items() if v is not None}
    gates = [g.model_dump() for g in check_gates(cfg.gates, evaluated, base)] if evaluated else []
    if not evaluated:
        verdict = "not evaluated"
    elif not gates:
        verdict = "not gated"
    else:
        verdict = "pass" if all(g["passed"] for g in gates) else "fail"
    rows = _rows(evaluated, base, gates)
    return {
        "release": release,
        "model": manifest.get("model"),
        "baseline": baseline,
        "baseline_stage": baseline_stage,
        "production": prod,
        "status": next((h["event"] for h in reversed(history) if h["event"] in STATUS_EVENTS), "registered"),
        "verdict": verdict,
        "gates": gates,
        "metrics": rows,
        "worst_cases": _worst_cases(evaluated, base, gates),
        "trend": _trend(reg, release, cfg.gates, rows),
        "cost": _cost(manifest, evaluated),
        "suites": {k: {"n": v.get("n"), "created_at": v.get("created_at")} for k, v in evaluated.items()},
        "lineage": manifest.get("lineage", {}),
    }


def _key(stat: str, threshold: float | None) -> str:
    return f"pass_rate@{threshold:g}" if stat == "pass_rate" and threshold is not None else stat


def _rows(evaluated: dict[str, Any], base: dict[str, Any], gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for suite, res in evaluated.items():
        for metric, summ in res["metrics"].items():
            mine = [g for g in gates if g["eval"] == suite and g["metric"] == metric]
            stats = list(dict.fromkeys((g["stat"], g["stat_threshold"]) for g in mine)) or [("mean", None)]
            c = Sample.of(res, metric)
            b = Sample.of(base[suite], metric) if base.get(suite) else None
            for stat, thr in stats:
                assert c is not None
                cval = c.stat(stat, thr)
                bval = b.stat(stat, thr) if b is not None else None
                these = [g for g in mine if (g["stat"], g["stat_threshold"]) == (stat, thr)]
                reg = next((g for g in these if g["kind"] == "regression" and g["interval"]), None)
                rows.append(
                    {
                        "suite": suite,
                        "metric": metric,
                        "stat": stat,
                        "stat_threshold": thr,
                        "higher_is_better": summ["higher_is_better"],
                        "production": bval,
                        "candidate": cval,
                        "delta": None if bval is None else cval - bval,
                        "interval": list(reg["interval"]) if reg else None,
                        "paired_cases": reg["n"] if reg else None,
                        "threshold": "; ".join(g["threshold"] for g in these),
                        "verdict": ("pass" if all(g["passed"] for g in these) else "fail") if these else None,
                        "failed_cases": summ.get("failed", 0),
                        "n": summ.get("n", len(c.values)),
                    }
                )
    return rows


def _primary_metric(suite: str, res: dict[str, Any], gates: list[dict[str, Any]]) -> str | None:
    mine = [g for g in gates if g["eval"] == suite and g["metric"] in res["metrics"]]
    for g in sorted(mine, key=lambda g: g["kind"] != "regression"):
        return str(g["metric"])
    return next((m for m, v in res["metrics"].items() if v["higher_is_better"]), next(iter(res["metrics"]), None))


def _clip(text: Any, limit: int = JSON_TEXT) -> Any:
    if not isinstance(text, str) or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _worst_cases(evaluated: dict[str, Any], base: dict[str, Any], gates: list[dict[str, Any]]) -> dict[str, Any]:
    """The cases that lost most against the baseline on each suite's primary metric (its first
    regression-gated metric), or, with no baseline, the lowest-scoring cases."""
    picked: list[dict[str, Any]] = []
    compared = any(base.get(s) for s in evaluated)
    for suite, res in evaluated.items():
        metric = _primary_metric(suite, res, gates)
        if metric is None:
            continue
        better = 1.0 if res["metrics"][metric]["higher_is_better"] else -1.0
        prev = {c["id"]: c for c in (base.get(suite) or {}).get("cases", [])}
        scored = [c for c in res["cases"] if metric in c["scores"]]
        best = max((better * c["scores"][metric] for c in scored), default=0.0)
        ranked = []
        for c in scored:
            value = c["scores"][metric]
            failed = metric in c.get("failed", ())
            p = prev.get(c["id"])
            if prev:  # against the baseline: what got worse, or newly failed
                if p is None or metric not in p["scores"]:
                    continue
                loss = better * (p["scores"][metric] - value)
                if loss <= 0 and not (failed and metric not in p.get("failed", ())):
                    continue
            else:  # no baseline: the lowest-scoring cases (not those at the suite's best)
                loss = best - better * value
                if loss <= 0 and not failed:
                    continue
            ranked.append((loss, c, p))
        ranked.sort(key=lambda t: (-t[0], t[1]["id"]))
        for loss, c, p in ranked[:WORST_CASES]:
            error = c.get("error")
            if error is None and metric in c.get("failed", ()):
                error = (c.get("reasons") or {}).get(metric)
            picked.append(
                {
                    "suite": suite,
                    "metric": metric,
                    "id": c["id"],
                    "loss": loss,
                    "input": _clip(c["input"]),
                    "expected": _clip(c.get("expected")),
                    "candidate": _clip(c.get("output")),
                    "candidate_score": c["scores"][metric],
                    "candidate_error": _clip(error),
                    "production": _clip(p.get("output")) if p else None,
                    "production_score": p["scores"].get(metric) if p else None,
                }
            )
    picked.sort(key=lambda r: -r["loss"])
    return {"compared": compared, "cases": picked[:MAX_WORST]}


def _event_value(history: list[dict[str, Any]], key: tuple[str, str, str, float | None]) -> float | None:
    suite, metric, stat, thr = key
    for h in reversed(history):
        d = h.get("detail") or {}
        if h["event"] in ("gates_passed", "gates_failed"):
            for g in d.get("gates", []):
                if (g.get("eval"), g.get("metric"), g.get("stat"), g.get("stat_threshold")) == key:
                    if g.get("candidate") is not None:
                        return float(g["candidate"])
        if h["event"] == "evaluated" and stat != "pass_rate":
            v = (d.get("stats") or {}).get(suite, {}).get(metric, {}).get(stat)
            if v is None and stat == "mean":
                v = (d.get("summary") or {}).get(suite, {}).get(metric)
            if v is not None:
                return float(v)
    return None


def _trend(reg: Any, release: str, gates_cfg: list[Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each gated statistic over the last releases up to this one, oldest first, from history
    events (small), never from result files (which can be large)."""
    manifests = reg.list()  # newest first, with history
    ids = [m["id"] for m in manifests]
    start = ids.index(release) if release in ids else 0
    window = list(reversed(manifests[start : start + TREND_RELEASES]))
    st, _ = reg.read_state()
    prod = st.stages.get("production")
    out = []
    keys = list(dict.fromkeys((g.eval, g.metric, g.stat, g.threshold) for g in gates_cfg))
    for key in keys:
        suite, metric, stat, thr = key
        now = next(
            (r["candidate"] for r in rows if (r["suite"], r["metric"], r["stat"], r["stat_threshold"]) == key), None
        )
        points = []
        for m in window:
            v = now if m["id"] == release else _event_value(m.get("history", []), key)
            if v is not None:
                points.append(
                    {"release": m["id"], "value": v, "production": m["id"] == prod, "this": m["id"] == release}
                )
        bounds = [
            b
            for g in gates_cfg
            if (g.eval, g.metric, g.stat, g.threshold) == key
            for b in (g.min, g.max)
            if b is not None
        ]
        out.append(
            {
                "suite": suite,
                "metric": metric,
                "stat": stat,
                "stat_threshold": thr,
                "label": f"{suite}.{metric} {_key(stat, thr)}",
                "points": points,
                "bounds": bounds,
            }
        )
    return out


def _cost(manifest: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    train = manifest.get("train") or {}
    seconds = train.get("seconds")
    device = str(train.get("device") or "")
    on_gpu = any(k in device.lower() for k in ("cuda", "gpu"))

    def total(key: str) -> int:
        return int(sum((r.get("cost") or {}).get(key, 0) or 0 for r in evaluated.values()))

    return {
        "train_seconds": seconds,
        "train_device": device or None,
        "gpu_seconds": (seconds or 0.0) if on_gpu else 0.0,
        "train_tokens": int((train.get("tokens_per_s") or 0) * (seconds or 0)) or None,
        "endpoint_calls": total("endpoint_calls"),
        "cache_hits": total("cache_hits"),
        "retries": total("retries"),
        "errors": total("errors"),
        "completion_tokens": total("completion_tokens"),
        "eval_seconds": round(sum((r.get("cost") or {}).get("wall_s", 0.0) for r in evaluated.values()), 3),
        "judge_calls": total("judge_calls"),
        "judge_cache_hits": total("judge_cache_hits"),
        "judge_failures": total("judge_failures"),
        "judge_tokens": total("judge_prompt_tokens") + total("judge_completion_tokens"),
    }


# ---------------------------------------------------------------------------- markdown


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.4g}"


def _text(value: Any, limit: int = CELL) -> str:
    """Case text made safe for a table cell: cut, HTML-escaped, no pipes, no mentions."""
    if value is None:
        return "—"
    t = str(value)
    if t == "":
        return "*(empty)*"
    cut = len(t) > limit
    t = t[:limit]
    t = html.escape(t, quote=False).replace("|", "&#124;").replace("\r", "").replace("\n", "⏎")
    for ch in "\\`*_[]~":
        t = t.replace(ch, "\\" + ch)
    t = t.replace("@", "@\u200b")  # no @-mentions from model output
    return t + ("…" if cut else "")


def _own(text: str, limit: int = 300) -> str:
    """Our own text (names, thresholds, reasons): only what would break a table line."""
    t = text.replace("|", "\\|").replace("\n", " ")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _plain(v: float) -> str:
    """A number as Mermaid's parser takes it: no exponent."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def _chart(series: dict[str, Any]) -> str | None:
    pts = series["points"]
    if len(pts) < 2:
        return None
    values = [p["value"] for p in pts]
    lo, hi = min(values + series["bounds"]), max(values + series["bounds"])
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    if 0 <= min(values + series["bounds"]) and lo < 0:
        lo = 0.0
    labels = []
    for p in pts:
        tag = " (this)" if p["this"] else " (prod)" if p["production"] else ""
        labels.append(f'"{p["release"][-6:]}{tag}"')
    title = series["label"].replace('"', "'")
    bounds = ", ".join(_plain(b) for b in series["bounds"])
    caption = f"_{_own(series['label'])} per release, oldest first" + (
        f"; flat line: the gate's bound ({bounds})" if bounds else ""
    )
    lines = [
        "",
        caption + "._",
        "",
        "```mermaid",
        "xychart-beta",
        f'    title "{title} over the last {len(pts)} releases"',
        f"    x-axis [{', '.join(labels)}]",
        f'    y-axis "{series["metric"]}" {_plain(lo)} --> {_plain(hi)}',
        f"    line [{', '.join(_plain(v) for v in values)}]",
    ]
    lines += [f"    line [{', '.join([_plain(b)] * len(pts))}]" for b in series["bounds"]]
    lines.append("```")
    return "\n".join(lines)


def _verdict_head(rep: dict[str, Any]) -> list[str]:
    icon = {"pass": "✅", "fail": "❌", "not gated": "➖", "not evaluated": "⚠️"}[rep["verdict"]]
    if rep["baseline"]:
        base = f"{rep['baseline_stage']} `{rep['baseline']}`"
    elif rep["release"] == rep["production"]:
        base = "nothing (it is production, with no previous release)"
    else:
        base = "nothing (no production release yet)"
    lines = [MARKER, f"## {icon} Eval report: `{rep['release']}` vs {base}", ""]
    gates = rep["gates"]
    failed = [g for g in gates if not g["passed"]]
    if rep["verdict"] == "not evaluated":
        head = f"**Verdict: NOT EVALUATED**: `{rep['release']}` has no stored eval results (run `mlops eval`)."
    elif rep["verdict"] == "not gated":
        head = "**Verdict: NOT GATED**: no gates are declared in mlops.yaml."
    elif failed:
        head = f"**Verdict: FAIL**: {len(failed)} of {len(gates)} gate checks failed."
    else:
        head = f"**Verdict: PASS**: all {len(gates)} gate checks passed."
    lines.append(f"{head} Release status: `{rep['status']}`.")
    lines.append("")
    ordered = failed + [g for g in gates if g["passed"]]
    for g in ordered[:MAX_GATE_LINES]:
        mark = "✅" if g["passed"] else "❌"
        lines.append(f"- {mark} `{g['name']}` {_own(g['threshold'])}: {_own(g['reason'])}")
    if len(ordered) > MAX_GATE_LINES:
        lines.append(f"- … and {len(ordered) - MAX_GATE_LINES} more (all passed or listed in `--json`)")
    return lines


def _table(rep: dict[str, Any], budget: int) -> tuple[str, int]:
    head = [
        "",
        "| metric | production | candidate | delta | interval | threshold | verdict |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    body: list[str] = []
    used = sum(len(x) + 1 for x in head)
    for r in rep["metrics"]:
        name = f"{r['suite']}.{r['metric']}" + (
            "" if r["stat"] == "mean" else f" {_key(r['stat'], r['stat_threshold'])}"
        )
        if r["failed_cases"]:
            name += f" ({r['failed_cases']} of {r['n']} cases failed)"
        iv = f"[{r['interval'][0]:+.3g}, {r['interval'][1]:+.3g}]" if r["interval"] else "—"
        verdict = {"pass": "✅ pass", "fail": "❌ fail", None: "—"}[r["verdict"]]
        arrow = (
            ""
            if r["delta"] is None or r["delta"] == 0
            else (" ↑" if (r["delta"] > 0) == r["higher_is_better"] else " ↓")
        )
        line = (
            f"| {_own(name, 120)} | {_num(r['production'])} | {_num(r['candidate'])} | {_signed(r['delta'])}{arrow}"
            f" | {iv} | {_own(r['threshold'] or '—', 120)} | {verdict} |"
        )
        if used + len(line) + 1 > budget:
            body.append(f"| … {len(rep['metrics']) - len(body)} more rows in `mlops report --json` | | | | | | |")
            break
        body.append(line)
        used += len(line) + 1
    notes = [
        "",
        "<sub>delta = candidate − production (↑ better, ↓ worse); interval: paired bootstrap over the same "
        "cases, each end a one-sided bound at the gate's confidence.</sub>",
    ]
    text = "\n".join(head + body + notes)
    return text, len(body)


def _worst_block(rep: dict[str, Any]) -> str:
    w = rep["worst_cases"]
    if not w["cases"]:
        return ""
    metrics = ", ".join(dict.fromkeys(f"{c['suite']}.{c['metric']}" for c in w["cases"]))
    if w["compared"]:
        title = f"### Worst regressed cases ({metrics})"
        cols = "| case | input | expected | production | candidate |"
    else:
        title = f"### Lowest-scoring cases ({metrics}; no production to compare with)"
        cols = "| case | input | expected | — | candidate |"
    lines = ["", title, "", cols, "|---|---|---|---|---|"]
    for c in w["cases"]:
        cand = _text(c["candidate"]) + f" ({_num(c['candidate_score'])})"
        if c.get("candidate_error"):
            cand += f"<br>**failed**: {_text(c['candidate_error'], 120)}"
        prod = _text(c["production"]) + f" ({_num(c['production_score'])})" if w["compared"] else "—"
        lines.append(f"| {_text(c['id'], 40)} | {_text(c['input'])} | {_text(c['expected'])} | {prod} | {cand} |")
    return "\n".join(lines)


def _cost_block(rep: dict[str, Any]) -> str:
    c = rep["cost"]
    if c["train_seconds"] is None:
        train = "training: —"
    else:
        gpu = f"{c['gpu_seconds']:.1f} GPU-s" if c["gpu_seconds"] else "0 GPU-s"
        tokens = f", ≈{c['train_tokens']:,} tokens" if c["train_tokens"] else ""
        train = f"training {c['train_seconds']:.1f} s on {c['train_device'] or '?'} ({gpu}{tokens})"
    evals = (
        f"eval {c['endpoint_calls']:,} endpoint calls ({c['cache_hits']:,} cached, {c['retries']} retries, "
        f"{c['errors']} failed), {c['completion_tokens']:,} completion tokens, {c['eval_seconds']:.1f} s"
    )
    judges = (
        f"judges {c['judge_calls']:,} calls ({c['judge_cache_hits']:,} cached, {c['judge_failures']} failed), "
        f"{c['judge_tokens']:,} tokens"
    )
    lin = rep["lineage"] or {}
    data = ", ".join(f"{k}:{str(v)[:8]}" for k, v in (lin.get("dataset_hashes") or {}).items()) or "—"
    return "\n".join(
        [
            "",
            f"**Cost**: {train}; {evals}; {judges}.",
            "",
            f"<sub>git {str(lin.get('git_sha') or '—')[:12]} · data {data} · config {str(lin.get('config_hash') or '—')[:8]}"
            f" · code {str(lin.get('code_hash') or '—')[:8]}</sub>",
        ]
    )


def to_markdown(rep: dict[str, Any], max_chars: int = MAX_CHARS) -> str:
    """The PR comment: verdict first, at most `max_chars` characters."""
    reserve = 400  # for the closing note
    md = "\n".join(_verdict_head(rep))
    table, _ = _table(rep, max(2_000, (max_chars - len(md)) // 2))
    md += "\n" + table
    left_out = []
    blocks = [("worst cases", _worst_block(rep))]
    charts = [c for c in (_chart(t) for t in rep["trend"]) if c]
    if charts:
        blocks.append(("trend charts", "\n".join(["", "### Trend", *charts])))
    blocks.append(("cost", _cost_block(rep)))
    for name, block in blocks:
        if not block:
            continue
        if len(md) + len(block) + 1 + reserve <= max_chars:
            md += "\n" + block
        else:
            left_out.append(name)
    if left_out:
        md += (
            f"\n\n_Left out to stay under {max_chars:,} characters: {', '.join(left_out)}; see `mlops report --json`._"
        )
    md += "\n"
    if len(md) > max_chars:  # only reachable with absurd budgets; cut at a line, close nothing open
        md = md[: max_chars - 80].rsplit("\n", 1)[0] + "\n\n_(truncated)_\n"
    return md


def write_step_summary(md: str) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when it is set (GitHub Actions). True if written."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as f:
        f.write(md if md.endswith("\n") else md + "\n")
    return True
