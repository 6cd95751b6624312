"""Values that came from `${VAR}` are never printed back in an error.

A config may pull a key from the environment (`storage: s3://${BUCKET}/x`); a wrong field then
ends up in an error message ("unknown backend 'sk-…'"), and errors land in CI logs. The loader
records every substituted span here with the variable's name; the CLI's exit boundary passes
every message through `redact()`, which replaces the span (and the parts of it that errors print
on their own: a URI's scheme, bucket or path segment) with `<value of $VAR>`.
"""

from __future__ import annotations

import re
from typing import Any

# Pieces shorter than this are too common to hide without mangling messages ("s3", "x", "data").
MIN_PIECE = 6
_SEP = re.compile(r"[/:@?#=&,;\s\"'`]+")

_spans: dict[str, str] = {}  # value -> variable name


def remember(value: str, var: str) -> None:
    """Record one substituted value (empty values hide nothing)."""
    if value.strip():
        _spans.setdefault(value, var)
        for piece in _SEP.split(value):
            if len(piece) >= MIN_PIECE:
                _spans.setdefault(piece, var)


def redact(text: str) -> str:
    # longest first, so a whole value is replaced before the pieces it contains
    for value in sorted(_spans, key=len, reverse=True):
        if value in text:
            text = text.replace(value, f"<value of ${_spans[value]}>")
    return text


def redact_obj(obj: Any) -> Any:
    """`obj` (JSON-like) with every string redacted: what `--json` prints."""
    if not _spans:
        return obj
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return obj


def forget_all() -> None:
    """For tests that load many configs in one process."""
    _spans.clear()
