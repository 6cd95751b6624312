"""Resumable training: a run killed with SIGKILL resumes from its last checkpoint and ends with the
same weights, bit for bit, as a run that was never interrupted; checkpoints are atomic, never
loaded across fingerprints or code versions, and never unpickled."""

from __future__ import annotations

import json
import os
import pickle
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, train_job

from mlops.registry.releases import sha256_file
from mlops.training.checkpoint import Checkpointer
from mlops.training.train import TrainJob, train_model

# The child trains and reports each step; at `stop` it parks on stdin, where the test kills it. On
# SIGUSR1 it writes its threads' stacks to argv[3], so a stall explains itself in the failure message.
CHILD = """
import faulthandler, json, signal, sys
dump = open(sys.argv[3], "w")
faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
from mlops.training.train import TrainJob, train_model
job, stop = TrainJob(**json.loads(sys.argv[1])), int(sys.argv[2])
def progress(d):
    print(f"step {int(d['step'])}", flush=True)
    if int(d["step"]) == stop:
        sys.stdin.readline()
r = train_model(job, progress)
print(f"done resumed_from={r.resumed_from_step}", flush=True)
"""


def job(out: Path, **kw: object) -> TrainJob:
    return train_job(out, **({"steps": 12, "batch_size": 8} | kw))


def child_stacks(proc: subprocess.Popen[bytes], dump: Path) -> str:
    """The child's stacks, asked for with SIGUSR1 (faulthandler writes them from its signal handler)."""
    if proc.poll() is not None or not dump.exists():
        return f"(none: the child {'exited with ' + str(proc.returncode) if proc.poll() is not None else 'had not started'})"
    proc.send_signal(signal.SIGUSR1)
    seen, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline and not 0 < seen == dump.stat().st_size:  # written, then no longer growing
        seen = dump.stat().st_size
        time.sleep(0.2)  # polling a file the handler writes: no other event to wait on (a diagnostic only)
    return dump.read_text()


def run_child(j: TrainJob, stop: int, dump: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start the child; read its lines until `step {stop}` (or its end), within a bounded wait.

    Reads raw bytes (os.read) and splits lines here: a buffered readline() after select() may take
    several lines off the pipe at once and return one, leaving `step {stop}` in Python's buffer where
    select() never sees it while the parked child writes nothing more (what a loaded box did)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, j.model_dump_json(), str(stop), str(dump)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    fd, pending, lines = proc.stdout.fileno(), b"", []
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + 180
    try:
        while True:
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                lines.append(line.decode().strip())
                if lines[-1] == f"step {stop}":
                    return proc, lines
            left = deadline - time.monotonic()
            if left <= 0:
                stacks = child_stacks(proc, dump)
                proc.kill()
                proc.wait(timeout=30)
                raise AssertionError(f"child made no progress in 180 s: {lines[-3:]}; its stacks:\n{stacks}")
            if sel.select(timeout=left):
                chunk = os.read(fd, 65536)
                if not chunk:  # the child closed its stdout: it ended
                    lines += [b.decode().strip() for b in pending.splitlines()]
                    return proc, lines
                pending += chunk
    finally:
        sel.close()


def test_sigkill_mid_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    every, steps = 3, 12
    kill_at = random.Random(20261130).randint(every, steps - 1)  # seeded, bounded: a step after a checkpoint
    runs = tmp_path / "runs"
    interrupted = job(tmp_path / "a", steps=steps, runs_dir=str(runs), checkpoint_every_steps=every)

    proc, lines = run_child(interrupted, kill_at, tmp_path / "stacks-1.txt")
    try:
        assert lines[-1] == f"step {kill_at}", lines
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    last = kill_at // every * every
    kept = sorted(p.name for p in runs.glob("*/ckpt-*"))
    assert kept[-1] == f"ckpt-{last:08d}" and len(kept) <= 2, kept  # the newest two are kept
    assert not (tmp_path / "a" / "model.safetensors").exists()  # killed before any artifact

    proc, lines = run_child(interrupted, -1, tmp_path / "stacks-2.txt")  # started again: same fingerprint
    assert proc.wait(timeout=180) == 0, lines
    assert lines[0] == f"step {last + 1}" and lines[-1] == f"done resumed_from={last}", lines
    assert not list(runs.glob("*/ckpt-*")), "a finished run leaves no checkpoints behind"

    straight = train_model(job(tmp_path / "b", steps=steps))  # never interrupted, no checkpoints
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(
        Path(straight.out_dir) / "model.safetensors"
    )
    meta = json.loads((tmp_path / "a" / "mlops_train.json").read_text())["result"]
    assert meta["final_loss"] == straight.final_loss and meta["resumed_from_step"] == last


def test_lora_resume_restores_adapters_optimizer_and_dropout_rng(tmp_path: Path) -> None:
    """In-process crash (an exception at a step) with dropout on: RNG states matter to be bitwise."""
    base = train_model(job(tmp_path / "base", steps=2))
    kw = {
        "base": base.out_dir,
        "method": "lora",
        "steps": 6,
        "lr": 5e-2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["c_attn", "c_fc"]},
    }
    runs = tmp_path / "runs"

    class Crash(Exception):
        pass

    def crash_at_4(d: dict[str, float]) -> None:
        if d["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        train_model(job(tmp_path / "a", runs_dir=str(runs), checkpoint_every_steps=2, **kw), crash_at_4)
    resumed = train_model(job(tmp_path / "a", runs_dir=str(runs), checkpoint_every_steps=2, **kw))
    straight = train_model(job(tmp_path / "b", **kw))
    assert resumed.resumed_from_step == 4 and resumed.checkpoints_written == 0  # none at the last step
    assert sha256_file(tmp_path / "a" / "model.safetensors") == sha256_file(tmp_path / "b" / "model.safetensors")
    assert resumed.final_loss == straight.final_loss


def test_other_fingerprint_or_code_is_never_resumed_and_partial_writes_are_ignored(tmp_path: Path) -> None:
    w = {"w": torch.nn.Parameter(torch.ones(3))}
    a = Checkpointer(tmp_path / "run", "fp-a", keep=2)
    a.save(5, w, {"x": 1}, {})
    (tmp_path / "run" / ".tmp-ckpt-00000007-123").mkdir()  # a crash mid-write leaves this behind
    assert Checkpointer(tmp_path / "run", "fp-b").latest(w) is None
    got = Checkpointer(tmp_path / "run", "fp-a").latest(w)
    assert got is not None and got.step == 5 and got.state == {"x": 1}
    assert not list((tmp_path / "run").glob(".tmp-*"))
    meta = tmp_path / "run" / "ckpt-00000005" / "meta.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"code_hash": "older-code"}))
    stale = Checkpointer(tmp_path / "run", "fp-a")
    assert stale.latest(w) is None and "another fingerprint or code version" in stale.skipped[0]


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_in_the_store_is_refused_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    w = {"w": torch.nn.Parameter(torch.ones(3))}
    ck = Checkpointer(tmp_path / "run", "fp", keep=1)
    path = ck.save(1, w, {"x": 1}, {})
    (path / "state.pt").write_bytes(pickle.dumps({"x": _Boom()}, protocol=2))
    assert ck.latest(w) is None  # refused, so the run starts over rather than executing it
    assert not (tmp_path / "pwned.txt").exists()
    assert "refused by the weights-only loader" in ck.skipped[0]


def test_a_retried_modal_input_resumes_from_the_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """functions/train.py: Modal retries (or restarts after preemption) call `train` again with the
    same arguments; the checkpoints committed to the Volume make that attempt continue."""
    import modal
    from test_functions import import_functions

    fn = import_functions(monkeypatch)["train"]
    assert isinstance(fn.TRAIN_RETRIES, modal.Retries)
    job_dict = job(Path("/client/out"), steps=6, checkpoint_every_steps=2).model_dump()
    data = (REPO / "data" / "train.jsonl").read_bytes()
    commits: list[str] = []

    def preempted_at_4(path: Path) -> None:
        commits.append(path.relative_to(tmp_path).as_posix())
        if path.name == "ckpt-00000004":
            raise KeyboardInterrupt  # what a preempted container's interrupt looks like in Python

    with pytest.raises(KeyboardInterrupt):
        fn.train_body(job_dict, data, run_id="r1", root=str(tmp_path), on_checkpoint=preempted_at_4)
    assert [c.split("/", 2)[0] + "/" + c.rsplit("/", 1)[-1] for c in commits] == [
        "checkpoints/ckpt-00000002",
        "checkpoints/ckpt-00000004",
    ]
    again = fn.train_body(job_dict, data, run_id="r1", root=str(tmp_path), on_checkpoint=commits.append)
    assert again["resumed_from_step"] == 4
    straight = train_model(job(tmp_path / "straight", steps=6))
    assert again["files"]["model.safetensors"] == sha256_file(Path(straight.out_dir) / "model.safetensors")
