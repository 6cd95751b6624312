"""Reading registry documents that may be damaged, and the locks that tell a live writer from a dead one.

A truncated or unreadable registry file is named with a pointer to `mlops doctor` (exit 4), never
an `internal error: JSONDecodeError`. A writer that creates files which only make sense once it
finishes (an artifact upload, a training output) holds an flock beside them while it works: the
kernel drops it when the process dies, even on `kill -9`, so a sweeper can tell an orphan from
work in progress without trusting clocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlops.errors import InfraError

DOCTOR_HINT = "run `mlops doctor` to see what can be repaired, `mlops doctor --repair` to repair it"


class RegistryDamaged(InfraError):
    """A registry document cannot be read: the headline names it and points to `mlops doctor`."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"registry file {where} is damaged ({why}): {DOCTOR_HINT}")
        self.where = where


def parse(data: bytes) -> tuple[Any, str | None]:
    """(document, None) or (None, why it is not a JSON document)."""
    try:
        return json.loads(data.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 at byte {e.start}"
    except ValueError as e:
        why = "empty" if not data.strip() else f"invalid JSON: {str(e).split(':')[0]}"
        return None, why if len(data) else "empty"


def loads(data: bytes, where: str, expect: type = object) -> Any:
    doc, why = parse(data)
    if why is None and not isinstance(doc, expect):
        why = f"expected a JSON {expect.__name__}, got {type(doc).__name__}"
    if why is not None:
        raise RegistryDamaged(where, why)
    return doc


@contextlib.contextmanager
def working(lock: Path) -> Iterator[None]:
    """Hold an flock on `lock` while creating what it guards (see `abandoned`)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InfraError(f"cannot write {lock.parent}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def abandoned(lock: Path) -> bool:
    """True unless a live process holds `lock` (a missing lock file: nobody is working there)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
