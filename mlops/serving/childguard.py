"""A child process group that dies with this process, however this process ends (`kill -9` too).

A server child started in its own session (so that stopping it reaches its own children, e.g.
vLLM's engine-core and worker processes) outlives a parent killed with SIGKILL: no `finally`,
no atexit runs. `guard(pgid)` starts a watchdog that holds the read end of a pipe whose only write
end is this process's: when this process is gone, for any reason, the kernel closes that end, the
watchdog reads end-of-file and stops the group (SIGTERM, then SIGKILL after `grace` seconds).
`release()` writes one byte first: the group was stopped the normal way, nothing to do.

Why not Linux's PR_SET_PDEATHSIG: it fires when the *thread* that forked the child exits, and
engines are started from request and watcher threads (a worker thread that idles out would take its
vLLM with it); and it exists on Linux only. A pipe closes on exit on every POSIX system, so this
works the same on macOS. The watchdog is a `python -I -c` of a few lines (no imports beyond the
standard library), in its own session so that a Ctrl-C to the terminal's group reaches it only
through the pipe; it exits as soon as the group is gone. A watchdog that is itself `kill -9`ed
protects nothing, as nothing can.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

GRACE_S = 15.0  # SIGTERM lets vLLM stop its engine processes; SIGKILL after this

_WATCHDOG = """
import os, signal, sys, time
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
if sys.stdin.buffer.read():  # returns at end-of-file; a byte first: released, the group is stopped
    sys.exit(0)
for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        sys.exit(0)
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.1)  # polling a group: there is no wait() for processes that are not ours
"""


class Guard:
    """The watchdog of one process group; `release()` once the group is stopped the normal way."""

    def __init__(self, pgid: int, grace: float = GRACE_S) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WATCHDOG, str(pgid), str(grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,  # the pipe's write end stays with this process alone
        )

    def release(self, timeout: float = 30.0) -> None:
        """The group was stopped the normal way: let the watchdog go, and reap it."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.write(b"x")
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
