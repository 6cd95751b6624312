"""Issue 9, items 9 and 10: hostile config files and secrets from `${VAR}` in error messages.

Every hostile file gets exit 1 naming the file, fast and with bounded memory; a value that came
from the environment is never printed back, whichever field it landed in."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_project, mlops

GOOD = (REPO / "mlops.yaml").read_text()


def _validate_bounded(cfg: str | Path, cwd: Path, mem_mb: int = 1500) -> subprocess.CompletedProcess[str]:
    """`mlops validate` under an address-space cap, so a reader that slurps /dev/zero dies (not the box)."""

    def cap() -> None:
        lim = mem_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    env = os.environ | {"MLOPS_WANDB": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "mlops.cli.main", "validate", "--config", str(cfg)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        preexec_fn=cap,
    )


def _recursive(d: Path) -> Path:
    (d / "rec.yaml").write_text("a: &x [1, *x]\n")
    return d / "rec.yaml"


def _deep(d: Path) -> Path:
    (d / "deep.yaml").write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    return d / "deep.yaml"


def _nul(d: Path) -> Path:
    (d / "nul.yaml").write_bytes(b"\0" * 4096)
    return d / "nul.yaml"


def _sparse(d: Path) -> Path:
    p = d / "sparse.yaml"
    with p.open("wb") as f:
        f.truncate(1 << 30)  # 1 GB, no blocks on disk
    return p


def _big(d: Path) -> Path:
    p = d / "big.yaml"
    p.write_text(GOOD + "# " + "x" * (3 << 20) + "\n")
    return p


HOSTILE = {
    "dev-zero": (lambda d: Path("/dev/zero"), "too large"),
    "sparse-1GB": (_sparse, "too large"),
    "big-comment": (_big, "too large"),
    "recursive-alias": (_recursive, "recursive"),
    "deep-nesting": (_deep, "nested deeper"),
    "nul-bytes": (_nul, "NUL"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_config_exit_1_naming_the_file(tmp_path: Path, name: str) -> None:
    make, fragment = HOSTILE[name]
    path = make(tmp_path)
    t0 = time.monotonic()
    r = _validate_bounded(path, tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(path.name) in line and fragment in line, line
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert took < 60, took


def test_set_value_is_bounded_too(project: Path) -> None:
    r = mlops("validate", "--set", "project=&x [1, *x]", cwd=project)
    assert r.returncode == 1 and "--set project" in r.stderr and "recursive" in r.stderr, r.stderr


SECRET = "sk-live-9f8e7d6c5b4a39281706"


@pytest.mark.parametrize(
    ("field", "old", "new", "command"),
    [
        ("backend", "backend: local", "backend: ${MLOPS_PLANTED}", "validate"),
        ("storage scheme", "storage: .mlops", "storage: ${MLOPS_PLANTED}://bucket/x", "releases"),
        ("deploy.model", "  model: tiny\n", "  model: ${MLOPS_PLANTED}\n", "validate"),
        ("dataset path", "path: data/train.jsonl", "path: data/${MLOPS_PLANTED}.jsonl", "validate"),
        ("s3 bucket", "storage: .mlops", "storage: s3://${MLOPS_PLANTED}/reg", "releases"),
        ("eval dataset", "    dataset: heldout\n", "    dataset: ${MLOPS_PLANTED}\n", "validate"),
        ("metric name", "    - exact_match\n", "    - pre-${MLOPS_PLANTED}\n", "validate"),
        ("gate metric", "  metric: latency\n", "  metric: ${MLOPS_PLANTED}\n", "validate"),
    ],
)
def test_env_values_never_printed_in_errors(tmp_path: Path, field: str, old: str, new: str, command: str) -> None:
    root = make_project(tmp_path / "p")
    text = (root / "mlops.yaml").read_text()
    assert old in text, old
    (root / "mlops.yaml").write_text(text.replace(old, new, 1))
    env = {
        "MLOPS_PLANTED": SECRET,
        # S3 at a closed port: the store fails fast, and its error names the bucket
        "MLOPS_S3_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_MAX_ATTEMPTS": "1",
    }
    r = mlops(command, cwd=root, env=env, timeout=120)
    assert r.returncode in (1, 4), (field, r.returncode, r.stderr[-1500:])
    out = r.stdout + r.stderr
    assert "error:" in r.stderr, r.stderr
    for piece in (SECRET, SECRET[:12], SECRET[-12:]):
        assert piece not in out, (field, out[-1500:])
    assert "$MLOPS_PLANTED" in r.stderr, (field, r.stderr[-1500:])
