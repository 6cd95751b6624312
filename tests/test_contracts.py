"""Eval results are pydantic contracts, and the registry reads back what earlier versions stored.

The documents here are what the registry held before results were models: MAIN_FORMAT as the dict
harness wrote it until then (produced by its `score()` on two cases, one timed out, plus its cost
block with one judge), and FIRST_FORMAT as the first version wrote it (no `cached`, no `failed`,
fewer cost counters). Both are written byte for byte as the registry wrote them (sorted keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlops.contracts import EvalResult
from mlops.registry.damage import RegistryDamaged
from mlops.registry.doctor import examine
from mlops.registry.releases import Registry
from mlops.registry.store import LocalStore

ROWS: list[dict[str, Any]] = [
    {
        "id": "c0",
        "input": "ab",
        "expected": "ba",
        "output": "ba",
        "latency_s": 0.012346,
        "error": None,
        "cached": False,
        "scores": {"exact_match": 1.0, "latency": 0.0123456789},
        "reasons": {},
        "failed": [],
    },
    {
        "id": "c1",
        "input": "cd",
        "expected": "dc",
        "output": "",
        "latency_s": 30.0,
        "error": "timeout after 30s",
        "cached": False,
        "scores": {"exact_match": 0.0, "latency": 1000000000.0},
        "reasons": {"exact_match": "timeout after 30s", "latency": "timeout after 30s"},
        "failed": ["exact_match", "latency"],
    },
]
SUMMARY = {
    "exact_match": {"higher_is_better": True, "n": 2, "failed": 1, "mean": 0.5, "p50": 0.5, "p95": 0.95, "p99": 0.99},
    "latency": {
        "higher_is_better": False,
        "n": 2,
        "failed": 1,
        "mean": 500000000.00617284,
        "p50": 500000000.00617284,
        "p95": 950000000.0006173,
        "p99": 990000000.0001235,
    },
}
MAIN_FORMAT = {
    "suite": "heldout",
    "release": "tiny-20261130-000000-abc123",
    "created_at": "2026-11-30T07:00:00Z",
    "n": 2,
    "metrics": SUMMARY,
    "metric_names": ["exact_match", "latency"],
    "cases": ROWS,
    "cost": {
        "endpoint_calls": 2,
        "retries": 0,
        "cache_hits": 0,
        "errors": 1,
        "completion_tokens": 3,
        "query_s": 30.01,
        "wall_s": 30.02,
        "judge_calls": 4,
        "judge_cache_hits": 1,
        "judge_retries": 0,
        "judge_failures": 0,
        "judge_prompt_tokens": 400,
        "judge_completion_tokens": 12,
        "judges": [
            {
                "judge": "local",
                "model": "judge-1",
                "calls": 4,
                "retries": 0,
                "cache_hits": 1,
                "failures": 0,
                "prompt_tokens": 400,
                "completion_tokens": 12,
            }
        ],
    },
}
FIRST_FORMAT = MAIN_FORMAT | {
    "cases": [{k: v for k, v in r.items() if k not in ("cached", "failed")} for r in ROWS],
    "cost": {
        "endpoint_calls": 2,
        "cache_hits": 0,
        "completion_tokens": 3,
        "errors": 1,
        "query_s": 30.01,
        "wall_s": 30.02,
        "judge_calls": 0,
    },
}
KEY = "releases/r1/evals/heldout.json"


def stored(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()  # how the registry has always written documents


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(LocalStore(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_a_result_stored_before_contracts_reads_back_and_is_rewritten_byte_for_byte(reg: Registry) -> None:
    reg.store.put(KEY, stored(MAIN_FORMAT))
    res = reg.get_eval("r1", "heldout")
    assert isinstance(res, EvalResult)
    assert res.metrics["exact_match"].mean == 0.5 and res.metrics["latency"].higher_is_better is False
    assert [c.failed for c in res.cases] == [[], ["exact_match", "latency"]]
    assert res.cost.judges[0].judge == "local" and res.cost.judge_calls == 4
    reg.put_eval("r2", "heldout", res)
    blob = reg.store.get("releases/r2/evals/heldout.json")
    assert blob is not None and blob.data == stored(MAIN_FORMAT)


def test_a_result_of_the_first_format_reads_with_defaults(reg: Registry) -> None:
    reg.store.put(KEY, stored(FIRST_FORMAT))
    res = reg.get_eval("r1", "heldout")
    assert res is not None
    assert [(c.cached, c.failed) for c in res.cases] == [(False, []), (False, [])]
    assert (res.cost.endpoint_calls, res.cost.retries, res.cost.judges) == (2, 0, [])


def test_a_document_that_is_not_a_result_is_damage_named_with_its_field(reg: Registry) -> None:
    reg.store.put(KEY, stored(MAIN_FORMAT | {"n": "two"}))
    with pytest.raises(RegistryDamaged, match=r"heldout\.json is damaged \(not an eval result: n: "):
        reg.get_eval("r1", "heldout")
    reg.store.put(KEY, stored(MAIN_FORMAT | {"stray": 1}))
    with pytest.raises(RegistryDamaged, match=r"not an eval result: stray: Extra inputs are not permitted"):
        reg.get_eval("r1", "heldout")
    # `mlops doctor`, which the error points to, finds the same document
    assert [(f.kind, f.key) for f in examine(reg) if f.kind == "damaged_eval"] == [("damaged_eval", KEY)]


def test_canary_steps_print_as_history_records_them() -> None:
    """`mlops run/deploy --json` print each canary step as its `canary_step` event: the fields, `verdict`
    and `extra` flat, as when the results held those dicts; the result itself holds StepVerdicts."""
    from mlops.contracts import DeployOutcome, RunResult, StepVerdict

    step = StepVerdict(
        step=1,
        percent=50,
        candidate={"p95": 0.2, "errors": 0.0},
        production={"p95": 0.1, "errors": 0.0},
        passed=False,
        reasons=["p95 ratio 2 > 1.5"],
        mode="shadow",
        extra={"agreement": 0.75},
    )
    recorded = {
        "step": 1,
        "percent": 50,
        "candidate": {"p95": 0.2, "errors": 0.0},
        "production": {"p95": 0.1, "errors": 0.0},
        "passed": False,
        "reasons": ["p95 ratio 2 > 1.5"],
        "decided_by": "pipeline:analysis",
        "mode": "shadow",
        "notes": [],
        "verdict": "fail",
        "agreement": 0.75,
    }
    run = RunResult(status="rolled_back", exit_code=3, release="r2", production="r1", canary=[step])
    assert run.canary[0] is step
    assert json.dumps(run.model_dump(mode="json")["canary"]) == json.dumps([recorded])
    assert RunResult(status="unchanged", exit_code=0, release=None, production="r1").model_dump()["canary"] == []
    dep = DeployOutcome(release="r2", status="rolled_back", canary=[step], message="rolled back")
    assert json.dumps(dep.model_dump(mode="json", exclude_unset=True)) == json.dumps(
        {"release": "r2", "status": "rolled_back", "canary": [recorded], "message": "rolled back"}
    )
    assert "canary" not in DeployOutcome(release="r2", status="rejected").model_dump(mode="json", exclude_unset=True)
