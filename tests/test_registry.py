"""Releases and state: immutable manifests, artifacts before manifests, CAS pointers, integrity checks."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

import mlops
from mlops.errors import ConflictError, IntegrityError, UsageError
from mlops.registry import events
from mlops.registry.damage import RegistryDamaged
from mlops.registry.doctor import examine, repair
from mlops.registry.releases import Registry, State
from mlops.registry.store import LocalStore


def artifact(tmp: Path, content: bytes = b"weights") -> Path:
    d = tmp / "art"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(content)
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(LocalStore(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_publish_writes_artifact_then_immutable_manifest(reg: Registry, tmp_path: Path) -> None:
    m = reg.publish("r1", artifact(tmp_path), {"model": "tiny", "lineage": {"fingerprint": "f"}})
    assert set(m["artifact"]["files"]) == {"model.safetensors", "config.json"}
    assert reg.verify("r1")["id"] == "r1"
    with pytest.raises(ConflictError):
        reg.publish("r1", artifact(tmp_path, b"other"), {"model": "tiny"})
    assert reg.manifest("r1") == {k: v for k, v in m.items()}
    assert [e["event"] for e in reg.history("r1")] == ["registered"]
    assert reg.find_by_fingerprint("tiny", "f")["id"] == "r1"  # type: ignore[index]


def test_crash_before_manifest_leaves_no_release(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_put = reg.store.put

    def crash(key: str, data: bytes, **kw: object) -> str:
        if key.endswith("manifest.json"):
            raise OSError("power cut")
        return real_put(key, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reg.store, "put", crash)
    with pytest.raises(OSError):
        reg.publish("r2", artifact(tmp_path), {"model": "tiny"})
    monkeypatch.undo()
    assert reg.release_ids() == []
    with pytest.raises(IntegrityError, match="no manifest"):
        reg.update_state(lambda st: State(stages=st.stages | {"production": "r2"}, routing={"r2": 100}), reason="x")
    assert reg.read_state()[0].version == 0


def test_pickle_weights_are_refused(reg: Registry, tmp_path: Path) -> None:
    d = artifact(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(IntegrityError, match="safetensors"):
        reg.publish("r3", d, {"model": "tiny"})
    assert reg.release_ids() == []


def test_verify_detects_corrupt_and_missing_files(reg: Registry, tmp_path: Path) -> None:
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})
    p = reg.store.local_path("artifacts/r1/model.safetensors")
    assert p is not None
    p.write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="sha256"):
        reg.verify("r1")
    p.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        reg.artifact_dir("r1")
    with pytest.raises(UsageError, match="unknown release"):
        reg.verify("nope")


def test_state_cas_under_concurrency_loses_no_update(reg: Registry, tmp_path: Path) -> None:
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})

    def bump() -> None:
        for _ in range(10):
            reg.update_state(lambda st: st, reason="bump")

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert reg.read_state()[0].version == 60


def test_state_rejects_bad_weights(reg: Registry, tmp_path: Path) -> None:
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})
    with pytest.raises(UsageError, match="sum to 100"):
        reg.update_state(lambda st: State(routing={"r1": 50}), reason="bad")


def test_remote_store_artifacts_are_downloaded_and_checked(tmp_path: Path) -> None:
    """A store without local paths (like S3) goes through the cache, verified by sha256."""

    class Remote(LocalStore):
        def local_path(self, key: str) -> Path | None:
            return None

    reg = Registry(Remote(tmp_path / "remote"), cache_dir=tmp_path / "cache")
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})
    d = reg.artifact_dir("r1")
    assert d.is_relative_to(tmp_path / "cache") and (d / "model.safetensors").read_bytes() == b"weights"
    (tmp_path / "remote/artifacts/r1/model.safetensors").write_bytes(b"evil")
    with pytest.raises(IntegrityError):
        reg.artifact_dir("r1")


def test_finding_a_release_reads_the_index_not_every_manifest_and_history(reg: Registry, tmp_path: Path) -> None:
    for i in range(3):
        reg.publish(f"r{i}", artifact(tmp_path), {"model": "tiny", "lineage": {"fingerprint": f"f{i}"}})
    # a registry from before the index: r0's entry is missing, and is added back from its manifest
    (tmp_path / "store" / "index" / "releases" / "r0.json").unlink()
    assert {e["id"] for e in reg.index()} == {"r0", "r1", "r2"}
    assert (tmp_path / "store" / "index" / "releases" / "r0.json").is_file()
    read: list[str] = []
    get = reg.store.get

    def counting_get(key: str):  # type: ignore[no-untyped-def]
        read.append(key)
        return get(key)

    reg.store.get = counting_get  # type: ignore[method-assign]
    assert reg.find_by_fingerprint("tiny", "f1")["id"] == "r1"  # type: ignore[index]
    assert not [k for k in read if k.endswith(("history.json", "/manifest.json")) and "/r1/" not in k], read
    assert reg.find_by_fingerprint("tiny", "nope") is None


def _as_old_code_left_it(reg: Registry, tmp_path: Path, rid: str, hist: list[dict[str, object]]) -> None:
    """A release as registries before event objects held it: history.json, an index entry without status."""
    root = tmp_path / "store"
    shutil.rmtree(root / "releases" / rid / "events")
    (root / "releases" / rid / "history.json").write_text(json.dumps(hist, indent=2, sort_keys=True))
    entry = json.loads((root / "index" / "releases" / f"{rid}.json").read_text())
    entry = {k: entry[k] for k in ("id", "model", "created_at", "fingerprint")}
    (root / "index" / "releases" / f"{rid}.json").write_text(json.dumps(entry, indent=2, sort_keys=True))


OLD = [
    {"at": "2026-01-01T00:00:00.000Z", "event": "registered", "by": "pipeline"},
    {"at": "2026-01-01T00:01:00.000Z", "event": "evaluated", "by": "pipeline", "detail": {"summary": {"s": {"m": 1}}}},
    {"at": "2026-01-01T00:02:00.000Z", "event": "promoted", "by": "pipeline", "detail": {"reason": "gates passed"}},
]


def test_a_registry_from_before_event_objects_reads_back_and_migrates_on_read(reg: Registry, tmp_path: Path) -> None:
    reg.publish("r1", artifact(tmp_path), {"model": "tiny", "lineage": {"git_sha": "abc"}})
    _as_old_code_left_it(reg, tmp_path, "r1", OLD)
    assert reg.history("r1") == OLD
    [e] = reg.list()
    assert (e["status"], e["summary"], e["git_sha"]) == ("promoted", {"s": {"m": 1}}, "abc")
    reg.append_event("r1", "rolled_back_to", by="ops", reason="drill")
    assert [h["event"] for h in reg.history("r1")] == ["registered", "evaluated", "promoted", "rolled_back_to"]
    assert reg.list()[0]["status"] == "rolled_back_to"
    assert json.loads((tmp_path / "store/releases/r1/history.json").read_text()) == OLD, (
        "the old list is never rewritten"
    )


def test_doctor_moves_a_damaged_event_aside_and_keeps_the_others(reg: Registry, tmp_path: Path) -> None:
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})
    reg.append_event("r1", "evaluated", summary={})
    reg.append_event("r1", "promoted")
    [key] = [k for k in events.event_keys(reg.store, "r1") if b'"promoted"' in reg.store.get(k).data]  # type: ignore[union-attr]
    path = tmp_path / "store" / key
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RegistryDamaged, match=key):
        reg.history("r1")
    found = examine(reg)
    assert [(f.kind, f.key) for f in found] == [("damaged_event", key)]
    repair(reg, found, actor="doctor:test")
    assert [e["event"] for e in reg.history("r1")] == ["registered", "evaluated", "doctor_repair"]
    assert (tmp_path / "store" / f"{key}.damaged").is_file() and examine(reg) == []


def test_doctor_salvages_a_damaged_history_json_of_an_old_registry(reg: Registry, tmp_path: Path) -> None:
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})
    _as_old_code_left_it(reg, tmp_path, "r1", OLD)
    path = tmp_path / "store/releases/r1/history.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(RegistryDamaged, match="history.json"):
        reg.history("r1")
    found = examine(reg)
    assert [f.kind for f in found] == ["damaged_history"]
    repair(reg, found, actor="doctor:test")
    assert [e["event"] for e in reg.history("r1")] == ["registered", "doctor_repair"]
    assert examine(reg) == []


def test_flows_write_history_only_through_their_backend() -> None:
    """One door: state through `Router.set_state`, events through `Router.record`; only the
    registry itself (and that door) calls `append_event`."""
    pkg = Path(mlops.__file__).parent
    door = {pkg / "backends" / "base.py"}
    offenders = [
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if ".append_event(" in p.read_text() and p.parent.name != "registry" and p not in door
    ]
    assert offenders == []


def test_an_evaluation_noted_after_a_later_event_still_sets_the_summary(reg: Registry, tmp_path: Path) -> None:
    """Two writers: the later event's status is noted first, the earlier evaluation's summary after."""
    reg.publish("r1", artifact(tmp_path), {"model": "tiny"})
    reg.append_event("r1", "promoted")
    [registered, promoted] = [k.rsplit("/", 1)[1] for k in events.event_keys(reg.store, "r1")]
    earlier = registered.replace(".json", "0.json")  # sorts between the two
    events.note(reg.store, "r1", earlier, {"status": "evaluated", "summary": {"s": {"m": 0.5}}})
    [e] = reg.list()
    assert (e["status"], e["head"], e["summary"]) == ("promoted", promoted, {"s": {"m": 0.5}})
