"""Implementations by name, imported only when used (as Metaflow's `plugins/__init__.py`).

A table maps a name from `mlops.yaml` to "module:attribute"; nothing is imported until `load`
asks for it, so `mlops validate` checks names without importing torch or an engine.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from mlops.serving.base import EngineFactory

# deploy.engine: what generates text behind the local server (see mlops/serving/base.py)
ENGINES: dict[str, str] = {
    "builtin": "mlops.serving.engine:Engine",
    "vllm": "mlops.serving.vllm_engine:VllmEngine",
}


def did_you_mean(word: str, options: dict[str, str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"({hint}valid: {', '.join(sorted(options))})"


def load(table: dict[str, str], name: str, what: str) -> Any:
    """The implementation registered as `name` in `table`, imported now."""
    if name not in table:
        raise KeyError(f"unknown {what} {name!r} {did_you_mean(name, table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def engine_factory(name: str) -> EngineFactory:
    return cast("EngineFactory", load(ENGINES, name, "engine"))
