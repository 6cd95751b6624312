"""`mlops run`: the whole loop, train -> register -> serve -> eval -> gates -> canary -> promote | reject/rollback."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from mlops.contracts import RunResult
from mlops.errors import EXIT_GATE, EXIT_OK, InfraError
from mlops.flows.session import Session
from mlops.flows.stages import (
    _clear_candidate,
    _smoke,
    check_budget,
    evaluate,
    gate,
    hand_off,
    production_results,
    recover,
    roll_out,
    smoke_messages,
    train,
)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def run(s: Session, force: bool = False, on_step: Callable[[str], None] | None = None, wait: bool = True) -> RunResult:
    """The whole loop, holding the rollout lease (one pipeline writes the routing at a time).
    `on_step(name)` is called at each stage boundary (tests kill the process there). `wait=False`:
    the rollout is started and left to the rollout controller (status "rolling_out")."""
    from mlops.registry.lease import rollout_lease

    if s.loaded.cfg.tracking.mlflow is not None:
        from mlops.tracking_mlflow import reset

        reset()  # a server down during an earlier run in this process is tried again
    if not wait:  # before anything is trained: who advances the rollout once this run returned
        s.backend.require_controller()
    with rollout_lease(s.registry, s.loaded.cfg.deploy.rollout, s.say, publish=s.backend._publish):
        _sweep(s)  # what a killed run left: orphan artifacts, .tmp files, training outputs
        try:
            res = _run(s, force, on_step, wait)
        finally:
            _sweep(s)
    if s.loaded.cfg.tracking.mlflow is not None:  # MLflow down is reported, never the run's failure
        from mlops.tracking_mlflow import warnings

        res = res.model_copy(update={"warnings": [*res.warnings, *warnings()]})
        for w in res.warnings:
            s.say(f"warning: {w}")
    return res


@contextlib.contextmanager
def _controller(s: Session, url: str) -> Iterator[None]:
    """The rollout controller beside the server this run started (backend local): it idles while
    the run holds the lease, and stops with the server."""
    if s.loaded.cfg.backend != "local":
        yield
        return
    from mlops.rollout_controller import Controller

    ctl = Controller(s.backend, url, s.backend.client_key()).start()
    try:
        yield
    finally:
        ctl.stop()


def _sweep(s: Session) -> None:
    from mlops.errors import MlopsError
    from mlops.flows.session import cache_dir
    from mlops.registry.doctor import sweep

    try:
        gone = sweep(s.registry, cache_dir(s.loaded) / "build")
    except (MlopsError, OSError) as e:  # cleaning up never fails a run; `mlops doctor` reports it
        s.say(f"could not clean up orphans: {getattr(e, 'headline', e)}")
        return
    if gone:
        s.say(f"cleaned up {len(gone)} orphan(s) left by an interrupted run: {', '.join(gone[:3])}")


def _run(s: Session, force: bool = False, on_step: Callable[[str], None] | None = None, wait: bool = True) -> RunResult:
    from mlops.plan import make_plan
    from mlops.rollout import promote, wait_served
    from mlops.tracking import Tracker

    mark = on_step or (lambda name: None)
    cfg = s.loaded.cfg
    t: dict[str, float] = {}
    t_all = time.perf_counter()
    recover(s)
    state, _ = s.registry.read_state()
    mp = make_plan(s.loaded, s.registry, [cfg.deploy.model], force=force).models[0]
    if not mp.train and mp.existing is not None and mp.existing == state.stages.get("production"):
        stored = {suite: s.registry.get_eval(mp.existing, suite) for suite in cfg.evals}
        if all(stored.values()):
            msg = f"nothing changed since release {mp.existing} (same data, config and training code): it is production"
            s.say(msg)
            t["total"] = round(time.perf_counter() - t_all, 3)
            return RunResult(
                status="unchanged",
                exit_code=EXIT_OK,
                release=mp.existing,
                production=mp.existing,
                previous=state.stages.get("previous"),
                message=msg,
                evals={k: v.metrics for k, v in stored.items() if v},
                timings=t,
            )

    # before anything is spent: training (when it trains) and the evals of the release it will gate
    check_budget(s, [cfg.deploy.model] if mp.train else [], evaluate=True, release=None if mp.train else mp.existing)
    params = {"project": cfg.project, "model": cfg.deploy.model, "backend": cfg.backend}
    params |= {f"train.{k}": v for k, v in cfg.models[cfg.deploy.model].train.model_dump().items()}
    tracker = Tracker(s.loaded, "run", params)
    exit_code = 1
    release: str | None = None
    try:
        mark("train")
        progress = s.progress

        # about 20 points a loss curve (every 25 steps of the example's 500), the last step included
        steps = cfg.models[cfg.deploy.model].train.steps
        every = max(1, min(25, steps // 20))

        def logged(d: dict[str, float]) -> None:
            if progress:
                progress(d)
            if int(d["step"]) % every == 0 or int(d["step"]) == steps:
                tracker.log({"train/loss": d["loss"], "train/tokens_per_s": d["tokens_per_s"]}, step=int(d["step"]))

        s.progress = logged
        with _timed(t, "train"):
            tr = train(s, cfg.deploy.model, force=force, budget=False)
        s.progress = progress
        release = str(tr.release)
        mark("registered")
        s.backend.prepare(release)
        with s.backend.serve() as url, _controller(s, url):
            mark("served")
            with _timed(t, "eval"):
                results = evaluate(s, release, url)
                prod, prod_results = production_results(s, url)
            for suite, r in results.items():
                tracker.log({f"eval/{suite}/{m}": v for m, v in r.means().items()})
            mark("evaluated")
            if prod == release:
                msg = f"{release} is already production; re-evaluated it"
                exit_code = EXIT_OK
                return RunResult(
                    status="unchanged",
                    exit_code=EXIT_OK,
                    release=release,
                    production=prod,
                    trained=tr.trained,
                    message=msg,
                    evals={k: v.metrics for k, v in results.items()},
                    endpoint=url,
                    timings=t,
                )
            gates = gate(s, release, results, prod_results)
            summary = {k: v.metrics for k, v in results.items()}
            # what every outcome from here on reports alongside its status
            common = {"release": release, "trained": tr.trained, "evals": summary, "gates": gates, "endpoint": url}

            def smoke() -> str | None:
                """The release the endpoint answers from now (asked on the chat route for chat data)."""
                key, timeout = s.backend.client_key(), cfg.deploy.server.request_timeout
                return _smoke(url, cfg.deploy.model, key, timeout, smoke_messages(s))

            def kept_out(status: str, message: str, served: str | None, **more: Any) -> RunResult:
                """The candidate stays out of production: the gate's exit code, production unchanged."""
                return RunResult(
                    **common,
                    status=status,
                    exit_code=EXIT_GATE,
                    production=prod,
                    message=message,
                    served_by=served,
                    timings=t,
                    **more,
                )

            if not all(g.passed for g in gates):
                failed = [f"{g.name} {g.threshold}" for g in gates if not g.passed]
                msg = f"candidate {release} rejected: gate failed ({', '.join(failed)}); production stays {prod or 'empty'}"
                s.backend.set_state(lambda st: _clear_candidate(st, release), reason="gates failed")
                s.backend.record(release, "rejected", by="pipeline:gates", failed=failed)
                s.say(msg)
                exit_code = EXIT_GATE
                return kept_out("rejected", msg, smoke() if prod else None)
            if not wait and prod is not None:
                msg = hand_off(s, release, started_by="pipeline")
                exit_code = EXIT_OK
                return RunResult(
                    **common, status="rolling_out", exit_code=EXIT_OK, production=prod, message=msg, timings=t
                )
            with _timed(t, "canary"):
                verdicts, failure = roll_out(s, release, url, prod, on_step=lambda i: mark(f"canary-{i}"))
            if failure is not None:
                exit_code = EXIT_GATE
                return kept_out("rolled_back", failure, smoke(), canary=verdicts)
            mark("promote")
            new = promote(s.backend, release, reason="gates and canary passed" if prod else "first release")
            wait_served(url, new.version)  # on S3 the endpoint re-reads the state on a timer
            served = smoke()
            if served != release:
                raise InfraError(f"promoted {release} but the endpoint answered from {served}")
            msg = f"promoted {release} to production" + (f" (previous: {prod})" if prod else "")
            s.say(msg)
            exit_code = EXIT_OK
            t["total"] = round(time.perf_counter() - t_all, 3)
            tracker.summary({"release": release, "status": "promoted"})
            return RunResult(
                **common,
                status="promoted",
                exit_code=EXIT_OK,
                production=release,
                previous=new.stages.get("previous"),
                message=msg,
                canary=verdicts,
                served_by=served,
                timings=t,
                wandb_run=tracker.run_id,
                mlflow_run=tracker.mlflow_run_id,
            )
    finally:
        t.setdefault("total", round(time.perf_counter() - t_all, 3))
        if release is not None and tracker.mlflow is not None:
            _report_artifact(s, tracker, release)
        tracker.finish(exit_code)


def _report_artifact(s: Session, tracker: Any, release: str) -> None:
    """The release's eval report as an artifact of the MLflow run; a report that cannot be built
    is a warning, never the run's failure."""
    from mlops.report import build_report, to_markdown
    from mlops.tracking_mlflow import warn

    try:
        rep = build_report(s.registry, s.loaded.cfg, release, production=s.production_registry)
    except Exception as e:  # the run's own outcome stands; the mirror lacks one file
        warn(f"MLflow: no report artifact for {release}: {type(e).__name__}: {str(e)[:160]}")
        return
    tracker.artifact("report.md", to_markdown(rep).encode())
    tracker.artifact("report.json", rep.model_dump_json(indent=2).encode())
