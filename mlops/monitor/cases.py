"""`mlops cases export`: production traffic turned into eval cases (regression cases from real use).

A captured request (mlops/monitor/record.py) becomes a case of the suite's format (pairs, completion
or chat, written with `mlops.data.Example.to_row`): its input is the user's text (the model's prompt
template taken off again, as the harness puts it back on), its `expected` the `mlops feedback` label.
With `failed`, only the answers the suite's metric scored below a threshold are kept (a judge metric
by default): their wrong answer is kept in the row's `source` for whoever writes the label.

Each case's id is a hash of its normalised input, so an export run twice writes the same ids and a
case already in any suite (or earlier in the target file) is never added again. The target file is
rewritten whole, atomically: its earlier rows, then the new cases; a failure leaves it as it was.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops.config import Loaded, metric_name
from mlops.data import Example, read_dataset, read_source
from mlops.errors import ConfigError, UsageError
from mlops.monitor.traffic import load_feedback, load_window
from mlops.registry.releases import Registry
from mlops.registry.store import atomic_write

TAG = "from-traffic"  # every exported case carries it: a gate or the report can slice by it
REFERENCE_FREE = ("json_valid", "regex", "length")  # metrics that judge an answer without a label


def normalise(text: str) -> str:
    """What makes two inputs the same case: NFKC, whitespace runs as one space, no outer space.
    Case is kept: for many tasks ("reverse this") it is the point."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def case_key(ex: Example) -> str:
    """The normalised input of a case; a multi-turn chat case is all its turns before the answer."""
    turns = [m for m in ex.messages if isinstance(m.get("content"), str) and m["content"]]
    if len(turns) <= 1:
        return normalise(ex.input)
    return normalise("\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in turns))


def case_id(key: str) -> str:
    return "traffic-" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]


def untemplate(prompt: str, template: str) -> str | None:
    """The user's input inside `prompt` rendered by the model's template (`{input}=` -> input),
    or None when the prompt was not written through the template."""
    head, sep, tail = template.partition("{input}")
    if not sep:
        return None
    if not prompt.startswith(head) or not prompt.endswith(tail) or len(prompt) < len(head) + len(tail):
        return None
    return prompt[len(head) : len(prompt) - len(tail)]


@dataclass
class Exported:
    """What one export did: the new cases (in file order), the rows kept, what was passed over."""

    to: Path
    suite: str
    format: str
    new: list[Example] = field(default_factory=list)
    kept: int = 0
    requests: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "to": str(self.to),
            "suite": self.suite,
            "format": self.format,
            "requests": self.requests,
            "exported": len(self.new),
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "cases": [ex.to_row() for ex in self.new],
        }


def suite_of(loaded: Loaded, suite: str | None) -> str:
    name = suite or loaded.cfg.monitor.eval or next(iter(loaded.cfg.evals), None)
    if name is None:
        raise ConfigError("mlops cases export: no eval suite in mlops.yaml to write cases for")
    if name not in loaded.cfg.evals:
        raise UsageError(f"unknown eval suite {name!r} (valid: {', '.join(loaded.cfg.evals)})")
    return name


def _existing(loaded: Loaded, to: Path) -> tuple[set[str], bytes, int, str | None]:
    """Keys of every case of every suite and of the target file, the target's bytes and rows (kept
    as they are: earlier exports' `source` included), and the suite data's format."""
    keys: set[str] = set()
    fmt: str | None = None
    for name in dict.fromkeys(ev.dataset for ev in loaded.cfg.evals.values()):
        path = loaded.cfg.datasets[name].path
        if (loaded.root / str(path)).resolve() == to.resolve():
            continue  # the target itself (read below): before the first export it does not exist
        rows = read_dataset(loaded, name)
        fmt = fmt or (rows[0].format if rows else None)
        keys.update(case_key(ex) for ex in rows)
    data, n = b"", 0
    if to.exists():
        try:
            data = to.read_bytes()
            target = read_source(to, root=loaded.root) if data.strip() else []
        except Exception as e:  # a file we would rewrite must read back whole first
            raise UsageError(f"--to {to}: cannot read its cases ({str(e)[:200]}); nothing written") from e
        keys.update(case_key(ex) for ex in target)
        fmt, n = (target[0].format if target else fmt), len(target)
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return keys, data, n, fmt


def _metric(loaded: Loaded, suite: str, name: str | None) -> tuple[Any, bool]:
    """The metric that marks an answer wrong (default: the suite's first judge metric, else its
    first metric) and whether it can judge an answer that has no label."""
    from mlops.evals.harness import build_metrics
    from mlops.plugins import JUDGE_METRICS

    names = [metric_name(sp) for sp in loaded.cfg.evals[suite].metrics]
    pick = name or next((n for n in names if n in JUDGE_METRICS), None) or (names[0] if names else None)
    if pick is None or pick not in names:
        raise UsageError(f"--metric {pick!r}: not a metric of suite {suite!r} (valid: {', '.join(names)})")
    metrics, _ = build_metrics(loaded, suite)
    metric = metrics[names.index(pick)]
    return metric, pick in JUDGE_METRICS or pick in REFERENCE_FREE


def _wrong(metric: Any, inputs: list[tuple[dict[str, Any], str, str | None]], threshold: float) -> set[str]:
    """Request ids whose answer scores on the wrong side of `threshold` (a failed score counts: the
    metric could not call the answer right)."""
    from mlops.evals.types import Case, Output

    cases = [Case(str(r["id"]), text, label) for r, text, label in inputs]
    outs = [Output(str(r.get("output") or ""), float(r.get("latency_s") or 0)) for r, _, _ in inputs]
    scores = metric.score_batch(cases, outs) if cases else []
    sign = 1.0 if metric.higher_is_better else -1.0
    return {c.id for c, s in zip(cases, scores, strict=True) if s.failed or sign * (s.value - threshold) < 0}


def export_cases(
    loaded: Loaded,
    registry: Registry,
    since: float,
    to: Path,
    *,
    until: float | None = None,
    labelled: bool = False,
    failed: bool = False,
    suite: str | None = None,
    metric: str | None = None,
    threshold: float = 0.5,
    model: str | None = None,
    dry_run: bool = False,
) -> Exported:
    """Captured requests of [since, until] as new cases appended to `to` (see the module doc)."""
    if loaded.cfg.monitor.capture == "metadata":
        raise UsageError(
            "mlops cases export: monitor.capture is metadata: requests are stored without their text, "
            "so there is nothing to turn into cases (set monitor.capture: full)"
        )
    name = suite_of(loaded, suite)
    keys, data, n, fmt = _existing(loaded, to)
    out = Exported(to, name, fmt or "pairs", kept=n)
    model = model or loaded.cfg.deploy.model
    template = loaded.cfg.models[model].prompt if model in loaded.cfg.models else "{input}"
    labels = load_feedback(registry.store)
    window = load_window(registry.store, since, until if until is not None else time.time())
    several = len(loaded.cfg.deploy.names) > 1
    picked: list[tuple[dict[str, Any], str, str | None]] = []
    for r in window.records:
        rel = str(r.get("release") or "")
        if several and (registry.model_of(rel) if rel else None) != model:
            continue  # another model's traffic: one capture holds every deployed model's
        out.requests += 1
        if r.get("status") != 200:
            out.skip("not answered (status != 200)")
            continue
        prompt = r.get("prompt")
        if not isinstance(prompt, str):
            out.skip("no text (captured as metadata)")
            continue
        if r.get("text_cut"):
            out.skip("text cut at capture")
            continue
        text = untemplate(prompt, template)
        if text is None or not text.strip():
            out.skip("prompt not written through the model's template")
            continue
        label = labels.get(str(r["id"]), {}).get("label")
        if labelled and label is None:
            out.skip("no label")
            continue
        picked.append((r, text, label))
    if failed:
        judge, free = _metric(loaded, name, metric)
        scorable = [p for p in picked if p[2] is not None or free]
        for _ in range(len(picked) - len(scorable)):
            out.skip(f"no label for {judge.name}")
        wrong = _wrong(judge, scorable, threshold)
        for _ in range(len(scorable) - len(wrong)):
            out.skip(f"{judge.name} scored the answer right")
        picked = [p for p in scorable if str(p[0]["id"]) in wrong]
    lines: list[bytes] = []
    for r, text, label in picked:
        ex = _example(text, label, out.format)
        key = case_key(ex)
        if key in keys:
            out.skip("duplicate of an existing case")
            continue
        keys.add(key)
        out.new.append(ex)
        lines.append(_line(_row(ex, r)))
    if out.new and not dry_run:
        atomic_write(to, data + b"".join(lines))
    return out


def _example(text: str, label: str | None, fmt: str) -> Example:
    turns = ({"role": "user", "content": text},) if fmt == "chat" else ()
    rid = case_id(case_key(Example("", text, label, messages=turns)))
    return Example(rid, text, label, messages=turns, tags=(TAG,), format=fmt)


def _row(ex: Example, rec: dict[str, Any]) -> dict[str, Any]:
    """The case's row plus where it came from (the reader ignores `source`; people and the report read it)."""
    src = {"release": rec.get("release") or None, "request": rec.get("id"), "time": rec.get("time")}
    if ex.expected is None or rec.get("output") != ex.expected:
        src["answer"] = rec.get("output")  # what production said: the label's reviewer compares
    return ex.to_row() | {"source": src}


def _line(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"
