"""`mlops validate` without Typer or rich: parse the few options it takes, load, print.

Anything this parser does not know (`--help`, a new option, a typo) returns None, and the Typer
app handles the command as before: the fast path can only answer what it fully understands.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlops.config import Loaded


def summary(config: Path, loaded: Loaded) -> tuple[dict[str, Any], str]:
    """What `validate` prints: the `--json` object, and the line for people."""
    cfg = loaded.cfg
    info = {
        "ok": True,
        "config": str(loaded.path),
        "project": cfg.project,
        "backend": cfg.backend,
        "storage": cfg.storage,
        "models": list(cfg.models),
        "deployed": cfg.deploy.names,  # what a workflow loops over with `--model` when there are several
        "evals": list(cfg.evals),
        "gates": len(cfg.gates),
    }
    human = (
        f"{config}: ok ({cfg.project}: {len(cfg.models)} model(s), {len(cfg.evals)} eval suite(s), "
        f"{len(cfg.gates)} gate(s), backend {cfg.backend})"
    )
    if cfg.backend == "modal":  # what a container looks up, and where it must come from
        from mlops.backends.modal_settings import ModalSettings
        from mlops.backends.modal_setup import describe, lookups

        s = ModalSettings.from_config(cfg, loaded.root)
        info["modal"] = {"environment": s.environment, "lookups": [x.to_json() for x in lookups(cfg, s)]}
        human = "\n".join([human, *describe(cfg, s)])
    return info, human


def _parse(args: list[str]) -> tuple[Path, list[str], bool] | None:
    config, sets, json_ = Path("mlops.yaml"), [], False
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a == "--json":
            json_ = True
        elif name in ("--config", "-c", "--set"):
            if not eq:
                if i + 1 >= len(args):
                    return None  # let Typer say what is missing
                i += 1
                value = args[i]
            if name == "--set":
                sets.append(value)
            else:
                config = Path(value)
        else:
            return None
        i += 1
    return config, sets, json_


def _without_pydantic_plugins() -> None:
    """Validation uses no pydantic plugins, but pydantic's plugin loader imports importlib.metadata
    to look for them when the first model is built: measured, that import alone is ~40% of the
    `import pydantic, yaml` floor. PYDANTIC_DISABLE_PLUGINS makes the loader find none; the stub
    gives the same answer without the import. Only this short-lived process is affected."""
    if "pydantic.plugin._loader" in sys.modules or os.environ.get("PYDANTIC_DISABLE_PLUGINS", "__all__") != "__all__":
        return
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    stub = types.ModuleType("pydantic.plugin._loader")
    stub.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules["pydantic.plugin._loader"] = stub


def fast_validate(argv: list[str]) -> int | None:
    """Run `validate` when `argv` is exactly a validate command this module understands; else None."""
    if argv[:1] != ["validate"]:
        return None
    parsed = _parse(argv[1:])
    if parsed is None:
        return None
    config, sets, json_ = parsed
    _without_pydantic_plugins()
    from mlops.config import load
    from mlops.env import set_offline

    set_offline()
    from mlops.redact import redact, redact_obj

    info, human = summary(config, load(config, sets, check_files=True))
    if json_:
        import json  # not at import: only --json prints JSON (every module counts here)

        sys.stdout.write(json.dumps(redact_obj(info), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(redact(human) + "\n")
    return 0
