"""Issue 9 item 8: a damaged registry. Every command names the damaged file and points to
`mlops doctor` (exit 4, never an internal error); `mlops doctor` is a dry run that changes nothing,
`--repair` repairs what can be repaired and records it; disk full leaves no orphan artifact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_project, mlops, train_and_publish

FAST = {"models": {"tiny": {"train": {"steps": 4}}}}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A project whose registry holds production B and previous A (copied per test)."""
    root = make_project(tmp_path_factory.mktemp("doctor"), FAST)
    a = train_and_publish(root, seed=0)
    b = train_and_publish(root, seed=1)
    return root, a, b


@pytest.fixture
def proj(template: tuple[Path, str, str], tmp_path: Path) -> tuple[Path, str, str]:
    root, a, b = template
    dest = tmp_path / "p"
    shutil.copytree(root, dest, symlinks=True)
    return dest, a, b


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def releases(root: Path) -> dict[str, object]:
    r = mlops("releases", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def snapshot(root: Path) -> dict[str, bytes]:
    reg = root / ".mlops"
    return {
        str(p.relative_to(reg)): p.read_bytes()
        for p in reg.rglob("*")
        if p.is_file() and "cache" not in p.parts and p.name != ".lock"
    }


def state_file(root: Path, a: str, b: str) -> Path:
    return root / ".mlops" / "state.json"


def manifest_a(root: Path, a: str, b: str) -> Path:
    return root / ".mlops" / "releases" / a / "manifest.json"


def history_b(root: Path, a: str, b: str) -> Path:
    """B's newest event object (its promotion)."""
    return sorted((root / ".mlops" / "releases" / b / "events").glob("*.json"))[-1]


def manifest_b(root: Path, a: str, b: str) -> Path:
    return root / ".mlops" / "releases" / b / "manifest.json"


# (damage, the file it names, the command that must point to doctor, what the repaired registry shows)
CASES: dict[str, tuple[Callable[[Path, str, str], Path], str, list[str]]] = {
    "truncated state": (state_file, "state.json", ["releases"]),
    "truncated manifest": (manifest_a, "manifest.json", ["releases"]),
    "truncated history": (history_b, "/events/", ["history", "<b>"]),
    "deleted production manifest": (manifest_b, "manifest.json", ["rollback"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_registry_points_to_doctor_which_repairs_it(proj: tuple[Path, str, str], case: str) -> None:
    root, a, b = proj
    where, name, command = CASES[case]
    target = where(root, a, b)
    if case.startswith("deleted"):
        target.unlink()
    else:
        truncate(target)

    r = mlops(*[b if c == "<b>" else c for c in command], cwd=root)
    assert r.returncode == 4, (case, r.returncode, r.stderr)
    line = r.stderr.strip().splitlines()[-1]
    assert name in line and "mlops doctor" in line and "internal error" not in r.stderr, line

    before = snapshot(root)
    dry = mlops("doctor", "--json", cwd=root)
    assert dry.returncode == 4, dry.stderr
    report = json.loads(dry.stdout)
    assert report["findings"] and not any(f["repaired"] for f in report["findings"]), report
    assert snapshot(root) == before, "the dry run changed the registry"

    fix = mlops("doctor", "--repair", cwd=root)
    assert fix.returncode == 0, (fix.stdout, fix.stderr)
    assert mlops("doctor", cwd=root).returncode == 0, "damage left after --repair"

    rel = releases(root)
    ids = [m["id"] for m in rel["releases"]]  # type: ignore[union-attr]
    if case == "truncated manifest":  # A is gone (its manifest moved aside); B still serves
        assert rel["production"] == b and a not in ids and rel["previous"] is None
        assert not (root / ".mlops" / "artifacts" / a).exists(), "its artifact became an orphan and was removed"
    elif case == "deleted production manifest":  # production falls back to previous
        assert rel["production"] == a and rel["routing"] == {a: 100} and b not in ids
    else:
        assert (rel["production"], rel["previous"]) == (b, a) and rel["routing"] == {b: 100}
    prod = str(rel["production"])
    events = [e["event"] for e in next(m for m in rel["releases"] if m["id"] == prod)["history"]]  # type: ignore[union-attr]
    assert "doctor_repair" in events, events
    if case == "truncated history":
        assert events[0] == "registered", "complete events were salvaged"


def test_doctor_removes_orphans_and_tmp_files(proj: tuple[Path, str, str]) -> None:
    root, a, b = proj
    reg = root / ".mlops"
    (reg / "artifacts" / "tiny-orphan").mkdir()
    (reg / "artifacts" / "tiny-orphan" / "model.safetensors").write_bytes(b"x" * 100)
    tmp = reg / f".state.json.{os.getpid()}.tmp"
    tmp.write_bytes(b"{")
    os.utime(tmp, (time.time() - 60, time.time() - 60))
    dry = json.loads(mlops("doctor", "--json", cwd=root).stdout)
    assert {f["kind"] for f in dry["findings"]} == {"orphan_artifact", "tmp_file"}, dry
    assert mlops("doctor", "--repair", cwd=root).returncode == 0
    assert not (reg / "artifacts" / "tiny-orphan").exists() and not tmp.exists()
    assert releases(root)["production"] == b


PUBLISH = r"""
import resource, sys
from pathlib import Path
from mlops.errors import MlopsError
from mlops.registry.releases import Registry
from mlops.registry.store import LocalStore
src, dest, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
reg = Registry(LocalStore(dest))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # the disk is full past `limit` bytes a file
try:
    reg.publish("tiny-diskfull", src, {"model": "tiny"})
except MlopsError as e:
    print(f"error: {e.headline}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_disk_full_while_publishing_is_exit_4_and_leaves_no_orphan(proj: tuple[Path, str, str], tmp_path: Path) -> None:
    root, a, b = proj
    src = root / ".mlops" / "artifacts" / a
    biggest = max(p.stat().st_size for p in src.rglob("*") if p.is_file())
    dest = tmp_path / "full"
    r = subprocess.run(
        [sys.executable, "-c", PUBLISH, str(src), str(dest), str(biggest // 2)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 4, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (dest / "artifacts" / "tiny-diskfull").exists(), "an orphan artifact directory was left"
    assert not (dest / "releases" / "tiny-diskfull").exists()
