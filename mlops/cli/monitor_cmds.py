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
        on partial traffic); 0 when all are within, or when there is no traffic in the window."""
        from mlops.config import narrow, resolve_model
        from mlops.monitor.analyze import analyze
        from mlops.monitor.report import to_markdown
        from mlops.monitor.traffic import parse_age
        from mlops.report import write_step_summary

        loaded = load_config(config, set_)
        loaded = narrow(loaded, resolve_model(loaded, model))
        now = time.time()
        window = parse_age(since) if since is not None else loaded.cfg.monitor.window
        ref = _reference(reference, now)
        for path in (out, markdown_out):  # refused before the analysis, not after it
            if path is not None and not path.parent.is_dir():
                raise UsageError(f"--out {path}: {path.parent} is not a directory")
        reg = _registry(loaded)
        if release is not None:
            reg.require(release)  # an unknown release is named, not reported as "no traffic"
        rep = analyze(loaded, reg, now - window, now, release, ref, say=say_fn(json_))
        md = redact(to_markdown(rep))
        doc = redact_obj(rep.model_dump())  # the JSON: the report's keys as they always were
        write_step_summary(md)
        if out is not None:
            _write(out, json.dumps(doc, indent=2, default=str) + "\n" if json_ else md)
        if markdown_out is not None:  # one analysis for the machines' JSON and the humans' markdown
            _write(markdown_out, md)
        if json_:
            emit(doc, True)
        elif markdown or out is None:
            sys.stdout.write(md)
        _track(loaded, rep)
        if rep.verdict == "no traffic":
            err.print(rep.message, markup=False, highlight=False)
        if rep.verdict == "capture lost":
            raise InfraError(str(rep.message))
        if rep.drifted:
            crossed = [c for c in rep.checks if c.drifted]
            names = ", ".join(f"{c.name} {c.value:.4g} (threshold {c.threshold:g})" for c in crossed)
            raise GateFailed(f"drift: {names}")

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
