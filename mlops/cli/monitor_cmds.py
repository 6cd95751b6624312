"""Monitoring commands: `mlops monitor` (drift, cost, SLOs, live quality; exit 3 on drift) and
`mlops feedback` (a label for a captured request)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, ModelOpt, SetOpt, emit, err, load_config, say_fn
from mlops.errors import GateFailed, InfraError, UsageError
from mlops.redact import redact, redact_obj

if TYPE_CHECKING:  # pydantic models load with the command that builds them, not with `--help`
    from mlops.monitor.model import MonitorReport


def _registry(loaded: Any) -> Any:
    from mlops.registry.releases import Registry
    from mlops.registry.store import open_store

    return Registry(open_store(loaded.cfg.storage, base_dir=loaded.root), model=loaded.cfg.deploy.names[0])


def _reference(text: str | None, now: float) -> tuple[float, float] | None:
    """'7d..1d': traffic from 7 days ago until 1 day ago."""
    from mlops.monitor.traffic import parse_age

    if text is None:
        return None
    old, sep, new = text.partition("..")
    if not sep:
        raise UsageError(f"--reference {text!r}: expected OLDEST..NEWEST ages, e.g. 7d..1d")
    a, b = now - parse_age(old, "--reference"), now - parse_age(new or "0", "--reference")
    if a >= b:
        raise UsageError(f"--reference {text!r}: the first age must be the older one")
    return a, b


def register(app: typer.Typer) -> None:
    @app.command()
    def monitor(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        since: Annotated[
            str | None, typer.Option("--since", help="Window: 24h, 30m, 7d (default monitor.window).")
        ] = None,
        release: Annotated[str | None, typer.Option("--release", help="Only this release's traffic.")] = None,
        reference: Annotated[
            str | None, typer.Option("--reference", help="Compare with earlier traffic, e.g. 7d..1d (default: data).")
        ] = None,
        markdown: Annotated[bool, typer.Option("--markdown", help="Print the markdown report (the default).")] = False,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the report to a file.")] = None,
        markdown_out: Annotated[
            Path | None,
            typer.Option("--markdown-out", help="Also write the markdown report here (with --json: both, one run)."),
        ] = None,
        model: ModelOpt = None,
    ) -> None:
        """Drift of captured traffic against the serving release's data; cost, SLOs, live quality.

        Exit 3 when a statistic crosses its threshold in `monitor.thresholds` (named on stderr);
        4 when capture lost more than `monitor.max_loss_rate` of the answered requests (no verdict
        on partial traffic); 0 when all are within, or when there is no traffic in the window.
        Several deployed models: `--model NAME` analyses that model's traffic only; without it,
        every model's, one section each (`--json`: `{"models": {name: report}, "drifted": [...]}`),
        and the exit code is the worst of theirs."""
        from mlops.config import narrow, owner, resolve_model
        from mlops.monitor.traffic import parse_age

        full = load_config(config, set_)
        names = full.cfg.deploy.names
        if model is None and release is not None and len(names) > 1:
            model = owner(names, release)  # a release id names its model
        targets = [resolve_model(full, model)] if model is not None or len(names) == 1 else names
        now = time.time()
        window = parse_age(since) if since is not None else full.cfg.monitor.window
        ref = _reference(reference, now)
        for path in (out, markdown_out):  # refused before the analysis, not after it
            if path is not None and not path.parent.is_dir():
                raise UsageError(f"--out {path}: {path.parent} is not a directory")
        reports = {}
        for name in targets:
            loaded = narrow(full, name)
            reg = _registry(loaded)
            if release is not None:
                reg.require(release)  # an unknown release is named, not reported as "no traffic"
            reports[name] = (loaded, analyze_one(loaded, reg, now - window, now, release, ref, json_, names))
        if len(reports) == 1:
            loaded, rep = next(iter(reports.values()))
            _emit_one(loaded, rep, json_, markdown, out, markdown_out)
            return
        _emit_models(reports, json_, markdown, out, markdown_out)

    @app.command()
    def feedback(
        request_id: Annotated[str, typer.Argument(help="The `id` of a served response (captured).")],
        label: Annotated[str | None, typer.Argument(help="The answer it should have given.")] = None,
        thumbs: Annotated[
            str | None, typer.Option("--thumbs", help="up | down: the user's verdict (A/B metric `thumbs`).")
        ] = None,
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Attach a label to a captured request (`mlops monitor` scores labelled traffic with the
        suite), or a thumbs up/down (`mlops experiment --metric thumbs` counts them per arm)."""
        from mlops.monitor.traffic import add_feedback, add_thumbs

        if label is None and thumbs is None:
            raise UsageError("give a LABEL (the answer it should have given) or --thumbs up|down")
        loaded = load_config(config, set_)
        store, rate = _registry(loaded).store, loaded.cfg.monitor.sample_rate
        doc: dict[str, Any] = {}
        if thumbs is not None:
            doc |= add_thumbs(store, request_id, thumbs, rate)
        if label is not None:
            doc |= add_feedback(store, request_id, label, rate)
        what = f"labelled {request_id}" if label is not None else f"thumbs {doc['thumbs']} on {request_id}"
        if label is not None and thumbs is not None:
            what += f", thumbs {doc['thumbs']}"
        emit(doc, json_, f"{what} (release {doc['release']})")


def analyze_one(
    loaded: Any,
    reg: Any,
    since: float,
    until: float,
    release: str | None,
    ref: tuple[float, float] | None,
    json_: bool,
    names: list[str],
) -> MonitorReport:
    from mlops.monitor.analyze import analyze

    return analyze(loaded, reg, since, until, release, ref, say=say_fn(json_), models=names)


def _emit_one(
    loaded: Any, rep: MonitorReport, json_: bool, markdown: bool, out: Path | None, markdown_out: Path | None
) -> None:
    from mlops.monitor.report import to_markdown

    md = redact(to_markdown(rep))
    doc = redact_obj(rep.model_dump())  # the JSON: the report's keys as they always were
    _output(doc, md, json_, markdown, out, markdown_out)
    _track(loaded, rep)
    if rep.verdict == "no traffic":
        err.print(rep.message, markup=False, highlight=False)
    if rep.verdict == "capture lost":
        raise InfraError(str(rep.message))
    if rep.drifted:
        raise GateFailed(f"drift: {_crossed(rep)}")


# the worst first: the verdict of several models' reports is the worst of theirs
VERDICTS = ("capture lost", "drift", "ok", "too few requests", "no traffic")


def _emit_models(
    reports: dict[str, tuple[Any, MonitorReport]],
    json_: bool,
    markdown: bool,
    out: Path | None,
    markdown_out: Path | None,
) -> None:
    """Several models' reports as one: a section each, and the top-level keys a one-model report
    has (what the nightly workflow reads), each check named `<model>.<check>`."""
    from mlops.monitor.report import MARKER, to_markdown

    reps = {name: rep for name, (_, rep) in reports.items()}
    sections = [MARKER]
    for name, rep in reps.items():
        body = to_markdown(rep).replace(MARKER, "", 1).lstrip("\n")
        sections += [f"**Model `{name}`**", "", body]
    md = redact("\n".join(sections))
    docs = {name: redact_obj(rep.model_dump()) for name, rep in reps.items()}
    first = next(iter(reps.values()))
    doc = {
        "release": None,
        "since": first.since,
        "until": first.until,
        "requests": sum(r.requests for r in reps.values()),
        "drifted": [f"{n}.{d}" for n, r in reps.items() for d in r.drifted],
        "verdict": min((r.verdict for r in reps.values()), key=VERDICTS.index),
        "on_drift": first.on_drift,
        "checks": [c | {"name": f"{n}.{c['name']}"} for n, d in docs.items() for c in d.get("checks", [])],
        "models": docs,
    }
    _output(doc, md, json_, markdown, out, markdown_out)
    for loaded, rep in reports.values():
        _track(loaded, rep)
    for name, rep in reps.items():
        if rep.verdict == "no traffic":
            err.print(f"{name}: {rep.message}", markup=False, highlight=False)
    lost = [f"{n}: {r.message}" for n, r in reps.items() if r.verdict == "capture lost"]
    if lost:
        raise InfraError("; ".join(lost))
    drifted = [f"{n}: {_crossed(r)}" for n, r in reps.items() if r.drifted]
    if drifted:
        raise GateFailed(f"drift: {'; '.join(drifted)}")


def _crossed(rep: MonitorReport) -> str:
    crossed = [c for c in rep.checks if c.drifted]
    return ", ".join(f"{c.name} {c.value:.4g} (threshold {c.threshold:g})" for c in crossed)


def _output(
    doc: dict[str, Any], md: str, json_: bool, markdown: bool, out: Path | None, markdown_out: Path | None
) -> None:
    from mlops.report import write_step_summary

    write_step_summary(md)
    if out is not None:
        _write(out, json.dumps(doc, indent=2, default=str) + "\n" if json_ else md)
    if markdown_out is not None:  # one analysis for the machines' JSON and the humans' markdown
        _write(markdown_out, md)
    if json_:
        emit(doc, True)
    elif markdown or out is None:
        sys.stdout.write(md)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    err.print(f"wrote {path}", markup=False)


def _track(loaded: Any, rep: MonitorReport) -> None:
    """One W&B run per monitor run (offline by default, as everywhere)."""
    from mlops.tracking import Tracker

    if rep.verdict in ("no traffic", "capture lost"):
        return
    t = Tracker(loaded, "monitor", {"release": rep.release, "since": rep.since, "until": rep.until})
    try:
        values = {f"monitor/{c.name}": c.value for c in rep.checks if c.value is not None}
        t.log(values | {"monitor/requests": rep.requests, "monitor/drifted": len(rep.drifted)})
        t.summary({"verdict": rep.verdict, "drifted": ",".join(rep.drifted)})
    finally:
        t.finish(3 if rep.drifted else 0)


def validate_data(loaded: Any, json_: bool) -> None:
    """`mlops validate --data`: every dataset's checks; exit 1 on an error-level finding."""
    from mlops.errors import ConfigError
    from mlops.monitor.datachecks import run_checks

    res = run_checks(loaded)
    if json_:
        emit(res.model_dump(), True)
    else:
        for name, d in res.datasets.items():
            worst = "error" if any(f.severity == "error" for f in d.findings) else "ok"
            err.print(f"{name}: {d.rows} rows, {worst}", markup=False, highlight=False)
            for f in d.findings:
                err.print(f"  {f.severity}: {f.line}", markup=False, highlight=False, soft_wrap=True)
    if not res.ok:
        bad = [f.line for d in res.datasets.values() for f in d.findings if f.severity == "error"]
        raise ConfigError(f"data checks failed: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    emit({}, False, f"data checks passed ({len(res.datasets)} dataset(s))") if not json_ else None
