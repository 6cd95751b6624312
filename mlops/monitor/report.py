"""The monitor report as markdown, with the PR report's conventions: a hidden marker line (the
nightly workflow finds its one issue by it), the verdict first, one table of checks, a Mermaid
chart, then the details. Only our own text goes in; no captured prompt or output is quoted."""

from __future__ import annotations

from mlops.monitor.model import Check, Histogram, MonitorReport, Reference

MARKER = "<!-- mlops-monitor-report -->"
GROUPS = {"input": "input drift", "response": "response drift", "cost": "cost", "slo": "SLO", "quality": "live quality"}


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _own(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _plain(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def _threshold(c: Check) -> str:
    if c.threshold is None:
        return "— (reported)"
    op = "<=" if c.direction == "max" else ">="
    return f"{op} {_num(c.threshold)}" + (" and p < α" if c.p_value is not None else "")


def _verdict(c: Check) -> str:
    if c.drifted:
        return "❌ drift"
    return "✅ ok" if c.judged else "➖ not judged"


def _chart(h: Histogram | None) -> list[str]:
    if h is None or len(h.edges) < 3:
        return []
    edges = h.edges
    labels = ", ".join(f'"{a}-{b - 1}"' if b - 1 > a else f'"{a}"' for a, b in zip(edges, edges[1:], strict=False))
    top = max([*h.reference, *h.traffic, 0.01]) * 1.1
    return [
        "",
        "_Prompt length (characters), share of requests: first line the reference, second the traffic._",
        "",
        "```mermaid",
        "xychart-beta",
        '    title "Prompt length: reference vs traffic"',
        f"    x-axis [{labels}]",
        f'    y-axis "share" 0 --> {_plain(top)}',
        f"    line [{', '.join(_plain(v) for v in h.reference)}]",
        f"    line [{', '.join(_plain(v) for v in h.traffic)}]",
        "```",
    ]


def to_markdown(rep: MonitorReport) -> str:
    release = f"`{rep.release}`" if rep.release else "no production release"
    lines = [MARKER, f"## {_icon(rep)} Monitor report: {release}, {rep.since} → {rep.until}", ""]
    if rep.verdict == "capture lost":
        lines += [f"**Verdict: CAPTURE LOST**: {_own(str(rep.message))}.", "", *_capture(rep)]
        return "\n".join(lines) + "\n"
    if rep.verdict == "no traffic":
        lines += [f"**No traffic**: {rep.message}.", *(["", *_capture(rep)] if rep.capture else [])]
        return "\n".join(lines) + "\n"
    drifted = rep.drifted
    judged = [c for c in rep.checks if c.judged]
    if drifted:
        names = ", ".join(f"`{n}`" for n in drifted)
        lines.append(f"**Verdict: DRIFT**: {len(drifted)} of {len(judged)} checks crossed their thresholds: {names}.")
    elif rep.verdict == "ok":
        lines.append(f"**Verdict: OK**: all {len(judged)} judged checks are within their thresholds.")
    else:
        lines.append(f"**Verdict: NOT JUDGED**: {rep.requests} requests, fewer than `monitor.min_requests`.")
    lines.append("")
    skipped = rep.skipped
    # a report with traffic always has its reference; the empty one keeps the renderer total
    ref = rep.reference or Reference(kind="", notes=[], prompts=0, outputs=0)
    where = (
        f"datasets {', '.join(ref.datasets or [])}" if ref.kind == "data" else f"traffic {' → '.join(ref.window or [])}"
    )
    lines.append(
        f"{rep.requests:,} captured requests in {rep.files} files; reference: {where} "
        f"({ref.prompts:,} prompts, {ref.outputs:,} outputs)."
    )
    if skipped.files or skipped.lines:
        lines.append(f"Skipped: {skipped.lines} malformed or truncated lines, {skipped.files} unreadable files.")
    if rep.dropped and rep.capture is None:
        lines.append(f"The capture queue was full for {rep.dropped} requests (dropped, not in these figures).")
    if rep.text_dropped:
        lines.append(
            f"{rep.text_dropped} requests' text was over the reader's budget: in the numbers, not the text checks."
        )
    lines += _capture(rep)
    for note in [*ref.notes, *([rep.notes_capture] if rep.notes_capture else [])]:
        lines.append(f"_Note: {_own(note)}._")
    lines += ["", "| check | group | value | threshold | verdict | detail |", "|---|---|---:|---|---|---|"]
    order = sorted(rep.checks, key=lambda c: (not c.drifted, list(GROUPS).index(c.group)))
    for c in order:
        lines.append(
            f"| `{c.name}` | {GROUPS[c.group]} | {_num(c.value)} | {_threshold(c)} | {_verdict(c)} | {_own(c.detail)} |"
        )
    lines += _chart((rep.histogram or {}).get("prompt_length"))
    q = rep.quality
    if q is not None and (q.sample or q.labelled.n):
        lines += ["", f"### Live quality (suite `{q.suite}`)", ""]
        for name, s in q.sample.items():
            ref_mean = f" (eval: {_num(s.eval_mean)})" if s.eval_mean is not None else ""
            lines.append(f"- `{name}` on {s.n} sampled requests: mean {_num(s.mean)}{ref_mean}")
        lab = q.labelled
        for name, ls in lab.metrics.items():
            lines.append(f"- `{name}` on {ls.n} labelled requests (`mlops feedback`): mean {_num(ls.mean)}")
        if not lab.n:
            lines.append("- no labelled requests in this window (`mlops feedback <request-id> <label>`)")
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted((rep.statuses or {}).items()))
    lines += ["", f"<sub>statuses {statuses} · exit 3 on drift · `mlops monitor --json` for every number</sub>"]
    return "\n".join(lines) + "\n"


def _capture(rep: MonitorReport) -> list[str]:
    a = rep.capture
    if a is None:
        return []
    lost = sum(a.lost.values())
    why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in a.lost.items() if v)
    line = f"Capture: {a.answered:,} requests answered, {a.captured:,} captured, {lost:,} lost" + (
        f" ({why}; {a.loss_rate:.1%})" if lost else ""
    )
    if a.sampled_out:
        line += f", {a.sampled_out:,} left out by monitor.sample_rate"
    if a.pending:
        line += f", {a.pending:,} still queued"
    if a.last_error:
        line += f"; last write error: {_own(a.last_error)}"
    return [line + "."]


def _icon(rep: MonitorReport) -> str:
    return {"drift": "❌", "ok": "✅", "no traffic": "➖"}.get(rep.verdict, "⚠️")
