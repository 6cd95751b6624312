"""The report as markdown: the pull-request comment and the job summary.

1. the hidden marker line (the workflow finds its sticky comment by it), then the verdict and
   every gate with its numbers;
2. metric | production | candidate | delta | interval | threshold | verdict;
3. the worst regressed cases: input, expected, both outputs; the cases this change adds;
4. a Mermaid `xychart-beta` per gated metric over the last releases;
5. noise: what each regression gate can resolve (MDE), flaky and quarantined cases, judge spread,
   a stale baseline;
6. cost: training seconds (GPU-seconds on a GPU), tokens, endpoint and judge calls.

The markdown stays under MAX_CHARS whatever the suite size: cells are cut, the case list is
bounded, and a section that does not fit is left out with a note (never cut mid-table or
mid-chart). Text from cases and outputs is escaped, so a model's output cannot break the layout,
inject HTML or @-mention anyone.
"""

from __future__ import annotations

import html
import os
from typing import Any

from mlops.report.model import Report, ReportCost, TrendSeries
from mlops.report.numbers import stat_key

MARKER = "<!-- mlops-eval-report -->"
MAX_CHARS = 60_000  # GitHub rejects comments over 65,536; a margin for the workflow's own lines
CELL = 160  # characters of case text per table cell
MAX_GATE_LINES = 60


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


def _chart(series: TrendSeries) -> str | None:
    pts = series.points
    if len(pts) < 2:
        return None
    values = [p.value for p in pts]
    lo, hi = min(values + series.bounds), max(values + series.bounds)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    if 0 <= min(values + series.bounds) and lo < 0:
        lo = 0.0
    labels = []
    for p in pts:
        tag = " (this)" if p.this else " (prod)" if p.production else ""
        labels.append(f'"{p.release[-6:]}{tag}"')
    title = series.label.replace('"', "'")
    bounds = ", ".join(_plain(b) for b in series.bounds)
    caption = f"_{_own(series.label)} per release, oldest first" + (
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
        f'    y-axis "{series.metric}" {_plain(lo)} --> {_plain(hi)}',
        f"    line [{', '.join(_plain(v) for v in values)}]",
    ]
    lines += [f"    line [{', '.join([_plain(b)] * len(pts))}]" for b in series.bounds]
    lines.append("```")
    return "\n".join(lines)


def _verdict_head(rep: Report) -> list[str]:
    icon = {"pass": "✅", "fail": "❌", "not gated": "➖", "not evaluated": "⚠️"}[rep.verdict]
    if rep.baseline:
        base = f"{rep.baseline_stage} `{rep.baseline}`"
    elif rep.release == rep.production:
        base = "nothing (it is production, with no previous release)"
    else:
        base = "nothing (no production release yet)"
    lines = [MARKER, f"## {icon} Eval report: `{rep.release}` vs {base}", ""]
    gates = rep.gates
    failed = [g for g in gates if not g.passed]
    if rep.verdict == "not evaluated":
        head = f"**Verdict: NOT EVALUATED**: `{rep.release}` has no stored eval results (run `mlops eval`)."
    elif rep.verdict == "not gated":
        head = "**Verdict: NOT GATED**: no gates are declared in mlops.yaml."
    elif failed:
        head = f"**Verdict: FAIL**: {len(failed)} of {len(gates)} gate checks failed."
    else:
        head = f"**Verdict: PASS**: all {len(gates)} gate checks passed."
    lines.append(f"{head} Release status: `{rep.status}`.")
    lines.append("")
    ordered = failed + [g for g in gates if g.passed]
    for g in ordered[:MAX_GATE_LINES]:
        mark = "✅" if g.passed else "❌"
        lines.append(f"- {mark} `{g.name}` {_own(g.threshold)}: {_own(g.reason)}")
    if len(ordered) > MAX_GATE_LINES:
        lines.append(f"- … and {len(ordered) - MAX_GATE_LINES} more (all passed or listed in `--json`)")
    return lines


def _base_col(rep: Report) -> str:
    """The baseline column's name: the stage it was read from (`previous` once the candidate is production)."""
    return rep.baseline_stage or "production"


def _table(rep: Report, budget: int) -> tuple[str, int]:
    head = [
        "",
        f"| metric | {_base_col(rep)} | candidate | delta | interval | threshold | verdict |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    body: list[str] = []
    used = sum(len(x) + 1 for x in head)
    for r in rep.metrics:
        name = f"{r.suite}.{r.metric}" + ("" if r.stat == "mean" else f" {stat_key(r.stat, r.stat_threshold)}")
        if r.failed_cases:
            name += f" ({r.failed_cases} of {r.n} cases failed)"
        iv = f"[{r.interval[0]:+.3g}, {r.interval[1]:+.3g}]" if r.interval else "—"
        verdict = {"pass": "✅ pass", "fail": "❌ fail", None: "—"}[r.verdict]
        arrow = "" if r.delta is None or r.delta == 0 else (" ↑" if (r.delta > 0) == r.higher_is_better else " ↓")
        line = (
            f"| {_own(name, 120)} | {_num(r.production)} | {_num(r.candidate)} | {_signed(r.delta)}{arrow}"
            f" | {iv} | {_own(r.threshold or '—', 120)} | {verdict} |"
        )
        if used + len(line) + 1 > budget:
            body.append(f"| … {len(rep.metrics) - len(body)} more rows in `mlops report --json` | | | | | | |")
            break
        body.append(line)
        used += len(line) + 1
    notes = [
        "",
        f"<sub>delta = candidate − {_base_col(rep)} (↑ better, ↓ worse); interval: paired bootstrap over the same "
        "cases, each end a one-sided bound at the gate's confidence.</sub>",
    ]
    text = "\n".join(head + body + notes)
    return text, len(body)


def _segment_block(rep: Report) -> str:
    """metric x segment for suites whose cases carry tags: where a slice moved while the mean held."""
    if not rep.segments:
        return ""
    lines = [
        "",
        "### Per segment",
        "",
        f"| segment | metric | {_base_col(rep)} | candidate | delta | interval | threshold | verdict |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for r in rep.segments:
        name = f"{r.suite}.{r.metric}" + ("" if r.stat == "mean" else f" {stat_key(r.stat, r.stat_threshold)}")
        name += f" ({r.n} cases" + (f", {r.failed_cases} failed)" if r.failed_cases else ")")
        iv = f"[{r.interval[0]:+.3g}, {r.interval[1]:+.3g}]" if r.interval else "—"
        verdict = {"pass": "✅ pass", "fail": "❌ fail", None: "—"}[r.verdict]
        arrow = "" if r.delta is None or r.delta == 0 else (" ↑" if (r.delta > 0) == r.higher_is_better else " ↓")
        lines.append(
            f"| {_own(r.segment, 60)} | {_own(name, 120)} | {_num(r.production)} | {_num(r.candidate)}"
            f" | {_signed(r.delta)}{arrow} | {iv} | {_own(r.threshold or '—', 120)} | {verdict} |"
        )
    return "\n".join(lines)


def _worst_block(rep: Report) -> str:
    w = rep.worst_cases
    if not w.cases:
        return ""
    metrics = ", ".join(dict.fromkeys(f"{c.suite}.{c.metric}" for c in w.cases))
    if w.compared:
        title = f"### Worst regressed cases ({metrics})"
        cols = f"| case | input | expected | {_base_col(rep)} | candidate |"
    else:
        title = f"### Lowest-scoring cases ({metrics}; no production to compare with)"
        cols = "| case | input | expected | — | candidate |"
    lines = ["", title, "", cols, "|---|---|---|---|---|"]
    for c in w.cases:
        cand = _text(c.candidate) + f" ({_num(c.candidate_score)})"
        if c.candidate_error:
            cand += f"<br>**failed**: {_text(c.candidate_error, 120)}"
        prod = _text(c.production) + f" ({_num(c.production_score)})" if w.compared else "—"
        lines.append(f"| {_text(c.id, 40)} | {_text(c.input)} | {_text(c.expected)} | {prod} | {cand} |")
    return "\n".join(lines)


def _new_block(rep: Report) -> str:
    n = rep.new_cases
    if n is None or not n.total:
        return ""
    more = f" (the first {len(n.cases)})" if n.total > len(n.cases) else ""
    lines = ["", f"### New cases: {n.total}{more}", "", "| case | input | expected | candidate |", "|---|---|---|---|"]
    for c in n.cases:
        score = f" ({c.metric} {_num(c.score)})" if c.metric else ""
        lines.append(f"| {_text(c.id, 40)} | {_text(c.input)} | {_text(c.expected)} | {_text(c.candidate)}{score} |")
    return "\n".join(lines)


MAX_NOISE_CASES = 15  # flaky cases and judge spreads, each


def _noise_block(rep: Report) -> str:
    n = rep.noise
    if not (n.gates or n.flaky or n.spreads or any(b.stale for b in n.baselines)):
        return ""
    lines = ["", "### Noise", ""]
    for g in n.gates:
        if g.mde is None:
            continue
        mark = "⚠️ " if g.warning else ""
        lines.append(
            f"- {mark}`{_own(g.gate)}` can detect a regression of **{g.mde:.3g}** or more on {g.n} cases "
            f"({g.confidence:.0%} confidence, {g.power:.0%} power); its max_regression is {g.max_regression:g}"
            + (": tighter than the data can resolve" if g.warning else "")
        )
    for b in n.baselines:
        if b.stale:
            lines.append(f"- ⚠️ baseline `{b.release}` on `{b.suite}` is {b.age_days or 0:.0f} days old")
    if n.flaky:
        lines.append(f"- flaky cases ({n.flaky_total}):")
        for f in n.flaky[:MAX_NOISE_CASES]:
            kept = (
                "quarantined"
                if f.quarantined
                else ("out of " + ", ".join(f.excluded_by) if f.excluded_by else "still gated")
            )
            lines.append(f"  - `{_text(f.id, 40)}` {_own(f.metric)}: {_own(f.why, 160)} ({_own(kept)})")
    wide = [c for c in n.spreads if c.spread > 0]
    if wide:
        lines.append(f"- judge spread over repeats, widest {min(len(wide), MAX_NOISE_CASES)} of {len(wide)} cases:")
        for c in wide[:MAX_NOISE_CASES]:
            vals = ", ".join(f"{v:.3g}" for v in c.samples)
            lines.append(f"  - `{_text(c.id, 40)}` {_own(c.metric)}: {vals} (spread {c.spread:.3g})")
    return "\n".join(lines)


def _budget_block(rep: Report) -> str:
    b = rep.budget
    if b is None:
        return ""
    from mlops.registry.costs import fmt

    caps = []
    for line in b.lines:
        if line.scope != "month":
            continue
        share = f" ({line.spent / line.cap:.0%})" if line.cap else ""
        mark = " ⚠️" if line.spent > line.cap else ""
        caps.append(f"{line.key} {fmt(line.key, line.spent)} of {fmt(line.key, line.cap)}{share}{mark}")
    runs = [f"{line.key} ≤ {fmt(line.key, line.cap)}" for line in b.lines if line.scope == "run"]
    mine = ", ".join(f"{k} {fmt(k, v)}" for k, v in b.release.items() if v)
    parts = [f"**Budget** ({b.month}): " + ("; ".join(caps) or "no monthly cap")]
    if runs:
        parts.append("per run " + ", ".join(runs))
    if mine:
        parts.append(f"this release: {mine}")
    return "\n" + ". ".join(parts) + "."


def _cost_block(rep: Report) -> str:
    c: ReportCost = rep.cost
    if c.train_seconds is None:
        train = "training: —"
    else:
        gpu = f"{c.gpu_seconds:.1f} GPU-s" if c.gpu_seconds else "0 GPU-s"
        tokens = f", ≈{c.train_tokens:,} tokens" if c.train_tokens else ""
        run = ""
        if c.train_precision:
            run += f", {c.train_precision}"
        if c.peak_memory_mb:
            run += f", peak {c.peak_memory_mb:,.0f} MiB"
        if c.gpu_type:
            usd = c.train_cost_usd
            run += f", {c.gpu_type} ≈${usd:,.4f}" if usd is not None else f", {c.gpu_type} (no price)"
        train = f"training {c.train_seconds:.1f} s on {c.train_device or '?'} ({gpu}{tokens}{run})"
    evals = (
        f"eval {c.endpoint_calls:,} endpoint calls ({c.cache_hits:,} cached, {c.retries} retries, "
        f"{c.errors} failed), {c.completion_tokens:,} completion tokens, {c.eval_seconds:.1f} s"
    )
    judges = (
        f"judges {c.judge_calls:,} calls ({c.judge_cache_hits:,} cached, {c.judge_failures} failed), "
        f"{c.judge_tokens:,} tokens"
    )
    lin = rep.lineage or {}
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


def to_markdown(rep: Report, max_chars: int = MAX_CHARS) -> str:
    """The PR comment: verdict first, at most `max_chars` characters."""
    reserve = 400  # for the closing note
    md = "\n".join(_verdict_head(rep))
    table, _ = _table(rep, max(2_000, (max_chars - len(md)) // 2))
    md += "\n" + table
    left_out = []
    blocks = [
        ("per-segment rows", _segment_block(rep)),
        ("worst cases", _worst_block(rep)),
        ("new cases", _new_block(rep)),
    ]
    charts = [c for c in (_chart(t) for t in rep.trend) if c]
    if charts:
        blocks.append(("trend charts", "\n".join(["", "### Trend", *charts])))
    blocks.append(("noise", _noise_block(rep)))
    blocks.append(("cost", _cost_block(rep)))
    blocks.append(("budget", _budget_block(rep)))
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
