"""One contract for every Store: LocalStore on a directory, S3Store against a real moto server."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import S3_BUCKET

from mlops.errors import ConflictError, InfraError
from mlops.registry.releases import Registry
from mlops.registry.store import Blob, LocalStore, Store, open_store

BUCKET = S3_BUCKET


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("moto_endpoint")
    from mlops.registry.s3 import S3Store  # boto3 is the optional `cloud` extra: import after the skip

    # A fresh prefix per test keeps tests independent while sharing one bucket.
    return S3Store(BUCKET, f"t-{uuid.uuid4().hex[:8]}")


def test_round_trip(store: Store) -> None:
    etag = store.put("a/b.json", b'{"x": 1}')
    blob = store.get("a/b.json")
    assert blob is not None
    assert blob.data == b'{"x": 1}'
    assert blob.etag == etag


def test_missing_key_is_none(store: Store) -> None:
    assert store.get("nope/missing") is None


def test_delete(store: Store) -> None:
    store.put("k", b"v")
    store.delete("k")
    assert store.get("k") is None
    store.delete("k")  # deleting what is gone is not an error


def test_if_none_match_on_existing_key_conflicts(store: Store) -> None:
    store.put("ptr", b"old", if_none_match=True)
    with pytest.raises(ConflictError):
        store.put("ptr", b"new", if_none_match=True)
    blob = store.get("ptr")
    assert blob is not None and blob.data == b"old"


def test_if_match_stale_etag_conflicts(store: Store) -> None:
    stale = store.put("ptr", b"v1")
    current = store.put("ptr", b"v2")
    with pytest.raises(ConflictError):
        store.put("ptr", b"v3", if_match=stale)
    blob = store.get("ptr")
    assert blob is not None and blob.data == b"v2" and blob.etag == current


def test_if_match_current_etag_succeeds(store: Store) -> None:
    current = store.put("ptr", b"v1")
    new = store.put("ptr", b"v2", if_match=current)
    blob = store.get("ptr")
    assert blob is not None and blob.data == b"v2" and blob.etag == new != current


def test_if_match_on_missing_key_conflicts(store: Store) -> None:
    etag = store.put("ptr", b"v1")
    store.delete("ptr")
    with pytest.raises(ConflictError):
        store.put("ptr", b"v2", if_match=etag)
    assert store.get("ptr") is None


def test_concurrent_compare_and_swap_loses_no_update(store: Store) -> None:
    threads, increments = 8, 10
    store.put("counter", b"0", if_none_match=True)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(increments):
                while True:
                    blob = store.get("counter")
                    assert blob is not None
                    try:
                        store.put("counter", str(int(blob.data) + 1).encode(), if_match=blob.etag)
                        break
                    except ConflictError:
                        continue
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    blob = store.get("counter")
    assert blob is not None and int(blob.data) == threads * increments


def test_list_is_relative_sorted_and_scoped(store: Store) -> None:
    for key in ["runs/b", "runs/a/2", "runs/a/1", "runs2/x", "other"]:
        store.put(key, b".")
    assert store.list("runs") == ["runs/a/1", "runs/a/2", "runs/b"]
    assert store.list("runs/a/") == ["runs/a/1", "runs/a/2"]
    assert store.list("") == ["other", "runs/a/1", "runs/a/2", "runs/b", "runs2/x"]
    assert store.list("absent") == []


def test_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    store.put_file("models/m/model.bin", src)
    dst = tmp_path / "out" / "model.bin"
    store.get_file("models/m/model.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert [p.name for p in dst.parent.iterdir()] == ["model.bin"]  # no temp file left behind


def test_get_file_missing_raises_infra(store: Store, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "missing.bin"
    with pytest.raises(InfraError):
        store.get_file("models/none.bin", dst)
    assert not dst.exists()
    assert list(dst.parent.glob("*")) == []  # no temp file left behind (glob of a missing dir is empty)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_unreachable_endpoint_fails_fast(moto_endpoint: str) -> None:
    from mlops.registry.s3 import S3Store

    store = S3Store(
        BUCKET,
        "p",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        connect_timeout=1,
        read_timeout=1,
        max_attempts=1,
    )
    start = time.monotonic()
    with pytest.raises(InfraError) as info:
        store.get("k")
    assert time.monotonic() - start < 5
    assert "\n" not in info.value.headline and "testing" not in info.value.headline
    assert f"s3://{BUCKET}/p/k" in info.value.headline


def test_s3_missing_bucket_is_infra_error(moto_endpoint: str) -> None:
    from mlops.registry.s3 import S3Store

    with pytest.raises(InfraError) as info:
        S3Store("no-such-bucket").put("k", b"v")
    assert "NoSuchBucket" in info.value.headline
    assert not isinstance(info.value, ConflictError)


def test_open_store_s3_uri(moto_endpoint: str) -> None:
    from mlops.registry.s3 import S3Store

    store = open_store(f"s3://{BUCKET}/some/prefix")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == (BUCKET, "some/prefix", f"s3://{BUCKET}/some/prefix")
    assert store.local_path("k") is None


# ---------------------------------------------------------------------------- release history on each store


def _published(store: Store, tmp_path: Path, n: int) -> Registry:
    art = tmp_path / "art"
    art.mkdir(exist_ok=True)
    (art / "model.safetensors").write_bytes(b"w")
    reg = Registry(store, cache_dir=tmp_path / "cache")
    for i in range(n):
        reg.publish(f"r{i}", art, {"model": "tiny", "created_at": f"2026-01-0{i + 1}T00:00:00Z"})
    return reg


def test_concurrent_appenders_lose_no_event(store: Store, tmp_path: Path) -> None:
    """Each event is its own object (if-none-match): writers never contend on one document."""
    reg = _published(store, tmp_path, 1)
    threads, each = 6, 8
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(each):
                reg.append_event("r0", "canary_step", by=f"w{w}", i=i)
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not errors, errors
    hist = reg.history("r0")
    assert hist[0]["event"] == "registered" and len(hist) == 1 + threads * each
    got = sorted((e["by"], e["detail"]["i"]) for e in hist[1:])
    assert got == sorted((f"w{w}", i) for w in range(threads) for i in range(each))
    for w in range(threads):  # one writer's events keep their order
        assert [e["detail"]["i"] for e in hist if e["by"] == f"w{w}"] == list(range(each))
    reg.append_event("r0", "promoted", by="x")
    assert reg.list()[0]["status"] == "promoted"


class CountingStore:
    """The real store, with every `get` recorded."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.uri, self.read = inner, inner.uri, list[str]()

    def get(self, key: str) -> Blob | None:
        self.read.append(key)
        return self.inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_listing_releases_reads_no_manifest_or_history(store: Store, tmp_path: Path) -> None:
    counting = CountingStore(store)
    reg = _published(counting, tmp_path, 3)  # type: ignore[arg-type]
    reg.append_event("r1", "evaluated", suites=["s"], summary={"s": {"exact_match": 0.5}})
    reg.append_event("r2", "rejected", by="pipeline:gates")
    counting.read.clear()
    items = reg.list()
    assert [(e["id"], e["status"]) for e in items] == [("r2", "rejected"), ("r1", "evaluated"), ("r0", "registered")]
    assert items[1]["summary"] == {"s": {"exact_match": 0.5}}
    assert counting.read and all(k.startswith("index/releases/") for k in counting.read), counting.read
