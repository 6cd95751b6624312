"""mlops/serving/childguard.py: a guarded process group dies with its parent, `kill -9` included,
and is left alone when the parent stops it itself and releases the guard.

The parent is a real Python process that starts a group of two (a leader and its own child, as
vLLM's server and its engine process) in their own session; tests/test_vllm.py checks the same
with `mlops serve` and real vLLM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WAIT_S = 60.0  # the guard's SIGTERM is immediate; generous for a loaded machine

PARENT = """
import subprocess, sys
from mlops.serving.childguard import Guard
leader = subprocess.Popen(
    [sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']).wait()"],
    start_new_session=True,
)
guard = Guard(leader.pid, grace=5)
print(leader.pid, flush=True)
if sys.stdin.readline().strip() == "release":  # the normal stop path without stopping: is it left alone?
    guard.release()
    print("released", guard._proc.returncode, flush=True)
sys.stdin.readline()
"""


def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == pgid and fields[0] != "Z":
                    out.append(int(d.name))
    return out


def start_parent() -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None
    pgid = int(parent.stdout.readline())
    deadline = time.monotonic() + WAIT_S
    while len(group(pgid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc until the leader has started its own child
    assert len(group(pgid)) == 2
    return parent, pgid


def cleanup(parent: subprocess.Popen[str], pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)


def test_a_kill_9_of_the_parent_stops_the_whole_guarded_group() -> None:
    parent, pgid = start_parent()
    try:
        os.kill(parent.pid, signal.SIGKILL)  # no finally, no atexit
        parent.wait(timeout=30)
        deadline = time.monotonic() + WAIT_S
        while group(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling /proc: the group is not this test's children
        assert group(pgid) == []
    finally:
        cleanup(parent, pgid)


def test_a_released_guard_leaves_the_group_alone() -> None:
    parent, pgid = start_parent()
    try:
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.write("release\n")
        parent.stdin.flush()
        assert parent.stdout.readline().split() == ["released", "0"]  # the watchdog has exited, by itself
        assert len(group(pgid)) == 2  # ... and left the group alone
    finally:
        cleanup(parent, pgid)
