"""The stages every flow is made of: recover, train, evaluate, gate, roll out.

Each is also reachable on its own (`mlops train`, `mlops eval`, ...) through a flow in this package.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from mlops.contracts import EvalResult, GateResult, StepVerdict, TrainOutcome
from mlops.errors import InfraError, UsageError
from mlops.flows.session import Session, cache_dir
from mlops.registry.releases import State

# ---------------------------------------------------------------------------- stages


def recover(s: Session) -> State | None:
    """A rollout that was killed mid-way leaves canary weights: put all traffic back on production.
    A rollout that still holds a live lease is someone else's, in progress: never torn down."""
    from mlops.registry.lease import live
    from mlops.rollout import abort_canary

    st, _ = s.registry.read_state()
    mine = s.registry.lease is not None and st.lease.get("token") == s.registry.lease.token
    if live(st.lease) and not mine:
        s.say(f"a rollout holding the lease is in progress ({st.lease.get('owner')}): leaving it alone")
        return None
    prod = st.stages.get("production")
    if st.stages.get("canary") or st.shadow or (st.routing and st.routing != {prod: 100}):
        s.say(f"recovering an interrupted rollout (state v{st.version}): all traffic back to {prod}")
        return abort_canary(s.backend, reason="recovered an interrupted rollout", actor="pipeline:recover")
    return None


def check_budget(s: Session, train: list[str], evaluate: bool, release: str | None = None) -> None:
    """Stop (OverBudget, exit 1) before anything is spent when what this run would spend (training
    the models in `train`, evaluating the deployed model when `evaluate`) takes a cap of `budget:`
    past its limit. Nothing to check when no cap is set."""
    cfg = s.loaded.cfg
    collect_serving(s)
    if not cfg.budget.active:
        return
    from mlops.budget import estimate
    from mlops.registry import costs

    models = [cfg.deploy.model] if evaluate else []
    est, basis = estimate(s.loaded, s.registry, train, models, release)
    costs.check(costs.document(s.loaded.cfg, s.registry.store, est, basis))


def collect_serving(s: Session) -> None:
    """Serving's cost records, from the serving containers' uptime in the Modal Dict (backend:
    modal; on `local` the server runs on this machine's CPU: nothing is counted). Idempotent:
    mlops/registry/serve_costs.py. A Dict that cannot be read is said, not raised: the records
    written so far still count, and the next run collects what this one missed."""
    if s.loaded.cfg.backend != "modal":
        return
    from mlops.errors import MlopsError
    from mlops.registry import serve_costs
    from mlops.serving.uptime import UPTIME

    try:
        entries = s.backend.api.dict_items(UPTIME)  # type: ignore[attr-defined]
        serve_costs.collect(s.loaded.cfg, s.registry.store, entries, s.registry.model_of)
    except (MlopsError, OSError) as e:
        s.say(f"could not collect serving's GPU time: {getattr(e, 'headline', e)}")


def record_spend(s: Session, kind: str, release: str, spend: dict[str, float]) -> None:
    """A cost record in the registry (what `budget:` counts). Bookkeeping never fails a run that
    already spent: a store that refuses is said, not raised."""
    from mlops.errors import MlopsError
    from mlops.registry import costs

    try:
        costs.record(s.registry.store, kind, s.registry.model_of(release), release, spend)
    except (MlopsError, OSError) as e:
        s.say(f"could not write the cost record of {release}: {getattr(e, 'headline', e)}")


def train(s: Session, model: str | None = None, force: bool = False, budget: bool = True) -> TrainOutcome:
    """Train `model` unless an identical release exists; register it as the candidate.
    `budget`: check the training's estimate against `budget:` first (`mlops run` checks the whole
    run's before it calls this)."""
    from mlops.plan import make_plan
    from mlops.training.train import job_from_config

    cfg = s.loaded.cfg
    name = model or cfg.deploy.model
    if name not in cfg.models:
        raise UsageError(f"unknown model {name!r} (valid: {', '.join(cfg.models)})")
    mp = make_plan(s.loaded, s.registry, [name], force=force).models[0]
    if not mp.train:
        s.say(f"train: skipped, {mp.reason}")
        return TrainOutcome(release=mp.existing, trained=False, reason=mp.reason, lineage=mp.lineage)
    if budget:
        check_budget(s, [name], evaluate=False)
    m = cfg.models[name]
    release = s.registry.new_id(name)
    out = cache_dir(s.loaded) / "build" / release
    gpu = m.resources.gpu if cfg.backend == "modal" else None
    job = job_from_config(s.loaded, name, out, gpu)
    from mlops.monitor.datachecks import before_training

    data_lineage = before_training(s.loaded, s.registry, name)  # refuses on a failed data check (exit 1)
    s.say(f"train: {name} on {cfg.backend} ({mp.reason}), {m.train.steps} steps")
    import shutil

    from mlops.registry.damage import working

    # the lock tells the next run's sweep that this output is in use (dropped even on kill -9)
    with working(out.parent / f".{release}.lock"):
        try:
            cpu0 = time.process_time()
            result = s.backend.train(job, s.progress)
            # this process's CPU time (every thread): what a CPU run is budgeted by, since wall time
            # on a shared machine measures the neighbours' load as much as the run
            cpu_s = round(time.process_time() - cpu0, 3) if result.device == "cpu" and cfg.backend == "local" else None
            manifest: dict[str, Any] = {
                "model": name,
                "backend": cfg.backend,
                "lineage": mp.lineage | data_lineage,
                "train": asdict(result) | {"out_dir": None} | ({"cpu_seconds": cpu_s} if cpu_s is not None else {}),
                "config": {k: v for k, v in m.model_dump(mode="json").items() if k != "resources"},
            }
            if result.adapter is not None:  # the artifact is a peft adapter on `base` (mlops/training/adapter.py)
                manifest["adapter"] = {"base": m.base} | result.adapter
            manifest = s.registry.publish(release, out, manifest)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    from mlops.registry.costs import train_spend

    record_spend(s, "train", release, train_spend(manifest["train"]))

    def mark(st: State) -> State:
        st.stages["candidate"] = release
        return st

    s.backend.set_state(mark, reason=f"trained {release}")
    if result.resumed_from_step:
        s.say(f"train: resumed from the checkpoint at step {result.resumed_from_step} of {result.steps}")
    s.say(
        f"registered {release} (artifact sha256 {manifest['artifact']['sha256'][:12]}…, loss {result.final_loss:.4f}, {result.seconds:.1f}s)"
    )
    return TrainOutcome(release=release, trained=True, reason=mp.reason, lineage=mp.lineage, train=asdict(result))


def evaluate(
    s: Session, release: str, base_url: str, suites: list[str] | None = None, store: bool = True
) -> dict[str, EvalResult]:
    from mlops.evals.harness import run_suite

    s.registry.require(release)
    key = s.backend.client_key()
    remote = s.backend.remote_scoring()  # Modal: heavy metrics fan out to functions/evaluate.py
    out: dict[str, EvalResult] = {}
    for suite in suites or list(s.loaded.cfg.evals):
        res = run_suite(s.loaded, suite, release, base_url, cache_dir(s.loaded), api_key=key, remote=remote)
        if store:
            s.registry.put_eval(release, suite, res)
            from mlops.registry.costs import eval_spend

            record_spend(s, "eval", release, eval_spend(s.loaded.cfg, res.cost))
        cost = res.cost
        means = ", ".join(f"{k} {v.mean:.4g}" for k, v in res.metrics.items())
        judged = f", {cost.judge_calls} judge calls ({cost.judge_cache_hits} cached)" if s.loaded.cfg.judges else ""
        s.say(
            f"eval {suite} on {release}: {means} ({res.n} cases, {cost.endpoint_calls} calls, {cost.cache_hits} cached{judged}, {cost.wall_s:.2f}s)"
        )
        out[suite] = res
    if store:
        s.backend.record(
            release,
            "evaluated",
            suites=list(out),
            summary={k: r.means() for k, r in out.items()},
            # every statistic a gate can chart, so the report's trend reads events, not result files
            stats={
                k: {m: v.model_dump(include={"mean", "p50", "p95", "p99"}) for m, v in r.metrics.items()}
                for k, r in out.items()
            },
        )
    return out


def production_results(s: Session, base_url: str | None) -> tuple[str | None, dict[str, EvalResult | None]]:
    """Production's stored results per suite, so a candidate is compared without calling production.

    Only a suite production was never evaluated on, or whose stored results lack a metric the
    suite now names, is evaluated now (through `base_url`, and stored with production)."""
    from mlops.config import metric_name

    reg = s.production_registry
    prod = reg.read_state()[0].stages.get("production")
    if prod is None:
        return None, dict.fromkeys(s.loaded.cfg.evals)
    results: dict[str, EvalResult | None] = {}
    missing = []
    for suite, ev in s.loaded.cfg.evals.items():
        results[suite] = stored = reg.get_eval(prod, suite)
        if stored is None or any(metric_name(m) not in stored.metrics for m in ev.metrics):
            missing.append(suite)
    # a baseline registry is read only, and `base_url` serves this registry's releases, not its
    if missing and base_url is not None and s.baseline is None:
        results |= evaluate(s, prod, base_url, missing)
    return prod, results


def gate(
    s: Session, release: str, results: dict[str, EvalResult], production: dict[str, EvalResult | None]
) -> list[GateResult]:
    from mlops.evals.gates import check_gates
    from mlops.report.noise import exclusions

    quarantine, flaky = exclusions(s.registry, s.loaded.cfg, results)
    verdicts = check_gates(s.loaded.cfg.gates, results, production, quarantine, flaky)
    passed = all(g.passed for g in verdicts)
    event = "gates_passed" if passed else "gates_failed"
    s.backend.record(release, event, by="pipeline:gates", gates=[g.model_dump() for g in verdicts])
    for g in verdicts:
        s.say(f"gate {'pass' if g.passed else 'FAIL'}: {g.name} {g.threshold}: {g.reason}")
    return verdicts


# ---------------------------------------------------------------------------- run


def roll_out(
    s: Session, release: str, url: str, prod: str | None, on_step: Callable[[int], None] | None = None
) -> tuple[list[StepVerdict], str | None]:
    """Canary steps with live analysis against production, driven by this job (`--wait`), its
    rollout record in the registry. Returns (verdicts, failure message or None); on a failing step
    the traffic is already back on production and the rollback is recorded."""
    from mlops.rollout import abort_canary, canary, wait_served
    from mlops.rollout_start import canary_prompts, start

    cfg = s.loaded.cfg
    if prod is None:
        s.say("no production release yet: promoting without a canary (nothing to compare with)")
        return [], None
    model_cfg = cfg.models[cfg.deploy.model]
    rec = start(s.backend, release, "pipeline", started_by="pipeline")
    s.say(f"rollout {rec['id']}: {release} against {prod}, steps {rec['steps']} (this job drives it)")
    steps = canary(
        s.backend,
        release,
        url,
        canary_prompts(s.loaded),
        cfg.deploy.rollout,
        cfg.deploy.model,
        model_cfg.max_tokens,
        s.say,
        on_step=on_step,
    )

    def verdicts(st: State) -> State | None:
        if st.rollout.get("id") != rec["id"]:
            return None
        st.rollout["verdicts"] = [v.to_json() for v in steps]
        return st

    s.backend.set_state(verdicts, reason=f"rollout {rec['id']}: canary judged")
    if all(v.passed for v in steps):
        return steps, None
    why = "; ".join(steps[-1].reasons)
    back = abort_canary(s.backend, reason=f"canary failed: {why}", actor="pipeline:analysis")
    wait_served(url, back.version)  # so the smoke check that follows sees production answer
    s.backend.record(release, "rolled_back", by="pipeline:analysis", reasons=steps[-1].reasons)
    msg = f"candidate {release} rolled back at {steps[-1].percent}%: {why}"
    s.say(msg)
    return steps, msg


def hand_off(s: Session, release: str, started_by: str) -> str:
    """Start the rollout and return at once (`--no-wait`): the rollout controller (`mlops serve`'s
    thread, Modal's scheduled function) advances it. The message says where it stands."""
    from mlops.rollout_start import start

    s.backend.require_controller()  # no record that nothing would advance
    rec = start(s.backend, release, "controller", started_by=started_by)
    msg = (
        f"rollout {rec['id']} of {release} started: "
        + (f"shadow {rec['shadow']:.0%} then " if rec.get("phase") == "shadow" else "")
        + f"steps {rec['steps']}, the rollout controller advances it "
        "(`mlops status` shows where it stands)"
    )
    s.say(msg)
    return msg


def _clear_candidate(st: State, release: str) -> State | None:
    if st.stages.get("candidate") != release:
        return None
    st.stages["candidate"] = None
    return st


def smoke_messages(s: Session) -> list[dict[str, Any]] | None:
    """A chat dataset's smoke request: the first case of the first eval suite, as turns (None when
    that suite is not chat: the smoke request is then a plain completion)."""
    from mlops.evals.harness import load_cases

    cfg = s.loaded.cfg
    cases = load_cases(s.loaded, next(iter(cfg.evals))) if cfg.evals else []
    return [dict(m) for m in cases[0].messages] if cases and cases[0].messages else None


def _smoke(
    url: str, model: str, key: str | None = None, timeout: float = 30.0, messages: list[dict[str, Any]] | None = None
) -> str | None:
    """One request through the production route (no pin): which release answered? `timeout`:
    deploy.server.request_timeout, what a warm server takes at most to answer (or refuse).
    `messages`: a chat case's turns, sent to the chat route (what the deployed model is used for)."""
    import httpx

    from mlops.configmonitor import NOT_CAPTURED

    headers = {**NOT_CAPTURED, **({"authorization": f"Bearer {key}"} if key else {})}
    path, ask = ("/v1/chat/completions", {"messages": messages}) if messages else ("/v1/completions", {"prompt": "a"})
    try:
        r = httpx.post(
            f"{url}{path}",
            json={"model": model, "max_tokens": 1, **ask},
            timeout=timeout,
            headers=headers,
            trust_env=False,
        )
    except httpx.HTTPError as e:
        raise InfraError(f"endpoint {url} did not answer: {e}") from e
    return r.headers.get("x-mlops-release")
