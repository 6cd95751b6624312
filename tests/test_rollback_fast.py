"""`mlops rollback` without Typer (mlops/cli/rollback_fast.py) parses the options of the Typer
command and nothing else: anything it does not know goes to the Typer app. That both run the same
rollback is shown with real releases in tests/test_adapters.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops.cli.rollback_fast import RollbackArgs, actor, parse


def test_parse_takes_the_options_of_rollback_and_nothing_else() -> None:
    a = parse(["-c", "x.yaml", "--set", "a=1", "--set=b=2", "--json", "--to", "r1", "--reason=why", "-m", "chat"])
    assert a == RollbackArgs(Path("x.yaml"), ["a=1", "b=2"], True, "r1", "why", "chat")
    assert parse([]) == RollbackArgs() and parse(["--model=m"]) == RollbackArgs(model="m")
    for typer_answers in (["--help"], ["--to"], ["--to", "--json"], ["--too", "x"], ["extra"], ["--json=1"]):
        assert parse(typer_answers) is None, typer_answers


def test_the_actor_is_the_workflow_dispatcher_on_github_actions(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("GITHUB_ACTIONS", "GITHUB_ACTOR", "GITHUB_TRIGGERING_ACTOR"):
        monkeypatch.delenv(k, raising=False)
    assert actor().startswith("user")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_ACTOR", "first")
    assert actor() == "github:first"
    monkeypatch.setenv("GITHUB_TRIGGERING_ACTOR", "rerunner")
    assert actor() == "github:rerunner"
