"""Options every command shares, the console, and printing (rich for people, --json for machines)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mlops.config import Loaded, load
from mlops.redact import redact

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to mlops.yaml.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: --set models.tiny.train.steps=1 (value is YAML).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for machines).")]

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def setup_env() -> None:
    # wherever eval libraries may run: no telemetry, no hub downloads
    os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def load_config(path: Path, overrides: list[str] | None, check_files: bool = True) -> Loaded:
    setup_env()
    return load(path, overrides or [], check_files=check_files)


def say_fn(json_mode: bool) -> Any:
    def say(msg: str) -> None:
        err.print("• " + redact(msg), markup=False, highlight=False)

    return say


def emit(obj: dict[str, Any], json_mode: bool, human: str | None = None) -> None:
    if json_mode:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    elif human is not None:
        out.print(human, markup=False, highlight=False)
