"""The server's state watcher survives a bad read: it logs it, retries with backoff, keeps serving
its last good state, says so on /health, and follows the next good state (a later rollback).

Against a real S3 API (moto's server on 127.0.0.1) and the local store; servers run in this
process on free ports and every one is stopped by its test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import conftest
import httpx
from conftest import S3_BUCKET as BUCKET
from conftest import Trained, make_project, mlops, train_and_publish, wait_for

from mlops.serving.pool import ReleasePool

WAIT_S = 30.0  # bound on every wait (a loaded 2-core machine; the backoff is at most 5 s)


@contextlib.contextmanager
def serving(root: Path) -> Iterator[tuple[str, ReleasePool]]:
    # "stale" within the test (default 10 s), still above S3 re-reads (1 s)
    with conftest.serving(root, stale_after=3.0) as s:
        yield s.url, s.pool


def health(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/health", timeout=WAIT_S)
    assert r.status_code == 200
    return dict(r.json())


def answered_by(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab=", "max_tokens": 4}, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return r.headers["x-mlops-release"]


def test_s3_watcher_survives_an_unreadable_state_and_follows_a_later_rollback(
    moto_endpoint: str, tmp_path: Path
) -> None:
    import boto3

    prefix = f"w-{uuid.uuid4().hex[:8]}"
    root = make_project(tmp_path / "p", {"storage": f"s3://{BUCKET}/{prefix}"})
    a = train_and_publish(root, seed=0, steps=5)  # any weights will do: only who answers matters
    b = train_and_publish(root, seed=1, steps=5)  # production b, previous a
    s3 = boto3.session.Session().client("s3", endpoint_url=moto_endpoint)
    key = f"{prefix}/state.json"
    good = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with serving(root) as (url, _):
        assert answered_by(url) == b and health(url)["state_error"] is None
        s3.put_object(Bucket=BUCKET, Key=key, Body=good[: len(good) // 2])  # a partial object
        wait_for(lambda: health(url)["state_error"] is not None, "/health to report the failed read")
        h = health(url)
        # the registry names the damaged file (mlops doctor's wording); a raw decode error is the older form
        assert "state.json is damaged" in h["state_error"] or "JSONDecodeError" in h["state_error"], h
        assert h["state_version"] > 0
        wait_for(lambda: health(url)["stale"], "/health to say the state is stale")
        assert answered_by(url) == b  # the last good state is still served
        s3.put_object(Bucket=BUCKET, Key=key, Body=good)  # the store heals ...
        r = mlops("rollback", "--to", a, cwd=root, timeout=180)  # ... and an operator rolls back
        assert r.returncode == 0, r.stderr
        wait_for(lambda: answered_by(url) == a, "the server to follow the rollback")
        h = health(url)
        assert h["state_error"] is None and not h["stale"] and h["stages"]["production"] == a


def test_local_watcher_keeps_the_last_good_state_through_a_truncated_file(trained: Trained) -> None:
    state = trained.root / ".mlops" / "state.json"
    good = state.read_bytes()
    with serving(trained.root) as (url, pool):
        version = health(url)["state_version"]
        try:
            state.write_bytes(good[:7])  # a torn write (or a hand edit gone wrong)
            assert answered_by(url) == trained.release  # the request path reads it: still served
            wait_for(lambda: health(url)["state_error"] is not None, "/health to report the failed read")
            assert health(url)["state_version"] == version and pool._watcher.is_alive()
        finally:
            state.write_bytes(good)
        wait_for(lambda: health(url)["state_error"] is None, "the watcher to read the healed file")
        assert answered_by(url) == trained.release and pool._watcher.is_alive()
