"""What every section of mlops.yaml's schema shares: strict frozen models and durations."""

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _duration(v: Any) -> Any:
    """'30m', '10s', '1h', '250ms' or a number of seconds -> float seconds."""
    if isinstance(v, bool):
        raise ValueError("expected a duration like 30s, 10m or 1h")
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", v)
        if m:
            return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    raise ValueError("expected a duration like 30s, 10m or 1h")


Duration = Annotated[float, Field(ge=0), BeforeValidator(_duration)]


class Strict(BaseModel):
    # defer_build: a model is built on first use, so `validate` builds one validator (Config, with
    # the others inside it) instead of one per class at import (measured: benchmarks/bench_startup.py).
    # A section's default is therefore `XCfg.model_construct()`, not `XCfg()`: calling the class at
    # import would build its validator there (14 of them), and its defaults need no validating.
    # The schema modules (config*.py) also leave out `from __future__ import annotations`: pydantic
    # would compile each of their ~150 annotation strings back into objects at import.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
