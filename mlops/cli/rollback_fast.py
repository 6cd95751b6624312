"""`mlops rollback` without Typer and rich: parse the options it takes, move the routing, print.

`mlops rollback --to RELEASE` is the one-step deploy (an incident's rollback, an adapter release
switched in): the time from typing it to the release's first answer is measured
(benchmarks/bench_adapters.py), and for an adapter release, which the server loads in milliseconds,
most of that time was this process starting: Typer, click, rich and every command module are a
third of it (measured), for a command that parses five options and prints one line. As with
`validate` and `eval` (mlops/cli/validate.py, eval_fast.py), anything this parser does not know
(`--help`, a new option, a typo) returns None and the Typer app handles the command as before;
the output is the same (`--json`: the same object; people: the same line, unwrapped).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlops.cli.fastargs import parse_into, say

_VALUED = {"--config": "config", "-c": "config", "--set": "sets", "--to": "to", "--reason": "reason"}
_VALUED |= {"--model": "model", "-m": "model"}


@dataclass
class RollbackArgs:
    config: Path = Path("mlops.yaml")
    sets: list[str] = field(default_factory=list)
    json: bool = False
    to: str | None = None
    reason: str = "manual rollback"
    model: str | None = None


def parse(args: list[str]) -> RollbackArgs | None:
    """The options of `mlops rollback`, or None for anything else (Typer then answers it)."""
    return parse_into(RollbackArgs(), args, _VALUED, {"--json": ("json", True)}, lists=("sets",))


def actor() -> str:
    """Who moves the routing, for the release history: the workflow's dispatcher on GitHub Actions
    (GITHUB_TRIGGERING_ACTOR: who re-ran it; GITHUB_ACTOR stays the first run's), else this user."""
    import getpass

    try:
        who = f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        who = "user"
    login = os.environ.get("GITHUB_TRIGGERING_ACTOR") or os.environ.get("GITHUB_ACTOR")
    if os.environ.get("GITHUB_ACTIONS") == "true" and login:
        who = f"github:{login}"
    return who


def fast_rollback(argv: list[str]) -> int | None:
    """Run `rollback` when `argv` is exactly a rollback command this module understands; else None."""
    if argv[:1] != ["rollback"]:
        return None
    a = parse(argv[1:])
    if a is None:
        return None
    from mlops.config import load, owner
    from mlops.env import set_offline
    from mlops.flows.release import rollback_release
    from mlops.flows.session import Session
    from mlops.redact import redact, redact_obj

    set_offline()  # as every command the Typer app runs
    loaded = load(a.config, a.sets, check_files=True)
    model = a.model
    if model is None and a.to is not None:  # a release id names its model
        model = owner(loaded.cfg.deploy.names, a.to)
    s = Session.open(loaded, say=say, model=model)
    res = rollback_release(s, a.to, a.reason, actor())
    if a.json:
        import json

        sys.stdout.write(json.dumps(redact_obj(res.model_dump(mode="json")), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(redact(f"production is now {res.production} (was {res.rolled_back_from})") + "\n")
    return 0
