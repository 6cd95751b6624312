"""train -> register -> serve -> eval -> gates -> canary -> promote | reject/rollback.

Each stage is also its own CLI command; `run()` chains them. Functions here return plain data
(dicts) so the CLI can print a table or `--json` and workflows can branch on exit codes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlops.backends import backend_class
from mlops.backends.base import Backend
from mlops.config import Loaded
from mlops.errors import EXIT_GATE, EXIT_OK, InfraError, UsageError
from mlops.registry.releases import Registry, State
from mlops.registry.store import open_store

Say = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


@dataclass
class Session:
    """Everything one command needs: the config, the registry, the backend, and where to talk."""

    loaded: Loaded
    registry: Registry
    backend: Backend
    say: Say = _quiet
    progress: Callable[[dict[str, float]], None] | None = None
    # production's registry when it is not `registry` (a pull request's own storage): read only
    baseline: Registry | None = None

    @property
    def production_registry(self) -> Registry:
        return self.baseline or self.registry

    @classmethod
    def open(
        cls, loaded: Loaded, say: Say = _quiet, progress: Callable[[dict[str, float]], None] | None = None
    ) -> Session:
        store = open_store(loaded.cfg.storage, base_dir=loaded.root)
        registry = Registry(store, cache_dir=cache_dir(loaded))
        backend = backend_class(loaded.cfg.backend)(loaded, registry)
        baseline = None
        if loaded.cfg.baseline_storage:
            base_store = open_store(loaded.cfg.baseline_storage, base_dir=loaded.root)
            baseline = Registry(base_store, cache_dir=cache_dir(loaded) / "baseline")
        return cls(loaded, registry, backend, say, progress, baseline)


def cache_dir(loaded: Loaded) -> Path:
    return loaded.root / ".mlops" / "cache"


# ---------------------------------------------------------------------------- stages


def recover(s: Session) -> State | None:
    """A rollout that was killed mid-way leaves canary weights: put all traffic back on production."""
    from mlops.rollout import abort_canary

    st, _ = s.registry.read_state()
    prod = st.stages.get("production")
    if st.stages.get("canary") or st.shadow or (st.routing and st.routing != {prod: 100}):
        s.say(f"recovering an interrupted rollout (state v{st.version}): all traffic back to {prod}")
        return abort_canary(s.backend, reason="recovered an interrupted rollout", actor="pipeline:recover")
    return None


def train(s: Session, model: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train `model` unless an identical release exists; register it as the candidate."""
    from mlops.plan import make_plan
    from mlops.training.train import TrainJob

    cfg = s.loaded.cfg
    name = model or cfg.deploy.model
    if name not in cfg.models:
        raise UsageError(f"unknown model {name!r} (valid: {', '.join(cfg.models)})")
    mp = make_plan(s.loaded, s.registry, [name], force=force).models[0]
    if not mp.train:
        s.say(f"train: skipped, {mp.reason}")
        return {"release": mp.existing, "trained": False, "reason": mp.reason, "lineage": mp.lineage}
    m = cfg.models[name]
    ds = cfg.datasets[m.dataset]
    release = s.registry.new_id(name)
    out = cache_dir(s.loaded) / "build" / release
    job = TrainJob(
        model_name=name,
        dataset_path=str(s.loaded.dataset_path(m.dataset)),
        out_dir=str(out),
        base=m.base,
        method=m.method,
        prompt=m.prompt,
        steps=m.train.steps,
        batch_size=m.train.batch_size,
        lr=m.train.lr,
        seed=m.train.seed,
        warmup_steps=min(m.train.warmup_steps, m.train.steps),
        weight_decay=m.train.weight_decay,
        threads=m.train.threads,
        arch=m.arch.model_dump(),
        lora=m.lora.model_dump(),
        input_field=ds.input_field,
        target_field=ds.target_field,
    )
    s.say(f"train: {name} on {cfg.backend} ({mp.reason}), {m.train.steps} steps")
    result = s.backend.train(job, s.progress)
    manifest: dict[str, Any] = {
        "model": name,
        "backend": cfg.backend,
        "lineage": mp.lineage,
        "train": asdict(result) | {"out_dir": None},
        "config": {k: v for k, v in m.model_dump(mode="json").items() if k != "resources"},
    }
    manifest = s.registry.publish(release, out, manifest)
    import shutil

    shutil.rmtree(out, ignore_errors=True)

    def mark(st: State) -> State:
        st.stages["candidate"] = release
        return st

    s.backend.set_state(mark, reason=f"trained {release}")
    s.say(
        f"registered {release} (artifact sha256 {manifest['artifact']['sha256'][:12]}…, loss {result.final_loss:.4f}, {result.seconds:.1f}s)"
    )
    return {"release": release, "trained": True, "reason": mp.reason, "lineage": mp.lineage, "train": asdict(result)}


def evaluate(
    s: Session, release: str, base_url: str, suites: list[str] | None = None, store: bool = True
) -> dict[str, dict[str, Any]]:
    from mlops.evals.harness import run_suite
    from mlops.util import api_key_from_env

    s.registry.require(release)
    key = api_key_from_env(s.loaded.cfg.deploy.server.api_key_env)
    out = {}
    for suite in suites or list(s.loaded.cfg.evals):
        res = run_suite(s.loaded, suite, release, base_url, cache_dir(s.loaded), api_key=key)
        if store:
            s.registry.put_eval(release, suite, res)
        cost = res["cost"]
        means = ", ".join(f"{k} {v['mean']:.4g}" for k, v in res["metrics"].items())
        judged = (
            f", {cost['judge_calls']} judge calls ({cost['judge_cache_hits']} cached)" if s.loaded.cfg.judges else ""
        )
        s.say(
            f"eval {suite} on {release}: {means} ({res['n']} cases, {cost['endpoint_calls']} calls, {cost['cache_hits']} cached{judged}, {cost['wall_s']:.2f}s)"
        )
        out[suite] = res
    if store:
        s.registry.append_event(
            release,
            "evaluated",
            suites=list(out),
            summary={k: {m: v["mean"] for m, v in r["metrics"].items()} for k, r in out.items()},
            # every statistic a gate can chart, so the report's trend reads events, not result files
            stats={
                k: {m: {st: v[st] for st in ("mean", "p50", "p95", "p99")} for m, v in r["metrics"].items()}
                for k, r in out.items()
            },
        )
    return out


def production_results(s: Session, base_url: str | None) -> tuple[str | None, dict[str, dict[str, Any] | None]]:
    """Production's stored results per suite, so a candidate is compared without calling production.

    Only a suite production was never evaluated on, or whose stored results lack a metric the
    suite now names, is evaluated now (through `base_url`, and stored with production)."""
    from mlops.config import metric_name

    reg = s.production_registry
    prod = reg.read_state()[0].stages.get("production")
    if prod is None:
        return None, dict.fromkeys(s.loaded.cfg.evals)
    results: dict[str, dict[str, Any] | None] = {}
    missing = []
    for suite, ev in s.loaded.cfg.evals.items():
        results[suite] = stored = reg.get_eval(prod, suite)
        if stored is None or any(metric_name(m) not in stored.get("metrics", {}) for m in ev.metrics):
            missing.append(suite)
    # a baseline registry is read only, and `base_url` serves this registry's releases, not its
    if missing and base_url is not None and s.baseline is None:
        results |= evaluate(s, prod, base_url, missing)
    return prod, results


def gate(
    s: Session, release: str, results: dict[str, dict[str, Any]], production: dict[str, dict[str, Any] | None]
) -> list[dict[str, Any]]:
    from mlops.evals.gates import check_gates

    verdicts = [g.to_json() for g in check_gates(s.loaded.cfg.gates, results, production)]
    passed = all(g["passed"] for g in verdicts)
    s.registry.append_event(release, "gates_passed" if passed else "gates_failed", by="pipeline:gates", gates=verdicts)
    for g in verdicts:
        s.say(f"gate {'pass' if g['passed'] else 'FAIL'}: {g['name']} {g['threshold']}: {g['reason']}")
    return verdicts


# ---------------------------------------------------------------------------- run


@dataclass
class RunResult:
    status: str  # promoted | rejected | rolled_back | unchanged
    exit_code: int
    release: str | None
    production: str | None
    previous: str | None = None
    trained: bool = False
    message: str = ""
    evals: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    canary: list[dict[str, Any]] = field(default_factory=list)
    endpoint: str | None = None
    served_by: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    wandb_run: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def run(s: Session, force: bool = False, on_step: Callable[[str], None] | None = None) -> RunResult:
    """The whole loop. `on_step(name)` is called at each stage boundary (tests kill the process there)."""
    from mlops.plan import make_plan
    from mlops.rollout import promote
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
                "unchanged",
                EXIT_OK,
                mp.existing,
                mp.existing,
                state.stages.get("previous"),
                False,
                msg,
                {k: v["metrics"] for k, v in stored.items() if v},
                timings=t,
            )

    tracker = Tracker(s.loaded, "run", {"project": cfg.project, "model": cfg.deploy.model, "backend": cfg.backend})
    exit_code = 1
    try:
        mark("train")
        progress = s.progress

        def logged(d: dict[str, float]) -> None:
            if progress:
                progress(d)
            if int(d["step"]) % 25 == 0:
                tracker.log({"train/loss": d["loss"], "train/tokens_per_s": d["tokens_per_s"]}, step=int(d["step"]))

        s.progress = logged
        with _timed(t, "train"):
            tr = train(s, cfg.deploy.model, force=force)
        s.progress = progress
        release = str(tr["release"])
        mark("registered")
        s.backend.prepare(release)
        with s.backend.serve() as url:
            mark("served")
            with _timed(t, "eval"):
                results = evaluate(s, release, url)
                prod, prod_results = production_results(s, url)
            for suite, r in results.items():
                tracker.log({f"eval/{suite}/{m}": v["mean"] for m, v in r["metrics"].items()})
            mark("evaluated")
            if prod == release:
                msg = f"{release} is already production; re-evaluated it"
                exit_code = EXIT_OK
                return RunResult(
                    "unchanged",
                    EXIT_OK,
                    release,
                    prod,
                    None,
                    tr["trained"],
                    msg,
                    {k: v["metrics"] for k, v in results.items()},
                    endpoint=url,
                    timings=t,
                )
            gates = gate(s, release, results, prod_results)
            summary = {k: v["metrics"] for k, v in results.items()}
            if not all(g["passed"] for g in gates):
                failed = [f"{g['name']} {g['threshold']}" for g in gates if not g["passed"]]
                msg = f"candidate {release} rejected: gate failed ({', '.join(failed)}); production stays {prod or 'empty'}"
                s.backend.set_state(lambda st: _clear_candidate(st, release), reason="gates failed")
                s.registry.append_event(release, "rejected", by="pipeline:gates", failed=failed)
                s.say(msg)
                exit_code = EXIT_GATE
                served = _smoke(url, cfg.deploy.model, cfg.deploy.server.api_key_env) if prod else None
                return RunResult(
                    "rejected",
                    EXIT_GATE,
                    release,
                    prod,
                    None,
                    tr["trained"],
                    msg,
                    summary,
                    gates,
                    endpoint=url,
                    served_by=served,
                    timings=t,
                )
            with _timed(t, "canary"):
                verdicts, failure = roll_out(s, release, url, prod, on_step=lambda i: mark(f"canary-{i}"))
            if failure is not None:
                exit_code = EXIT_GATE
                return RunResult(
                    "rolled_back",
                    EXIT_GATE,
                    release,
                    prod,
                    None,
                    tr["trained"],
                    failure,
                    summary,
                    gates,
                    verdicts,
                    url,
                    _smoke(url, cfg.deploy.model, cfg.deploy.server.api_key_env),
                    t,
                )
            mark("promote")
            new = promote(s.backend, release, reason="gates and canary passed" if prod else "first release")
            served = _smoke(url, cfg.deploy.model, cfg.deploy.server.api_key_env)
            if served != release:
                raise InfraError(f"promoted {release} but the endpoint answered from {served}")
            msg = f"promoted {release} to production" + (f" (previous: {prod})" if prod else "")
            s.say(msg)
            exit_code = EXIT_OK
            t["total"] = round(time.perf_counter() - t_all, 3)
            tracker.summary({"release": release, "status": "promoted"})
            return RunResult(
                "promoted",
                EXIT_OK,
                release,
                release,
                new.stages.get("previous"),
                tr["trained"],
                msg,
                summary,
                gates,
                verdicts,
                url,
                served,
                t,
                tracker.run_id,
            )
    finally:
        t.setdefault("total", round(time.perf_counter() - t_all, 3))
        tracker.finish(exit_code)


def roll_out(
    s: Session, release: str, url: str, prod: str | None, on_step: Callable[[int], None] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Canary steps with live analysis against production. Returns (verdicts, failure message or None);
    on a failing step the traffic is already back on production and the rollback is recorded."""
    from mlops.evals.harness import load_cases
    from mlops.rollout import abort_canary, canary

    cfg = s.loaded.cfg
    if prod is None:
        s.say("no production release yet: promoting without a canary (nothing to compare with)")
        return [], None
    model_cfg = cfg.models[cfg.deploy.model]
    cases = load_cases(s.loaded, next(iter(cfg.evals))) if cfg.evals else []
    prompts = [model_cfg.prompt.format(input=c.input) for c in cases] or ["hello"]
    steps = canary(
        s.backend,
        release,
        url,
        prompts,
        cfg.deploy.rollout,
        cfg.deploy.model,
        model_cfg.max_tokens,
        s.say,
        on_step=on_step,
    )
    verdicts = [v.to_json() for v in steps]
    if all(v.passed for v in steps):
        return verdicts, None
    why = "; ".join(steps[-1].reasons)
    abort_canary(s.backend, reason=f"canary failed: {why}", actor="pipeline:analysis")
    s.registry.append_event(release, "rolled_back", by="pipeline:analysis", reasons=steps[-1].reasons)
    msg = f"candidate {release} rolled back at {steps[-1].percent}%: {why}"
    s.say(msg)
    return verdicts, msg


def _clear_candidate(st: State, release: str) -> State | None:
    if st.stages.get("candidate") != release:
        return None
    st.stages["candidate"] = None
    return st


def _smoke(url: str, model: str, api_key_env: str | None = None) -> str | None:
    """One request through the production route (no pin): which release answered?"""
    import httpx

    from mlops.util import api_key_from_env

    key = api_key_from_env(api_key_env)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "a", "max_tokens": 1},
            timeout=30,
            headers=headers,
            trust_env=False,
        )
    except httpx.HTTPError as e:
        raise InfraError(f"endpoint {url} did not answer: {e}") from e
    return r.headers.get("x-mlops-release")
