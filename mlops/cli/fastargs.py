"""What the Typer-free commands share (mlops/cli/eval_fast.py, rollback_fast.py): their option
parser and their progress line. The parser understands exactly the options it is given and returns
None for anything else (`--help`, a new option, a typo), so the Typer app answers those as before.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def parse_into(
    out: T, args: list[str], valued: Mapping[str, str], flags: Mapping[str, tuple[str, Any]], lists: tuple[str, ...]
) -> T | None:
    """`args` into the fields of `out`: `valued` maps an option taking a value to its field (`--x v`
    or `--x=v`; a field in `lists` collects every one, `config` becomes a Path), `flags` maps a flag
    to (field, value). None for anything else, or a value missing."""
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a in flags:
            setattr(out, *flags[a])
        elif name in valued and (eq or name == a):
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    return None  # let Typer say what is missing
                i += 1
                value = args[i]
            key = valued[name]
            if key in lists:
                getattr(out, key).append(value)
            else:
                setattr(out, key, Path(value) if key == "config" else value)
        else:
            return None
        i += 1
    return out


def say(msg: str) -> None:
    """A progress line on stderr, as the Typer app's commands print them."""
    from mlops.redact import redact

    sys.stderr.write("• " + redact(msg) + "\n")
    sys.stderr.flush()
