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
    out = EvalArgs()
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a == "--json":
            out.json = True
        elif a in ("--gates", "--no-gates"):
            out.gates = a == "--gates"
        elif name in _VALUED and (eq or name == a):
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    return None  # let Typer say what is missing
                i += 1
                value = args[i]
            key = _VALUED[name]
            if key in ("sets", "suites"):
                getattr(out, key).append(value)
            elif key == "config":
                out.config = Path(value)
            else:
                setattr(out, key, value)
        else:
            return None
        i += 1
    return out


def _say(msg: str) -> None:
    from mlops.redact import redact

    sys.stderr.write("• " + redact(msg) + "\n")
    sys.stderr.flush()


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
    s = Session.open(load(a.config, a.sets, check_files=True), say=_say)
    res = eval_release(s, a.release, a.suites or None, a.url, a.gates)
    if a.json:
        import json

        sys.stdout.write(json.dumps(res.model_dump(mode="json"), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(f"{res.release}: {'gates pass' if res.passed else 'gates FAIL'}\n")
    return res.exit_code
