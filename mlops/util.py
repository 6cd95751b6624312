"""Small helpers every layer may use: a percentile, a timestamp, an environment lookup, a free port, an fsync."""

from __future__ import annotations

import datetime as dt
import os


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def now() -> str:
    """UTC, milliseconds, `Z`: the timestamp every record on disk carries."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def api_key_from_env(name: str | None) -> str | None:
    """The value of the environment variable `mlops.yaml` names for the API key (never the key
    itself); None when no variable is named. A named variable that is unset or empty is a usage
    error: serving without the key the config asks for would open the endpoint silently."""
    if not name:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        from mlops.errors import UsageError

        state = "empty" if name in os.environ else "not set"
        raise UsageError(f"deploy.server.api_key_env names {name}, but {name} is {state}: set it (or drop api_key_env)")
    return key


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file, or a directory's entries (after a rename into it), to disk: the last step
    of every write that must survive a crash (registry objects, checkpoints)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
