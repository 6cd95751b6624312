"""Pipeline commands: plan, train, eval, deploy, run, serve, report."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, ModelOpt, SetOpt, emit, err, load_config, say_fn
from mlops.errors import UsageError
from mlops.redact import redact_obj

WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Follow the canary to its end (default), or start it and return: the rollout controller "
        "(`mlops serve`, Modal's schedule) advances it; `mlops status` shows where it stands.",
    ),
]
ReleaseOpt = Annotated[str, typer.Option("--release", "-r", help="candidate | production | previous | a release id.")]


@contextlib.contextmanager
def _progress(json_mode: bool, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr: step, loss, tokens/s."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if json_mode or not err.is_terminal:
        last = [0]

        def plain(d: dict[str, float]) -> None:
            step = int(d["step"])
            if step == total or step - last[0] >= max(1, total // 10):
                last[0] = step
                err.print(
                    f"  step {step}/{total}  loss {d['loss']:.4f}  {d['tokens_per_s']:,.0f} tok/s",
                    markup=False,
                    highlight=False,
                )

        yield plain
        return
    cols = [
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*cols, console=err, transient=False) as p:
        task = p.add_task("train", total=total, loss=float("nan"), tps=0.0)

        def update(d: dict[str, float]) -> None:
            p.update(task, completed=int(d["step"]), loss=d["loss"], tps=d["tokens_per_s"])

        yield update


def _session(config: Path, set_: list[str] | None, json_: bool, progress: Any = None, model: str | None = None) -> Any:
    from mlops.flows.session import Session

    return Session.open(load_config(config, set_), say=say_fn(json_), progress=progress, model=model)


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(config: ConfigOpt = Path("mlops.yaml"), set_: SetOpt = None, json_: JsonOpt = False) -> None:
        """What a push would do: which models changed (data, config or training code hashes), what it
        would spend against `budget:` and this month's records, and what each no-regression gate can
        resolve on production's stored cases (flaky cases, a stale baseline)."""
        from mlops.plan import make_plan
        from mlops.report.noise import before_run, plan_lines

        loaded = load_config(config, set_)
        s = _session(config, set_, json_, model=loaded.cfg.deploy.names[0])
        p = make_plan(loaded, s.registry, list(loaded.cfg.models))
        lines = [f"{m.model}: {'train' if m.train else 'skip'} ({m.reason})" for m in p.models]
        from mlops.budget import estimate
        from mlops.flows.stages import collect_serving
        from mlops.registry import costs

        collect_serving(s)  # serving's spend so far, before it is shown against the caps
        # a push trains and evaluates each deployed model whose fingerprint changed
        pushed = [m.model for m in p.models if m.train and m.model in loaded.cfg.deploy.names]
        est, basis = estimate(loaded, s.registry, pushed, pushed)
        budget = costs.document(loaded.cfg, s.registry.store, est, basis)
        lines += costs.lines(budget)
        noise = {name: before_run(s.registry.scoped(name), loaded.cfg) for name in loaded.cfg.deploy.names}
        for name, section in noise.items():
            lines += [(f"{name}: " if len(noise) > 1 else "") + line for line in plan_lines(section)]
        doc = p.model_dump(mode="json") | {
            "budget": budget.model_dump(mode="json"),
            "noise": {k: v.model_dump(mode="json") for k, v in noise.items()},
        }
        if json_:
            emit(doc, True)
        else:  # not rich: a warning wrapped at 80 columns would be split across lines in a CI log
            sys.stdout.write("\n".join(lines) + "\n")

    @app.command()
    def train(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        model: Annotated[str | None, typer.Option(help="Model to train (default: the deployed model).")] = None,
        force: Annotated[bool, typer.Option("--force", help="Train even if nothing changed.")] = False,
    ) -> None:
        """Train a model and register it as the candidate release (skipped when nothing changed)."""
        from mlops.flows.stages import train as do_train

        loaded = load_config(config, set_)
        deployed = loaded.cfg.deploy.names
        name = model or (deployed[0] if len(deployed) == 1 else None)
        if name is None:
            from mlops.config import resolve_model

            resolve_model(loaded, None)  # several deployed: say which to pick
        assert name is not None
        with _progress(json_, loaded.cfg.models[name].train.steps if name in loaded.cfg.models else 0) as prog:
            from mlops.flows.session import Session

            # a model that is not deployed trains in the first deployed model's session (its registry)
            s = Session.open(loaded, say=say_fn(json_), progress=prog, model=name if name in deployed else deployed[0])
            res = do_train(s, name, force=force)
        emit(
            res.model_dump(mode="json", exclude_unset=True),
            json_,
            f"{res.release} ({'trained' if res.trained else 'unchanged'})",
        )

    @app.command("eval")
    def eval_(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        release: ReleaseOpt = "candidate",
        suite: Annotated[list[str] | None, typer.Option(help="Suites to run (default: all).")] = None,
        url: Annotated[str | None, typer.Option(help="Evaluate through this endpoint instead of starting one.")] = None,
        gates: Annotated[
            bool, typer.Option("--gates/--no-gates", help="Check gates against production; exit 3 on failure.")
        ] = True,
        model: ModelOpt = None,
    ) -> None:
        """Evaluate a release through the endpoint, store results with it, and check gates."""
        from mlops.flows.release import eval_release

        res = eval_release(_session(config, set_, json_, model=model), release, suite, url, gates)
        emit(res.model_dump(mode="json"), json_, f"{res.release}: {'gates pass' if res.passed else 'gates FAIL'}")
        if res.exit_code:
            raise typer.Exit(res.exit_code)

    @app.command()
    def run(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        force: Annotated[bool, typer.Option("--force", help="Retrain even if nothing changed.")] = False,
        model: Annotated[
            str | None, typer.Option("--model", "-m", help="Only this deployed model (default: every one).")
        ] = None,
        force_model: Annotated[
            list[str] | None,
            typer.Option(
                "--force-model",
                help="Retrain this deployed model even if nothing changed (repeatable; the nightly's drift "
                "retrain); the others train only when changed.",
            ),
        ] = None,
        wait: WaitOpt = True,
    ) -> None:
        """The whole loop: plan, train, register, serve, eval, gates, canary, promote or reject (exit 3).
        With several deployed models, each runs in turn (only a changed one is trained and rolled out);
        the exit code is the worst of theirs."""
        from mlops.config import resolve_model
        from mlops.flows.run import run as do_run
        from mlops.flows.session import Session
        from mlops.rollout import kill_hook_from_env

        loaded = load_config(config, set_)
        names = [resolve_model(loaded, model)] if model is not None else loaded.cfg.deploy.names
        forced = {resolve_model(loaded, m) for m in force_model or []}
        if forced - set(names):
            raise UsageError(f"--force-model {', '.join(sorted(forced - set(names)))}: this run runs only {model}")
        results = {}
        for name in names:
            with _progress(json_, loaded.cfg.models[name].train.steps) as prog:
                s = Session.open(loaded, say=say_fn(json_), progress=prog, model=name)
                results[name] = do_run(s, force=force or name in forced, on_step=kill_hook_from_env(), wait=wait)
        lines = []
        for name, res in results.items():
            human = (f"{name}: " if len(results) > 1 else "") + f"{res.status}: {res.message}"
            if res.served_by:
                human += f"\nendpoint answered from {res.served_by} (x-mlops-release)"
            if "total" in res.timings:
                human += f"\nwall time {res.timings['total']:.2f}s"
            lines.append(human)
        codes = [r.exit_code for r in results.values()]
        worst = max(codes, key=lambda c: (c != 0, c == 4, c))  # infrastructure (4) over a gate (3)
        if len(results) == 1:
            emit(next(iter(results.values())).model_dump(mode="json"), json_, lines[0])
        else:
            doc = {"exit_code": worst, "models": {n: r.model_dump(mode="json") for n, r in results.items()}}
            emit(doc, json_, "\n".join(lines))
        if worst:
            raise typer.Exit(worst)

    @app.command()
    def deploy(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        release: ReleaseOpt = "candidate",
        model: ModelOpt = None,
        wait: WaitOpt = True,
    ) -> None:
        """Roll a release out: gates on its stored evals, canary steps with live analysis, promote or roll back."""
        from mlops.flows.release import deploy_release

        res = deploy_release(_session(config, set_, json_, model=model), release, wait=wait)
        emit(res.model_dump(mode="json", exclude_unset=True, exclude={"message"}), json_, res.message)
        if res.exit_code:
            raise typer.Exit(res.exit_code)

    @app.command()
    def serve(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        host: Annotated[str | None, typer.Option(help="Bind address (default: deploy.server.host, 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option(help="Port (default: deploy.server.port, 8000).")] = None,
    ) -> None:
        """Serve what the registry routes to, in the foreground; follows rollbacks without a restart."""
        from mlops.serving.runner import check_bind, serve_foreground
        from mlops.util import api_key_from_env

        loaded = load_config(config, set_)
        names = loaded.cfg.deploy.names
        s = _session(config, set_, False, model=names[0])
        srv = s.loaded.cfg.deploy.server
        if s.loaded.cfg.backend != "local":
            ep = s.backend.endpoint()
            err.print(
                f"backend {s.loaded.cfg.backend} serves at {ep}; `mlops serve` runs the local server", markup=False
            )
        h, p = host or srv.host, srv.port if port is None else port
        check_bind(h, api_key_from_env(srv.api_key_env))  # before saying we serve
        err.print(f"serving {', '.join(names)} on http://{h}:{p} (Ctrl-C to stop)", markup=False)
        from mlops.rollout_process import Supervisor, child_argv

        # the rollout controller: advances each model's rollout record (`mlops run --no-wait`),
        # judging the live traffic this server answers; a child process, so that its judging never
        # holds this server's GIL (mlops/rollout_process.py), restarted if it dies, stopped with us
        local = "127.0.0.1" if h in ("0.0.0.0", "::", "") else h
        controller = Supervisor(child_argv(f"http://{local}:{p}", config, set_)).start()
        try:
            # several models: one app each behind a router by the request's `model` (mlops/serving/multi.py)
            serve_foreground(s.loaded if len(names) == 1 else loaded, s.registry, h, p)
        finally:
            controller.stop()

    @app.command()
    def report(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        release: ReleaseOpt = "candidate",
        markdown: Annotated[bool, typer.Option("--markdown", help="Print markdown (the PR comment).")] = False,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the report to a file.")] = None,
        model: ModelOpt = None,
    ) -> None:
        """Candidate vs production, metric by metric, from stored results (no model is called).

        Markdown (the PR comment, verdict first, under 65,000 characters) on stdout or --out;
        --json prints the same numbers for machines. Appended to $GITHUB_STEP_SUMMARY when set."""
        import json
        import sys

        from mlops.flows.session import Session, resolve_release
        from mlops.report import build_report, to_markdown, write_step_summary

        loaded = load_config(config, set_)
        names = loaded.cfg.deploy.names if model is None else [model]
        parts: dict[str, tuple[str, dict[str, Any]]] = {}
        for name in names:  # several deployed models and none named: a section per model
            s = Session.open(loaded, say=say_fn(json_), model=name)
            rid = resolve_release(s, release)
            rep = build_report(s.registry, s.loaded.cfg, rid, production=s.production_registry)
            # the JSON the workflows read: keys and order as declared in report.model
            parts[name] = (to_markdown(rep), rep.model_dump())
        if len(parts) == 1:
            md, doc = next(iter(parts.values()))
        else:
            md = "\n\n".join(f"## Model `{name}`\n\n{part}" for name, (part, _) in parts.items())
            doc = {"models": {name: d for name, (_, d) in parts.items()}}
        write_step_summary(md)
        if out is not None:  # the same masking as `--json` on stdout (emit)
            out.write_text(json.dumps(redact_obj(doc), indent=2, default=str) + "\n" if json_ else md, encoding="utf-8")
            err.print(f"wrote {out}", markup=False)
        if json_:
            emit(doc, True)
        elif markdown or out is None:
            sys.stdout.write(md)  # not rich: it would wrap long lines and break tables and charts
