"""`mlops monitor` never lies about what it saw (issue 21): typed garbage, unreadable and non-regular
files, a 200 MB line, bounds on durations and flags, losses counted from the capture counters.
The real CLI on capture files as the writer lays them out; the runs through a real `mlops serve`
(a lone surrogate, a 64 KB disk, a capture directory replaced by a file) are in test_monitor.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import make_project, mlops

from mlops.errors import ConfigError

N = 40  # above monitor.min_requests
TIMEOUT = 120.0  # a FIFO used to hang monitor forever; anything it does now ends well within this


def record(i: int, t: float, **kw: Any) -> dict[str, Any]:
    rng = random.Random(i)  # the shipped example's kind of input: lowercase words of 3-10 letters
    x = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))
    return {
        "v": 1, "id": f"cmpl-{i:08d}", "time": t, "source": "local", "release": None, "route": "completions",
        "status": 200, "latency_s": 0.01, "stream": False, "max_tokens": 8, "prompt_tokens": 4,
        "completion_tokens": 3, "finish_reason": "stop", "prompt_len": len(x) + 1, "output_len": len(x),
        "prompt": x + "=", "output": x[::-1],
    } | kw  # fmt: skip


def capture_dir(root: Path, t: float) -> Path:
    day = time.strftime("%Y-%m-%d", time.gmtime(t))
    d = root / ".mlops" / "monitor" / "capture" / day
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_lines(root: Path, lines: list[bytes], t: float) -> Path:
    path = capture_dir(root, t) / f"{int(t * 1000)}-{int(t * 1000) + 1000}-local-{uuid.uuid4().hex[:12]}.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project (no release: the reference is its data) with N good requests of the last minutes.
    Embedding drift off: it is not what these tests judge, and it loads MiniLM."""
    root = make_project(tmp_path_factory.mktemp("faults"), {"monitor": {"embedding_sample": 0}})
    t = time.time() - 300
    write_lines(root, [json.dumps(record(i, t + i)).encode() for i in range(N)], t)
    return root


@pytest.fixture
def root(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "p", symlinks=True))


def monitor(root: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    r = mlops("monitor", "--json", *args, cwd=root, timeout=TIMEOUT)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}, r.stderr


def test_records_with_a_field_of_the_wrong_type_are_skipped_and_counted(root: Path) -> None:
    t = time.time() - 200
    bad = [
        {"prompt_len": "abc"}, {"latency_s": "x"}, {"status": "x"}, {"completion_tokens": [1]},
        {"dropped_before": "x"}, {"time": "x"}, {"id": 5}, {"prompt": ["a"]}, {"status": True},
    ]  # fmt: skip
    write_lines(root, [json.dumps(record(1000 + i, t + i) | b).encode() for i, b in enumerate(bad)], t)
    rc, rep, err = monitor(root)
    assert rc == 0, err  # was: internal error, exit 4
    assert rep["requests"] == N and rep["skipped"]["lines"] == len(bad)


def test_unreadable_and_non_regular_files_are_skipped_not_waited_for(root: Path) -> None:
    t = time.time() - 200
    day = capture_dir(root, t)
    os.mkfifo(day / f"{int(t * 1000)}-{int(t * 1000)}-local-fifo.jsonl")  # was: monitor hung on it
    loop = day / f"{int(t * 1000)}-{int(t * 1000)}-local-loop.jsonl"
    loop.symlink_to(loop.name)  # opening it fails (a link loop), as mode 000 does for a user
    unreadable = 2
    if os.geteuid() != 0:  # root reads mode 000 anyway: there the link loop stands in for it
        locked = write_lines(root, [json.dumps(record(9999, t)).encode()], t)
        locked.chmod(0)
        unreadable += 1
    rc, rep, err = monitor(root)
    assert rc == 0, err
    assert rep["requests"] == N and rep["skipped"]["files"] == unreadable
    r = mlops("feedback", "cmpl-00000003", "cba", "--json", cwd=root, timeout=TIMEOUT)  # was: exit 4
    assert r.returncode == 0, r.stderr


# A fresh interpreter runs the command and reports its child's peak RSS (as benchmarks/bench_monitor.py).
PEAK = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def test_a_200_mb_prompt_line_is_skipped_in_bounded_memory(root: Path) -> None:
    """The issue's 200 MB captured prompt ran past 180 s at 11.5 GB. Memory is asserted (the
    budget is 500 MB); time is the benchmark's to measure, bounded here by TIMEOUT."""
    t = time.time() - 200
    path = capture_dir(root, t) / f"{int(t * 1000)}-{int(t * 1000) + 1000}-local-big.jsonl"
    block = b"a" * (8 << 20)
    with path.open("wb") as f:  # 25 blocks of 8 MB: the line is never built in this process either
        f.write(json.dumps(record(5000, t)).encode() + b"\n")
        f.write(b'{"v":1,"id":"cmpl-big","time":%.3f,"status":200,"prompt":"' % t)
        for _ in range(25):
            f.write(block)
        f.write(b'","output":"x","prompt_len":209715200,"output_len":1}\n')
        f.write(json.dumps(record(5001, t + 1)).encode() + b"\n")
    assert path.stat().st_size > 200 << 20
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "mlops.cli.main", "monitor", "--json"]
    env = os.environ | {"MLOPS_WANDB": "disabled"}
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stderr.strip().splitlines()[-1]) / 1024  # ru_maxrss: KiB on Linux
    assert peak_mb < 500, f"mlops monitor peaked at {peak_mb:.0f} MB"
    _, rep, _ = monitor(root)
    assert rep["requests"] == N + 2 and rep["skipped"]["lines"] == 1


def test_out_of_range_flags_exit_1_with_one_line(root: Path, tmp_path: Path) -> None:
    for args, says in [
        (["--since", "99999999d"], "at most 3650d"),
        (["--since", "9" * 300], "expected an age"),
        (["--since", "inf"], "expected an age"),
        (["--out", "/nonexistent/x.md"], "/nonexistent is not a directory"),
        (["--markdown-out", str(tmp_path / "no" / "x.md")], "is not a directory"),
        (["--release", "no-such-release"], "unknown release 'no-such-release'"),
        (["--reference", "2h..1h"], "--reference: no captured traffic"),  # was: verdict ok on 0 prompts
    ]:
        rc, _, err = monitor(root, *args)
        last = err.strip().splitlines()[-1]  # progress lines (•) may come before it
        assert rc == 1 and last.startswith("error: ") and says in last and "Traceback" not in err, (args, rc, err)
    assert not (tmp_path / "no").exists()


def test_durations_share_one_grammar_and_are_bounded(root: Path) -> None:
    from mlops.config import load

    cfg = root / "mlops.yaml"
    assert load(cfg, ["monitor.window=1d"]).cfg.monitor.window == 86400  # was refused, `--since 1d` was not
    assert load(cfg, ["monitor.window=2w"]).cfg.monitor.window == 14 * 86400
    for bad in ("flush_interval=0", "flush_interval=.inf", "flush_interval=.nan", "window=.inf", "window=0"):
        with pytest.raises(ConfigError, match=f"monitor.{bad.split('=')[0]}"):
            load(cfg, [f"monitor.{bad}"])
    r = mlops("validate", "--set", "monitor.flush_interval=0", cwd=root, timeout=TIMEOUT)
    assert r.returncode == 1 and "monitor.flush_interval" in r.stderr


def _counters(root: Path, t: float, **counts: int) -> None:
    """A counters side file as the capture writer leaves it (mlops/monitor/tally.py)."""
    from mlops.monitor.tally import FIELDS, counters_key

    minute = int(t // 60) * 60
    doc = {
        "v": 1, "writer": "w1", "source": "local", "updated": time.time(), "last_error": counts.pop("error", None),
        "minutes": {str(minute): dict.fromkeys(FIELDS, 0) | counts},
    }  # fmt: skip
    path = root / ".mlops" / counters_key(minute // 3600 * 3600, "local", "w1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_losses_above_the_limit_exit_4_and_no_traffic_with_answered_requests_is_not_green(root: Path) -> None:
    t = time.time() - 300
    _counters(root, t, answered=N + 10, captured=N, write=10, error="disk full (No space left on device)")
    rc, rep, err = monitor(root)
    assert rc == 4 and rep["verdict"] == "capture lost" and not rep["checks"]
    assert rep["capture"]["lost"]["write"] == 10 and rep["capture"]["answered"] == N + 10
    assert err.strip().splitlines()[-1] == (
        f"error: capture lost 10 of {N + 10} requests: disk full (No space left on device) "
        "(write 10; monitor.max_loss_rate: drift is not judged on partial traffic)"
    )
    rc, rep, _ = monitor(root, "--set", "monitor.max_loss_rate=0.5")  # under the limit: judged, losses shown
    assert rc == 0 and rep["verdict"] == "ok" and rep["capture"]["loss_rate"] == pytest.approx(10 / (N + 10))
    md = mlops("monitor", "--set", "monitor.max_loss_rate=0.5", cwd=root, timeout=TIMEOUT).stdout
    assert f"Capture: {N + 10} requests answered, {N} captured, 10 lost (write 10; " in md
    # every capture file gone (a directory replaced by a file): not "no traffic", exit 4
    shutil.rmtree(root / ".mlops" / "monitor" / "capture")
    (root / ".mlops" / "monitor" / "capture").write_text("")
    rc, rep, err = monitor(root)
    assert rc == 4 and rep["requests"] == 0 and rep["capture"]["lost"]["unreadable"] == N, err


def test_an_s3_capture_is_streamed_and_its_over_long_line_skipped(moto_endpoint: str) -> None:
    """S3 (moto's server on 127.0.0.1): the object is read in 1 MB pieces, never whole."""
    from conftest import S3_BUCKET

    from mlops.monitor.capture import chunk_key
    from mlops.monitor.traffic import CHUNK, load_window
    from mlops.registry.store import open_store

    store = open_store(f"s3://{S3_BUCKET}/faults-{uuid.uuid4().hex[:8]}")
    t = time.time() - 100
    lines = [json.dumps(record(i, t + i)).encode() for i in range(N)]
    long_line = json.dumps(record(N, t) | {"prompt": "a" * (3 << 20)}).encode()  # 3 MB: over MAX_LINE
    key = chunk_key(t, t + N, "gateway")
    store.put(key, b"\n".join([*lines[:5], long_line, b'{"id": "x", "time": "soon"}', *lines[5:]]) + b"\n")
    pieces = store.iter_chunks(key, CHUNK)  # type: ignore[attr-defined]
    sizes = [len(p) for p in pieces or []]
    assert len(sizes) >= 3 and max(sizes) <= CHUNK, sizes
    w = load_window(store, t - 1, t + N + 1)
    assert (len(w.records), w.skipped_lines, w.files) == (N, 2, 1)
