"""Issue 19: `mlops serve` runs its rollout controller as a child process (mlops/rollout_process.py),
so that judging a window never holds the server's GIL. The child is started again when it dies,
and it never outlives the server: stopped with it on SIGTERM, and gone by itself after a `kill -9`
of the server (end-of-file on the pipe only the server held).

Real processes: the real `mlops serve` (no release trained: the controller's part is the subject)
and its real child, found in /proc by its command line. tests/test_controller.py drives rollouts
through a controller child, killed and restarted once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, make_project

from mlops.rollout_process import MODULE

WAIT_S = 60.0  # a child's restart takes its pause (1 s) and a Python start; generous for a loaded machine


def controller_children(url: str) -> list[int]:
    """Live (not zombie) controller processes judging through the server at `url`, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if MODULE.encode() in argv and url.encode() in argv:
                    if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        out.append(int(d.name))
    return out


def wait_until(cond: object, what: str, bound: float = WAIT_S) -> None:
    deadline = time.monotonic() + bound
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {bound:.0f} s waiting for {what}"
        time.sleep(0.05)  # polling /proc: these processes are not this test's children


def one_child(url: str, other_than: int | None = None) -> int:
    """The controller child of the server at `url` (waiting for it: a restarted one takes a pause)."""
    found: list[int] = []

    def there() -> bool:
        found[:] = [p for p in controller_children(url) if p != other_than]
        return bool(found)

    wait_until(there, "the controller child")
    assert len(found) == 1, found
    return found[0]


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The real `mlops serve` in its own process group (the cleanup stops all of it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlops serve exited {proc.returncode}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            assert time.monotonic() < deadline, "mlops serve did not come up"
            time.sleep(0.1)  # polling a process that imports torch; bounded by `deadline`
        yield proc, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in controller_children(url):  # only if the test failed: never left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("ctlproc"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_controller_child_is_restarted_when_killed_and_stopped_with_the_server(
    project: Path, sig: signal.Signals
) -> None:
    with serve(project) as (proc, url):
        first = one_child(url)
        os.kill(first, signal.SIGKILL)
        second = one_child(url, other_than=first)  # the server started another one
        assert proc.poll() is None, "the server serves on"
        assert httpx.get(f"{url}/health", timeout=30, trust_env=False).status_code == 200
        os.kill(proc.pid, sig)  # SIGKILL: no `finally` runs in the server
        proc.wait(timeout=WAIT_S)
        wait_until(lambda: not controller_children(url), f"the controller child to stop after the server's {sig.name}")
        assert second not in controller_children(url)
