"""`mlops`: one exit boundary. Known errors print one line and exit with their code
(1 config/usage, 3 gate failed, 4 infrastructure); a traceback only with MLOPS_DEBUG=1.

`mlops validate` runs before Typer and rich are imported (see mlops/cli/validate.py): it is the
command a pre-commit hook or an editor calls on every save, so its start-up is measured
(benchmarks/bench_startup.py). So does `mlops eval` (mlops/cli/eval_fast.py), a whole process per
pull request, measured against a bare httpx loop (benchmarks/bench_eval_process.py), and `mlops
rollback` (mlops/cli/rollback_fast.py), the one-step deploy whose time to the release's first answer
is measured (benchmarks/bench_adapters.py). Every other command, and any form of those three their
parsers do not know, goes through the Typer app in mlops/cli/app.py.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from mlops.errors import EXIT_CONFIG, EXIT_INFRA, MlopsError
from mlops.redact import redact


def _say_error(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _without_httpx_cli() -> None:
    """httpx's `__init__` imports its own command line (`httpx._main`: click, rich.syntax, pygments),
    about half of `import httpx`, for a `main` that mlops never calls. A stand-in with that one name
    lets `import httpx` skip it; nothing else of httpx changes. Only this process is affected."""
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    import types

    stub = types.ModuleType("httpx._main")

    def cli_main() -> None:
        raise SystemExit("the httpx command line is not loaded in an mlops process; run `httpx` itself")

    stub.main = cli_main  # type: ignore[attr-defined]
    sys.modules["httpx._main"] = stub


def main() -> None:
    """Console entry point: the single place where errors become exit codes."""
    debug = os.environ.get("MLOPS_DEBUG") == "1"
    try:
        from mlops.cli.validate import _without_pydantic_plugins, fast_validate

        rc = fast_validate(sys.argv[1:])  # first, and alone: its start-up is measured to the import
        if rc is None:
            from mlops.cli.eval_fast import fast_eval

            _without_httpx_cli()
            _without_pydantic_plugins()  # no command uses a pydantic plugin; looking for them costs an import
            rc = fast_eval(sys.argv[1:])
        if rc is None:
            from mlops.cli.rollback_fast import fast_rollback

            rc = fast_rollback(sys.argv[1:])
        if rc is None:
            from mlops.cli.app import app

            rc = app(standalone_mode=False)
    except MlopsError as e:
        if debug:
            raise
        _say_error(f"error: {redact(e.headline)}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _say_error("interrupted")
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
        _say_error(f"internal error: {type(e).__name__}: {redact(str(e))} (MLOPS_DEBUG=1 for a traceback)")
        sys.exit(EXIT_INFRA)
    sys.exit(rc if isinstance(rc, int) else 0)


def __getattr__(name: str) -> Any:
    if name == "app":  # `mlops.cli.main:app`, as before the app moved to mlops/cli/app.py
        from mlops.cli.app import app

        return app
    raise AttributeError(name)


if __name__ == "__main__":
    main()
