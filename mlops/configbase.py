"""What every section of mlops.yaml's schema shares: strict frozen models and durations."""

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# One grammar for durations in mlops.yaml and on the command line (`--since 7d` = `window: 7d`).
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_DURATION = re.compile(r"\s*(\d{1,12}(?:\.\d{1,12})?)\s*(ms|s|m|h|d|w)?\s*")


def _duration(v: Any) -> Any:
    """'30m', '10s', '1h', '250ms', '7d', '2w' or a number of seconds -> float seconds."""
    if isinstance(v, bool):
        raise ValueError("expected a duration like 30s, 10m or 1h")
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        m = _DURATION.fullmatch(v)
        if m:
            return float(m.group(1)) * UNITS[m.group(2)]
    raise ValueError("expected a duration like 30s, 10m or 1h")


# finite: `.inf` is not a duration (a flush interval of .inf killed the capture thread at start)
Duration = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_duration)]


class Strict(BaseModel):
    # defer_build: a model is built on first use, so `validate` builds one validator (Config, with
    # the others inside it) instead of one per class at import (measured: benchmarks/bench_startup.py).
    # A section's default is therefore `XCfg.model_construct()`, not `XCfg()`: calling the class at
    # import would build its validator there (14 of them), and its defaults need no validating.
    # The schema modules (config*.py) also leave out `from __future__ import annotations`: pydantic
    # would compile each of their ~150 annotation strings back into objects at import.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
