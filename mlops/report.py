"""The eval report: candidate vs production from stored results, as markdown (PR comment, job summary)
and JSON. The verdict comes first; the markdown stays under GitHub's 65,536-character comment limit."""

from __future__ import annotations

import os
from typing import Any

MARKER = "<!-- mlops-eval-report -->"
MAX_CHARS = 60_000  # GitHub rejects comments over 65,536; keep a margin for the workflow's own lines
WORST_CASES = 5
TREND_RELEASES = 10


def build_report(s: Any, release: str) -> dict[str, Any]:
    reg = s.registry
    cfg = s.loaded.cfg
    manifest = reg.require(release)
    st, _ = reg.read_state()
    prod = st.stages.get("production")
    cand = {suite: reg.get_eval(release, suite) for suite in cfg.evals}
    prod_res = {suite: reg.get_eval(prod, suite) for suite in cfg.evals} if prod and prod != release else {}
    gates_event = next((h for h in reversed(reg.history(release)) if h["event"] in ("gates_passed", "gates_failed")), None)
    gates = (gates_event or {}).get("detail", {}).get("gates", [])
    rows = []
    for suite, res in cand.items():
        if res is None:
            continue
        for metric, summ in res["metrics"].items():
            p = (prod_res.get(suite) or {}).get("metrics", {}).get(metric)
            g = [x for x in gates if x["eval"] == suite and x["metric"] == metric]
            rows.append({
                "suite": suite, "metric": metric, "candidate": summ["mean"], "production": p["mean"] if p else None,
                "delta": summ["mean"] - p["mean"] if p else None, "higher_is_better": summ["higher_is_better"],
                "interval": next((x["interval"] for x in g if x.get("interval")), None),
                "threshold": "; ".join(x["threshold"] for x in g) or "-",
                "verdict": ("pass" if all(x["passed"] for x in g) else "fail") if g else "-",
            })
    worst = _worst_cases(cand, prod_res)
    trend = _trend(s, cfg, gates)
    cost = {
        "endpoint_calls": sum((r or {}).get("cost", {}).get("endpoint_calls", 0) for r in cand.values()),
        "cache_hits": sum((r or {}).get("cost", {}).get("cache_hits", 0) for r in cand.values()),
        "completion_tokens": sum((r or {}).get("cost", {}).get("completion_tokens", 0) for r in cand.values()),
        "judge_calls": sum((r or {}).get("cost", {}).get("judge_calls", 0) for r in cand.values()),
        "train_seconds": (manifest.get("train") or {}).get("seconds"),
        "train_device": (manifest.get("train") or {}).get("device"),
    }
    passed = all(g["passed"] for g in gates) if gates else None
    return {
        "release": release, "production": prod, "verdict": {True: "pass", False: "fail", None: "not gated"}[passed],
        "gates": gates, "metrics": rows, "worst_cases": worst, "trend": trend, "cost": cost,
        "lineage": manifest.get("lineage", {}),
    }


def _worst_cases(cand: dict[str, Any], prod: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for suite, res in cand.items():
        if not res:
            continue
        metric = next((m for m, v in res["metrics"].items() if v["higher_is_better"]), None)
        if metric is None:
            continue
        p_by_id = {c["id"]: c for c in (prod.get(suite) or {}).get("cases", [])}
        for c in res["cases"]:
            pc = p_by_id.get(c["id"])
            drop = (pc["scores"].get(metric, 0) if pc else 1.0) - c["scores"].get(metric, 0)
            if drop > 0:
                out.append({"suite": suite, "metric": metric, "id": c["id"], "input": c["input"], "expected": c["expected"],
                            "candidate": c["output"], "production": pc["output"] if pc else None, "drop": drop,
                            "error": c.get("error")})
    out.sort(key=lambda r: (-r["drop"], r["id"]))
    return out[:WORST_CASES]


def _trend(s: Any, cfg: Any, gates: list[dict[str, Any]]) -> dict[str, list[tuple[str, float]]]:
    series: dict[str, list[tuple[str, float]]] = {}
    keys = sorted({(g["eval"], g["metric"]) for g in gates} or {(g.eval, g.metric) for g in cfg.gates})
    releases = list(reversed(s.registry.list()[:TREND_RELEASES]))
    for suite, metric in keys:
        pts = []
        for m in releases:
            ev = next((h.get("detail", {}).get("summary") for h in reversed(m["history"]) if h["event"] == "evaluated"), None)
            if ev and suite in ev and metric in ev[suite]:
                pts.append((m["id"], float(ev[suite][metric])))
        series[f"{suite}.{metric}"] = pts
    return series


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _cell(text: Any, limit: int = 80) -> str:
    t = str(text if text is not None else "—").replace("|", "\\|").replace("\n", " ").replace("`", "'")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def to_markdown(rep: dict[str, Any]) -> str:
    icon = {"pass": "✅", "fail": "❌", "not gated": "➖"}[rep["verdict"]]
    lines = [MARKER, f"## {icon} Eval report: `{rep['release']}` vs production `{rep['production'] or 'none'}`", ""]
    failed = [g for g in rep["gates"] if not g["passed"]]
    lines.append(f"**Verdict: {rep['verdict'].upper()}**" + (f": {len(failed)} of {len(rep['gates'])} gates failed." if failed else "."))
    for g in failed:
        lines.append(f"- ❌ `{g['name']}` {g['threshold']}: {_cell(g['reason'], 200)}")
    lines += ["", "| metric | production | candidate | delta | interval | threshold | verdict |", "|---|---:|---:|---:|---|---|---|"]
    for r in rep["metrics"]:
        iv = f"[{r['interval'][0]:+.3g}, {r['interval'][1]:+.3g}]" if r["interval"] else "—"
        delta = "—" if r["delta"] is None else f"{r['delta']:+.4g}"
        lines.append(f"| {r['suite']}.{r['metric']} | {_fmt(r['production'])} | {_fmt(r['candidate'])} | {delta} | {iv} | {_cell(r['threshold'])} | {r['verdict']} |")
    if rep["worst_cases"]:
        lines += ["", "<details><summary>Worst regressed cases</summary>", "", "| case | input | expected | production | candidate |", "|---|---|---|---|---|"]
        for c in rep["worst_cases"]:
            lines.append(f"| {_cell(c['id'], 40)} | {_cell(c['input'])} | {_cell(c['expected'])} | {_cell(c['production'])} | {_cell(c['candidate'] or c.get('error'))} |")
        lines += ["", "</details>"]
    for name, pts in rep["trend"].items():
        if len(pts) < 2:
            continue
        labels = ", ".join(f'"{p[0][-6:]}"' for p in pts)
        vals = ", ".join(f"{p[1]:.4g}" for p in pts)
        lines += ["", f"```mermaid\nxychart-beta\n    title \"{name} over the last {len(pts)} releases\"\n    x-axis [{labels}]\n    line [{vals}]\n```"]
    c = rep["cost"]
    lines += ["", f"**Cost**: {c['endpoint_calls']} endpoint calls ({c['cache_hits']} cached), {c['completion_tokens']} completion tokens, "
              f"{c['judge_calls']} judge calls, training {_fmt(c['train_seconds'])} s on {c['train_device'] or '—'}."]
    lin = rep["lineage"]
    lines.append(f"<sub>git {str(lin.get('git_sha') or '—')[:12]} · data {', '.join(f'{k}:{v[:8]}' for k, v in lin.get('dataset_hashes', {}).items())} · config {str(lin.get('config_hash', ''))[:8]} · code {str(lin.get('code_hash', ''))[:8]}</sub>")
    md = "\n".join(lines) + "\n"
    if len(md) > MAX_CHARS:
        md = md[: MAX_CHARS - 100] + "\n\n…(truncated to fit a GitHub comment)\n"
    return md


def write_step_summary(md: str) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(md + "\n")
