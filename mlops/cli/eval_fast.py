"""`mlops eval` without Typer and rich: parse the options it takes, evaluate, print.

`mlops eval` is a whole process per pull request and per nightly run, and its start-up is measured
against a bare httpx loop (benchmarks/bench_eval_process.py). Typer, click and rich are most of
what a command imports before it does anything, and this command only needs them to parse a few
options and print lines. As with `validate` (mlops/cli/validate.py), anything this parser does not
know (`--help`, a new option, a typo) returns None, and the Typer app handles the command as before.
The output is the same: `--json` prints the same object, people get the same lines, unwrapped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlops.cli.fastargs import parse_into, say

# option -> (field, takes a value); `--gates` / `--no-gates` are flags of one field
_VALUED = {"--config": "config", "-c": "config", "--set": "sets", "--release": "release", "-r": "release"}
_VALUED |= {"--suite": "suites", "--url": "url"}


@dataclass
class EvalArgs:
    config: Path = Path("mlops.yaml")
    sets: list[str] = field(default_factory=list)
    json: bool = False
    release: str = "candidate"
    suites: list[str] = field(default_factory=list)
    url: str | None = None
    gates: bool = True


def parse(args: list[str]) -> EvalArgs | None:
    """The options of `mlops eval`, or None for anything else (Typer then answers it)."""
    flags = {"--json": ("json", True), "--gates": ("gates", True), "--no-gates": ("gates", False)}
    return parse_into(EvalArgs(), args, _VALUED, flags, lists=("sets", "suites"))


def fast_eval(argv: list[str]) -> int | None:
    """Run `eval` when `argv` is exactly an eval command this module understands; else None."""
    if argv[:1] != ["eval"]:
        return None
    a = parse(argv[1:])
    if a is None:
        return None
    from mlops.config import load
    from mlops.env import set_offline
    from mlops.flows.release import eval_release
    from mlops.flows.session import Session

    set_offline()  # as every command that may run eval libraries: no telemetry, no hub downloads
    s = Session.open(load(a.config, a.sets, check_files=True), say=say)
    res = eval_release(s, a.release, a.suites or None, a.url, a.gates)
    if a.json:
        import json

        sys.stdout.write(json.dumps(res.model_dump(mode="json"), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(f"{res.release}: {'gates pass' if res.passed else 'gates FAIL'}\n")
    return res.exit_code
