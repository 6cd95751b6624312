"""The disk caches: what makes an unchanged rerun cost no endpoint and no judge calls.

Both are best-effort: a torn, foreign or unreadable file is a miss (asked again), and a write
that fails costs the next run its cache, never this run its answer. Writes are atomic (a temp
file renamed into place), so a reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any


def cache_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileCache:
    """One JSON file per key (`root/ab/abcd....json`): for answers that arrive one at a time from
    many tasks and processes (the judge client), where a per-run segment would be lost on a crash."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a torn or foreign file: treat as a miss, it will be rewritten
        return data if isinstance(data, dict) else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Raises OSError when the disk refuses (the caller decides whether that is worth a log line)."""
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, ensure_ascii=False).encode("utf-8"))


class SegmentCache:
    """The eval harness's answers of the endpoint, keyed by (release, request), a directory per release.

    Each run that asked the endpoint adds one segment file (JSON lines of key and answer), written
    once at the end: one file per run rather than one per case keeps the event loop free of file
    system calls while requests are in flight (200 small files cost ~0.2 s of blocking calls on a
    loaded machine). A run reads its release's segments once. Not fsynced: a torn or missing
    segment only costs the next run some calls. Past MAX_SEGMENTS, a run merges them into one.
    """

    MAX_SEGMENTS = 16

    def __init__(self, root: Path | None) -> None:
        self.root = root

    key = staticmethod(cache_key)

    def _dir(self, release: str) -> Path:
        assert self.root is not None
        return self.root / self.key("release", release)[:24]

    def load(self, release: str) -> dict[str, dict[str, Any]]:
        """Every cached answer for `release`, by request key."""
        if self.root is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        try:
            segments = sorted(self._dir(release).glob("*.jsonl"))
        except OSError:
            return {}
        for seg in segments:
            try:
                lines = seg.read_bytes().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    row = json.loads(line)
                    out[str(row["k"])] = dict(row["v"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line: that answer is asked again
        return out

    def save(self, release: str, entries: dict[str, dict[str, Any]]) -> None:
        """Add `entries` as one new segment (or merge all segments when there are too many)."""
        if self.root is None or not entries:
            return
        d = self._dir(release)
        try:
            d.mkdir(parents=True, exist_ok=True)
            old = sorted(d.glob("*.jsonl"))
            merge = len(old) >= self.MAX_SEGMENTS
            rows = (self.load(release) | entries) if merge else entries
            blob = b"".join(json.dumps({"k": k, "v": v}).encode() + b"\n" for k, v in rows.items())
            write_atomic(d / f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(3)}.jsonl", blob)
            if merge:
                for seg in old:
                    seg.unlink(missing_ok=True)
        except OSError:  # a full or read-only disk costs the next run its cache, not this run
            pass
