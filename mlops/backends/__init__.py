"""Backends by name: the table lives in `mlops.plugins`; this keeps `backend_class` for callers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlops import plugins

if TYPE_CHECKING:
    from mlops.backends.base import Backend


def backend_class(name: str) -> type[Backend]:
    cls: type[Backend] = plugins.load("backend", name)
    return cls
