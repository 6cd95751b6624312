"""Imports follow the layers, and no module imports itself back (see DESIGN.md, Layers).

Every import counts: at module top, inside a function (lazy), or under TYPE_CHECKING, because
each is a dependency a reader must follow. A layer may import from lower layers only; packages on
the same layer are siblings and may not import each other (evals may not reach into training).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mlops"

# bottom -> top. The key is the first name under `mlops.`; a new top-level module or package
# needs a line here (the test says so).
BASE = 0.0
RANK: dict[str, float] = {
    # models of mlops.yaml and of results, data reading, errors, helpers, the plugin table
    "config": BASE,
    "configdata": BASE,
    "configtrain": BASE,
    "configmonitor": BASE,
    "configrollout": BASE,
    "configbase": BASE,
    "configbudget": BASE,
    "configvllm": BASE,
    "vllm_options": BASE,  # data: vLLM's flags, which deploy.vllm is checked against
    "contracts": BASE,
    "data": BASE,
    "datasources": BASE,
    "errors": BASE,
    "util": BASE,
    "env": BASE,
    "yamlload": BASE,
    "plugins": BASE,
    "redact": BASE,
    "cache": BASE,
    "retry": BASE,
    "__init__": BASE,
    # domain: releases and stores; recipes; harness, metrics, gates
    "registry": 1.0,
    "training": 1.0,
    "evals": 1.0,
    # traffic capture sits between the registry (where it writes) and the server (which calls it)
    "monitor": 1.5,
    # roles and outputs
    "serving": 2.0,
    "report": 2.0,
    "plan": 2.0,
    "budget": 2.0,  # what a push would spend, against the caps (reads the registry's cost records)
    "rollout_analysis": 2.0,  # judges a live step (the controller and the pipeline call it)
    "rollout_judge": 2.0,  # judges a replayed or shadow step on the server's counters (both drivers)
    "tracking": 2.0,
    "tracking_mlflow": 1.8,  # the MLflow client: tracking (runs) and backends (aliases) use it
    # a backend plays train/serve/route roles, so it may use the serving package
    "backends": 2.5,
    # the orchestrator
    "flows": 3.0,
    "pipeline": 3.0,
    "scaffold": 3.0,  # mlops init: copies the template (a flow of its own)
    "rollout": 3.0,
    "rollout_controller": 3.0,  # advances State.rollout on its own clock (mlops serve, Modal's schedule)
    "rollout_guard": 3.0,  # the guardrail after promotion (the controller calls it)
    "rollout_process": 3.0,  # runs the controller as `mlops serve`'s supervised child process
    "rollout_shadow": 3.0,  # the shadow step as the controller's first phase (the controller calls it)
    "rollout_start": 3.0,  # writes State.rollout (run/deploy) and says where it stands (mlops status)
    "rollout_schedule": 3.0,  # the controller as a scheduled invocation (Modal's functions/controller.py)
    "experiment_controller": 3.0,  # stops an --auto-stop experiment (the rollout controller's hook)
    # parse, call one flow, print
    "cli": 4.0,
    # `mlops serve` in a subprocess, for tests and benchmarks (nothing in mlops imports it)
    "testing": 4.0,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The mlops modules `name` imports (resolved to a module, not a class in it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_pkg else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            # the longest prefix that is a module of ours: `from mlops import plugins` -> mlops.plugins
            parts = t.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.add(".".join(parts))
    # `from mlops.x import y` also yields `mlops.x`; `from mlops import x` yields `mlops` too: drop the
    # bare package when a submodule of it was named in the same import.
    if "mlops" in found and any(m.startswith("mlops.") for m in found):
        found.discard("mlops")
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


# modules that form one group on their layer (the orchestrator's flows call each other)
ONE_GROUP = {
    "pipeline": "flows",
    "rollout": "flows",
    "rollout_controller": "flows",
    "rollout_start": "flows",
    "rollout_guard": "flows",
    "rollout_schedule": "flows",
    "rollout_process": "flows",
    "rollout_shadow": "flows",
    "experiment_controller": "flows",
}


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _same_group(a: str, b: str) -> bool:
    if RANK[a] == BASE and RANK[b] == BASE:
        return True  # the bottom layer is one group: config uses errors, yamlload, plugins
    return ONE_GROUP.get(a, a) == ONE_GROUP.get(b, b)


def test_every_module_has_a_layer() -> None:
    missing = sorted({_group(m) for m in MODULES} - set(RANK))
    assert not missing, f"add these to RANK in tests/test_layers.py (which layer?): {missing}"


def _violations() -> list[str]:
    bad = []
    for mod, deps in GRAPH.items():
        g = _group(mod)
        for dep in sorted(deps):
            d = _group(dep)
            if g == d or d not in RANK or g not in RANK or _same_group(g, d):
                continue
            if RANK[d] >= RANK[g]:
                how = "sibling" if RANK[d] == RANK[g] else "upward"
                bad.append(f"{mod} -> {dep} ({how}: {g} {RANK[g]} -> {d} {RANK[d]})")
    return bad


def test_imports_point_down() -> None:
    bad = _violations()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    cycles = _cycles()
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    ("graph", "expect"),
    [
        ({"mlops.evals.x": {"mlops.serving.y"}}, "upward"),
        ({"mlops.evals.x": {"mlops.training.y"}}, "sibling"),
        ({"mlops.config": {"mlops.evals.metrics"}}, "upward"),
        ({"mlops.cli.main": {"mlops.config"}}, None),
    ],
)
def test_the_check_catches(graph: dict[str, set[str]], expect: str | None) -> None:
    saved = dict(GRAPH)
    try:
        GRAPH.clear()
        GRAPH.update(graph)
        bad = _violations()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
    assert (expect in bad[0]) if expect else not bad


def test_cycle_check_catches() -> None:
    saved = dict(GRAPH)
    try:
        GRAPH.clear()
        GRAPH.update({"mlops.registry.store": {"mlops.registry.s3"}, "mlops.registry.s3": {"mlops.registry.store"}})
        assert _cycles() == [["mlops.registry.s3", "mlops.registry.store"]]
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
