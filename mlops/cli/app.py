"""The Typer app: every command group registered on one `mlops` app (imported only when needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlops.cli import (
    base_cmd,
    cases_cmd,
    doctor_cmd,
    experiment_cmds,
    monitor_cmds,
    pipeline_cmds,
    registry_cmds,
    status_cmd,
)
from mlops.cli.common import ConfigOpt, JsonOpt, SetOpt, emit, err, load_config
from mlops.cli.validate import summary

app = typer.Typer(
    name="mlops",
    help="Push to train, PR to evaluate, gates that roll back by themselves. Reads ./mlops.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
pipeline_cmds.register(app)
registry_cmds.register(app)
doctor_cmd.register(app)
status_cmd.register(app)
monitor_cmds.register(app)
base_cmd.register(app)
experiment_cmds.register(app)
cases_cmd.register(app)


@app.command()
def validate(
    config: ConfigOpt = Path("mlops.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
    data: Annotated[bool, typer.Option("--data", help="Also run every dataset's checks (rows, leakage).")] = False,
) -> None:
    """Check mlops.yaml: schema, references, dataset files. Exit 1 with file:line on the first error."""
    if data:  # reads every dataset: not the fast path (mlops/cli/validate.py leaves --data to us)
        return monitor_cmds.validate_data(load_config(config, set_), json_)
    info, human = summary(config, load_config(config, set_))
    emit(info, json_, human)


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to a file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of mlops.yaml (for editors: yaml-language-server)."""
    from mlops.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        err.print(f"wrote {out}")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The repository to add the template to.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that already exist.")] = False,
    example: Annotated[
        str | None, typer.Option("--example", help="Start from an example instead: chat (chat + RAG, a Llama base).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Add mlops.yaml, functions/, .github/workflows/ and an example eval to an existing repository."""
    from mlops.scaffold import init as do_init

    written = do_init(directory, force=force, example=example)
    emit(
        {"directory": str(directory), "files": written},
        json_,
        "\n".join(f"wrote {directory / n}" for n in written)
        + (
            "\nnext: mlops base build --arch llama --data data/train.jsonl --out bases/tiny-llama, then mlops run"
            if example == "chat"
            else "\nnext: mlops validate, then see README (GitHub Actions)"
        ),
    )
