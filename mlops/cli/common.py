"""Options every command shares, the console, and printing (rich for people, --json for machines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mlops.config import Loaded, load
from mlops.env import set_offline
from mlops.redact import redact, redact_obj

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to mlops.yaml.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: --set models.tiny.train.steps=1 (value is YAML).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for machines).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="The deployed model (needed only when several are deployed).")
]

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def load_config(path: Path, overrides: list[str] | None, check_files: bool = True) -> Loaded:
    set_offline()  # wherever eval libraries may run: no telemetry, no hub downloads
    return load(path, overrides or [], check_files=check_files)


def say_fn(json_mode: bool) -> Any:
    def say(msg: str) -> None:
        err.print("• " + redact(msg), markup=False, highlight=False)

    return say


def emit(obj: dict[str, Any], json_mode: bool, human: str | None = None) -> None:
    """Print one JSON object or the human text; a value that came from `${VAR}` in neither."""
    if json_mode:
        sys.stdout.write(json.dumps(redact_obj(obj), indent=2, default=str) + "\n")
    elif human is not None:
        out.print(redact(human), markup=False, highlight=False)
