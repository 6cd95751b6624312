"""`mlops experiment start|status|stop`: an A/B test between production and a release on live users."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, ModelOpt, SetOpt, emit, load_config, say_fn

experiment_app = typer.Typer(
    help="A/B experiments: sticky users per arm, live metrics, an always-valid sequential test.",
    no_args_is_help=True,
)


def _session(config: Path, set_: list[str] | None, json_: bool, model: str | None) -> Any:
    from mlops.flows.session import Session

    return Session.open(load_config(config, set_), say=say_fn(json_), model=model)


def _actor() -> str:
    """Who decided: the GitHub user who dispatched a workflow, else the local user."""
    login = os.environ.get("GITHUB_TRIGGERING_ACTOR") or os.environ.get("GITHUB_ACTOR")
    if os.environ.get("GITHUB_ACTIONS") == "true" and login:
        return f"github:{login}"
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user"


@experiment_app.command("start")
def start(
    release: Annotated[str, typer.Argument(help="The treatment (arm B): a release id or a stage name.")],
    metric: Annotated[
        str,
        typer.Option(
            "--metric", help="error_rate | latency | thumbs (mlops feedback up/down) | json_valid | regex | length."
        ),
    ],
    share: Annotated[int, typer.Option("--share", help="Percent of users routed to the release (1-99).")] = 50,
    alpha: Annotated[float, typer.Option("--alpha", help="False-positive rate of the sequential test.")] = 0.05,
    mde: Annotated[
        float | None,
        typer.Option("--mde", help="Planned absolute effect, the mixture's tau (default 0.05 for a binary metric)."),
    ] = None,
    min_samples: Annotated[int, typer.Option("--min-samples", help="Per arm, before the first look.")] = 100,
    max_samples: Annotated[
        int, typer.Option("--max-samples", help="Per arm: no verdict by then is 'no difference'.")
    ] = 10_000,
    unit: Annotated[
        str,
        typer.Option(
            "--unit", help="One observation per user (their first request or thumb), or per request: user | request."
        ),
    ] = "user",
    auto_stop: Annotated[
        bool,
        typer.Option(
            "--auto-stop",
            help="The rollout controller (mlops serve; Modal's schedule) stops it at the test's verdict "
            "or at --max-duration.",
        ),
    ] = False,
    promote_winner: Annotated[
        bool, typer.Option("--promote-winner", help="With --auto-stop: a winning RELEASE becomes production.")
    ] = False,
    max_duration: Annotated[
        str | None,
        typer.Option("--max-duration", help="With --auto-stop: end it 'inconclusive' after this long (30m, 7d)."),
    ] = None,
    config: ConfigOpt = Path("mlops.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
    model: ModelOpt = None,
) -> None:
    """Send --share % of users (sticky by x-mlops-user) to RELEASE; production keeps the rest."""
    from mlops.flows.experiment import start as do_start
    from mlops.monitor.traffic import parse_age

    if not 0 < alpha < 1 or (mde is not None and mde <= 0) or not 1 <= min_samples <= max_samples:
        raise typer.BadParameter("need 0 < --alpha < 1, --mde > 0 and 1 <= --min-samples <= --max-samples")
    s = _session(config, set_, json_, model)
    rec = do_start(
        s,
        release,
        share,
        metric,
        _actor(),
        alpha=alpha,
        mde=mde,
        min_samples=min_samples,
        max_samples=max_samples,
        unit=unit,
        auto_stop=auto_stop,
        promote_winner=promote_winner,
        max_duration=None if max_duration is None else parse_age(max_duration, "--max-duration"),
    )
    auto = ""
    if auto_stop:
        limit = f", or after {max_duration} without one" if max_duration else ""
        then = "promotes a winning B" if promote_winner else "ends it"
        auto = f"\nauto-stop: the rollout controller {then} at the test's verdict{limit}"
    emit(
        rec,
        json_,
        f"experiment {rec['id']}: {share}% of users to {rec['release']} (B), {100 - share}% to "
        f"{rec['baseline']} (A, production); metric {metric}, mSPRT alpha {rec['alpha']:g}{auto}",
    )


@experiment_app.command("status")
def status(
    config: ConfigOpt = Path("mlops.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
    model: ModelOpt = None,
) -> None:
    """Each arm's traffic and metric, the effect with its always-valid interval, and the decision
    (no experiment running: the last one's final report)."""
    from mlops.flows.experiment import describe
    from mlops.flows.experiment import status as do_status

    s = _session(config, set_, json_, model)
    report = do_status(s)
    ended = report["status"] != "running"
    why = f" ({report['reason']})" if report.get("reason") else ""
    tail = f"\n{report['status']} at {report.get('stopped_at')} by {report.get('stopped_by')}{why}" if ended else ""
    emit(report, json_, describe(report) + tail)


@experiment_app.command("stop")
def stop(
    promote_winner: Annotated[
        bool, typer.Option("--promote-winner", help="Make the treatment production if it won (exit 3 if it did not).")
    ] = False,
    config: ConfigOpt = Path("mlops.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
    model: ModelOpt = None,
) -> None:
    """End the experiment: all users back to production (or to the winner), the report stored."""
    from mlops.flows.experiment import describe, not_promoted
    from mlops.flows.experiment import stop as do_stop

    s = _session(config, set_, json_, model)
    report = do_stop(s, _actor(), promote_winner)
    tail = f"\nstopped: {report['status']}; production is {report['production']}"
    emit(report, json_, describe(report) + tail)
    failed = not_promoted(report)
    if failed is not None:
        raise failed


def register(app: typer.Typer) -> None:
    app.add_typer(experiment_app, name="experiment")
