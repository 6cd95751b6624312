"""`mlops cases export`: captured production traffic (with its `mlops feedback` labels) as eval cases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, ModelOpt, SetOpt, emit, load_config

cases_app = typer.Typer(help="Eval cases from production traffic.", no_args_is_help=True)


@cases_app.command("export")
def export(
    to: Annotated[
        Path | None, typer.Option("--to", help="The JSONL file to add cases to (default monitor.export_cases.to).")
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="Traffic of the last 30m, 24h, 7d (default 7d).")] = None,
    labelled: Annotated[
        bool | None, typer.Option("--labelled/--all", help="Only requests with an `mlops feedback` label.")
    ] = None,
    failed: Annotated[
        bool | None,
        typer.Option("--failed/--any-answer", help="Only answers the suite's metric scores wrong (a judge first)."),
    ] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="With --failed: the metric that judges.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="With --failed: a score below it is wrong.")] = 0.5,
    suite: Annotated[str | None, typer.Option("--suite", help="Default: monitor.eval, else the first.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be added; write nothing.")] = False,
    config: ConfigOpt = Path("mlops.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
    model: ModelOpt = None,
) -> None:
    """Add captured requests as eval cases: the label as `expected`, a stable id (hash of the
    normalised input), the source release; duplicates of any suite's cases are left out.
    Unset options come from `monitor.export_cases` (what the nightly workflow runs).
    Exit 1 when capture is `metadata` (no text to export)."""
    from mlops.cli.monitor_cmds import _registry
    from mlops.config import narrow, resolve_model
    from mlops.errors import UsageError
    from mlops.monitor.cases import export_cases
    from mlops.monitor.traffic import parse_age

    loaded = load_config(config, set_)
    name = resolve_model(loaded, model)
    loaded = narrow(loaded, name)
    dflt = loaded.cfg.monitor.export_cases
    if to is None and dflt is None:
        raise UsageError("mlops cases export: name the file with --to (or set monitor.export_cases.to)")
    to = to if to is not None else loaded.root / dflt.to  # type: ignore[union-attr]
    age = parse_age(since) if since is not None else (dflt.since if dflt is not None else 7 * 86400.0)
    labelled = labelled if labelled is not None else bool(dflt and dflt.labelled)
    failed = failed if failed is not None else bool(dflt and dflt.failed)
    if not to.parent.is_dir():
        raise UsageError(f"--to {to}: {to.parent} is not a directory")
    reg = _registry(loaded)
    res = export_cases(
        loaded, reg, time.time() - age, to, labelled=labelled, failed=failed, suite=suite,
        metric=metric, threshold=threshold, model=name, dry_run=dry_run,
    )  # fmt: skip
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(res.skipped.items())) or "none"
    verb = "would add" if dry_run else "added"
    human = f"{verb} {len(res.new)} case(s) to {to} (suite {res.suite}, {res.kept} already there; skipped: {skipped})"
    emit(res.summary() | {"dry_run": dry_run}, json_, human)


def register(app: typer.Typer) -> None:
    app.add_typer(cases_app, name="cases")
