"""Backends by name. `mlops.config.BACKENDS` lists the same names so `validate` stays import-light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mlops.config import BACKENDS
from mlops.errors import ConfigError

if TYPE_CHECKING:
    from mlops.backends.base import Backend

BACKEND_REGISTRY: dict[str, str] = {
    "local": "mlops.backends.local:LocalBackend",
    "modal": "mlops.backends.modal:ModalBackend",
}
assert set(BACKEND_REGISTRY) == set(BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if name not in BACKEND_REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, BACKEND_REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown backend {name!r} ({hint}valid: {', '.join(sorted(BACKEND_REGISTRY))})")
    module, _, attr = BACKEND_REGISTRY[name].partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), attr)
    return cls
