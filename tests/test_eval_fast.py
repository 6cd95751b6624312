"""`mlops eval` without Typer (mlops/cli/eval_fast.py): the same command, the same answers.

The fast path parses only the options it knows and hands anything else to the Typer app; a real
`mlops eval` through it and through the Typer app, against the same endpoint on 127.0.0.1, store
and print the same results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlops.cli.eval_fast import EvalArgs, parse
from mlops.config import load
from mlops.pipeline import Session

try:
    from test_segments import PROD, SEGMENT, Endpoint, endpoint, project  # noqa: F401
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_segments import PROD, SEGMENT, Endpoint, endpoint, project  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def test_parse_takes_the_options_of_eval_and_nothing_else() -> None:
    a = parse(
        ["-c", "x.yaml", "--set", "a=1", "--set=b=2", "--json", "-r", "r1", "--suite", "s", "--url=http://127.0.0.1:9"]
    )
    assert a == EvalArgs(Path("x.yaml"), ["a=1", "b=2"], True, "r1", ["s"], "http://127.0.0.1:9", True)
    assert parse(["--no-gates"]) == EvalArgs(gates=False) and parse([]) == EvalArgs()
    for typer_answers in (["--help"], ["--release"], ["--url", "--json"], ["--relese", "x"], ["extra"], ["--json=1"]):
        assert parse(typer_answers) is None, typer_answers


def run(args: list[str], cwd: Path, typer: bool) -> subprocess.CompletedProcess[str]:
    code = "from mlops.cli.app import app; app()" if typer else "from mlops.cli.main import main; main()"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_fast_path_and_the_typer_app_evaluate_alike(endpoint: Endpoint, tmp_path: Path) -> None:
    cfg = project(tmp_path / "p", [SEGMENT | {"min": 0.5, "max_regression": None}])
    root = cfg.parent
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"the endpoint answers for it")
    Session.open(load(cfg)).registry.publish(PROD, art, {"model": "tiny", "lineage": {}})
    args = ["eval", "--release", PROD, "--url", endpoint.url, "--json"]
    fast, slow = run(args, root, typer=False), run(args, root, typer=True)
    assert fast.returncode == slow.returncode == 0, (fast.stderr, slow.stderr)
    a, b = json.loads(fast.stdout), json.loads(slow.stdout)
    assert list(a) == list(b) and a["metrics"] == b["metrics"] and a["metrics"]["heldout"]["exact_match"]["mean"] == 1
    assert [(g["name"], g["passed"], g["reason"]) for g in a["gates"]] == [
        (g["name"], g["passed"], g["reason"]) for g in b["gates"]
    ]
    assert "• eval heldout on" in fast.stderr and "• gate pass: heldout.exact_match[billing] mean" in fast.stderr
    human = run(["eval", "-r", PROD, f"--url={endpoint.url}", "--no-gates"], root, typer=False)
    assert human.returncode == 0 and human.stdout == f"{PROD}: gates pass\n", human.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--release", "nope", "--url", "http://127.0.0.1:9"], "error: unknown release 'nope'"),
        (["eval", "--suite", "nope", "--url", "http://127.0.0.1:9", "-r", PROD], "error: unknown suite 'nope'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args: list[str], message: str, tmp_path: Path) -> None:
    cfg = project(tmp_path / "p", [])
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"x")
    Session.open(load(cfg)).registry.publish(PROD, art, {"model": "tiny", "lineage": {}})
    r = run(args, cfg.parent, typer=False)
    assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
