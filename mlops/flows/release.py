"""The flows on one release: `mlops eval`, `mlops deploy`, `mlops rollback` (one function each)."""

from __future__ import annotations

import contextlib

from mlops.contracts import DeployOutcome, EvalOutcome, RollbackOutcome
from mlops.errors import UsageError
from mlops.flows.session import STAGE_REFS, Session, resolve_release
from mlops.flows.stages import check_budget, evaluate, gate, hand_off, production_results, recover, roll_out


def eval_release(
    s: Session, ref: str, suites: list[str] | None = None, url: str | None = None, gates: bool = True
) -> EvalOutcome:
    """Evaluate a release through the endpoint (ours, or `url`), store the results, check gates."""
    adopt_from_baseline(s, ref)
    rid = resolve_release(s, ref)
    for name in suites or []:
        if name not in s.loaded.cfg.evals:
            raise UsageError(f"unknown suite {name!r} (valid: {', '.join(s.loaded.cfg.evals)})")
    check_budget(s, [], evaluate=True, release=rid)  # before the endpoint or a judge is asked
    if not url:
        s.backend.prepare(rid)
    cm = contextlib.nullcontext(url) if url else s.backend.serve()
    with cm as base:
        results = evaluate(s, rid, base, suites)
        prod, prod_results = production_results(s, base)
    # production re-evaluated (the nightly job) still answers to the absolute gates; the
    # no-regression gates have nothing to compare it with
    compare = prod_results if prod != rid else dict.fromkeys(results)
    verdicts = gate(s, rid, results, compare) if gates else []
    return EvalOutcome(
        release=rid,
        production=prod,
        passed=all(g.passed for g in verdicts),
        metrics={k: v.metrics for k, v in results.items()},
        gates=verdicts,
        cost={k: v.cost for k, v in results.items()},
    )


def adopt_from_baseline(s: Session, ref: str) -> None:
    """A release only the baseline registry holds (a pull request's own registry evaluating
    production under the PR's new eval suites or gates) is copied into this registry first: it is
    evaluated, stored and reported here, and production's registry is only read."""
    if s.baseline is None or ref in STAGE_REFS or s.registry.manifest(ref) is not None:
        return
    manifest = s.baseline.manifest(ref)
    if manifest is None:
        return  # unknown in both: resolve_release names the release
    s.say(f"{ref}: copied from {s.baseline.store.uri} (read only) to evaluate it here")
    s.registry.publish(ref, s.baseline.artifact_dir(ref), {k: v for k, v in manifest.items() if k != "artifact"})


def deploy_release(s: Session, ref: str, wait: bool = True) -> DeployOutcome:
    """Gates on the release's stored evals, canary steps with live analysis, promote or roll back;
    holding the rollout lease (one pipeline writes the routing at a time). `wait=False`: the
    rollout is started and left to the rollout controller (status "rolling_out")."""
    from mlops.registry.lease import rollout_lease

    check_budget(s, [], evaluate=False)  # a month past its serving cap deploys nothing new
    if not wait:
        s.backend.require_controller()  # who advances the rollout once this command returned
    # preflight before the lease: taking it publishes, and on Modal a publish stops the apps of
    # releases no process marks in use, so the app `mlops eval` left up would be deployed again
    ready = resolve_release(s, ref)
    s.backend.preflight(ready)
    with rollout_lease(s.registry, s.loaded.cfg.deploy.rollout, s.say, publish=s.backend._publish):
        return _deploy(s, ref, wait, ready)


def _deploy(s: Session, ref: str, wait: bool = True, ready: str | None = None) -> DeployOutcome:
    from mlops.rollout import promote

    cfg = s.loaded.cfg
    recover(s)
    rid = resolve_release(s, ref)
    if rid != ready:  # `candidate` moved while this process waited for the lease
        s.backend.preflight(rid)
    results = {suite: s.registry.get_eval(rid, suite) for suite in cfg.evals}
    missing = [k for k, v in results.items() if v is None]
    if missing:
        raise UsageError(f"{rid} has no eval results for {', '.join(missing)}: run `mlops eval --release {rid}` first")
    with s.backend.serve() as url:
        prod, prod_results = production_results(s, url)
        if prod == rid:
            return DeployOutcome(release=rid, status="already production", message=f"{rid} is already production")
        verdicts = gate(s, rid, {k: v for k, v in results.items() if v}, prod_results)
        if not all(g.passed for g in verdicts):
            return DeployOutcome(release=rid, status="rejected", gates=verdicts, message=f"{rid}: gates FAIL")
        if not wait and prod is not None:
            return DeployOutcome(release=rid, status="rolling_out", message=hand_off(s, rid, "cli:deploy"))
        steps, failure = roll_out(s, rid, url, prod)
        if failure is not None:
            return DeployOutcome(release=rid, status="rolled_back", canary=steps, message=failure)
        promote(s.backend, rid, reason="deploy: gates and canary passed", actor="cli:deploy")
    return DeployOutcome(release=rid, status="promoted", previous=prod, canary=steps, message=f"promoted {rid}")


def rollback_release(s: Session, to: str | None, reason: str, actor: str) -> RollbackOutcome:
    """Route all traffic to `to` (default: the previous production) after checking its artifact."""
    from mlops.rollout import rollback

    if to is not None:
        to = resolve_release(s, to)  # a stage name, or a release of this model
    before = s.registry.read_state()[0].stages.get("production")
    state, target = rollback(s.backend, to, reason, actor)
    return RollbackOutcome(
        production=target,
        previous=state.stages.get("previous"),
        rolled_back_from=before,
        state_version=state.version,
    )
