"""`mlops`: one exit boundary. Known errors print one line and exit with their code
(1 config/usage, 3 gate failed, 4 infrastructure); a traceback only with MLOPS_DEBUG=1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlops.cli import pipeline_cmds, registry_cmds
from mlops.cli.common import ConfigOpt, JsonOpt, SetOpt, emit, err, load_config
from mlops.errors import EXIT_CONFIG, EXIT_INFRA, MlopsError

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


@app.command()
def validate(config: ConfigOpt = Path("mlops.yaml"), set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Check mlops.yaml: schema, references, dataset files. Exit 1 with file:line on the first error."""
    loaded = load_config(config, set_)
    cfg = loaded.cfg
    info = {
        "ok": True,
        "config": str(loaded.path),
        "project": cfg.project,
        "backend": cfg.backend,
        "storage": cfg.storage,
        "models": list(cfg.models),
        "evals": list(cfg.evals),
        "gates": len(cfg.gates),
    }
    emit(
        info,
        json_,
        f"{config}: ok ({cfg.project}: {len(cfg.models)} model(s), {len(cfg.evals)} eval suite(s), {len(cfg.gates)} gate(s), backend {cfg.backend})",
    )


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


def main() -> None:
    """Console entry point: the single place where errors become exit codes."""
    debug = os.environ.get("MLOPS_DEBUG") == "1"
    try:
        rc = app(standalone_mode=False)
    except MlopsError as e:
        if debug:
            raise
        err.print(f"error: {e.headline}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(EXIT_CONFIG)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if debug:
            raise
        err.print(
            f"internal error: {type(e).__name__}: {e} (MLOPS_DEBUG=1 for a traceback)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_INFRA)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
