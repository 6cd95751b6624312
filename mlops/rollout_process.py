"""The local rollout controller in a process of its own, supervised by `mlops serve` (issue 19).

Why a process: `mlops serve` runs the builtin engine and the gateway in one Python process. A
controller thread there, judging a guardrail window every `interval` (parsing the new capture
files, computing the statistics), held that process's GIL for 20-60 ms at a time, and the event
loop and the engine waited behind it: serving p99 at c=8 rose 15-20% (benchmarks/bench_controller.py).
In its own process it holds its own GIL only.

The child, `python -m mlops.rollout_process --url URL --config PATH [--set K=V]...`, runs one
`Controller` per deployed model (`rollout_controller.for_models`, each `start()`ed: the same tick
loop as before) until its stdin reaches end-of-file or it gets SIGTERM; then it stops them (each
gives its lease back) and exits. The parent (`Supervisor`) holds the only write end of that stdin:
however the server ends (`kill -9` too: no `finally` runs), the kernel closes it and the child
stops itself. That is mlops/serving/childguard.py's pipe without its watchdog, as this child is our
own code and reads the pipe itself. A child that exits while the server runs is started again
after a pause (1 s, doubling up to 30 s while it keeps dying; back to 1 s once one ran a minute).

On Modal the controller is a scheduled function instead (functions/controller.py); `mlops run`'s
own server keeps it as a thread (mlops/flows/run.py), where it idles while the run holds the lease.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("mlops.controller")

MODULE = "mlops.rollout_process"
BACKOFF_S = 1.0  # the first restart's pause: a crash is rare, a decision waits at most this long more
MAX_BACKOFF_S = 30.0  # a child that dies at once (a store down) is tried twice a minute, not in a loop
HEALTHY_S = 60.0  # a child that ran this long died of something new: restart after BACKOFF_S again
# A tick may be replaying prompts at the server when it is told to stop; past this the child is
# killed, and its lease expires by itself (lease_ttl), as when a server was killed
STOP_S = 15.0


def child_argv(url: str, config: Path, sets: list[str] | None = None, models: list[str] | None = None) -> list[str]:
    """The command line of the controller child judging through the server at `url`."""
    argv = [sys.executable, "-m", MODULE, "--url", url, "--config", str(config.resolve())]
    for s in sets or []:
        argv += ["--set", s]
    for m in models or []:
        argv += ["--model", m]
    return argv


class Supervisor:
    """Runs `argv` as a child process and keeps it running until `stop()`."""

    def __init__(self, argv: list[str], name: str = "rollout controller") -> None:
        self.argv = argv
        self.name = name
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def start(self) -> Supervisor:
        with self._lock:
            self._spawn()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"{self.name} supervisor")
        self._thread.start()
        return self

    def _spawn(self) -> None:
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,  # its end-of-file tells the child the server is gone
            stdout=subprocess.DEVNULL,
            close_fds=True,  # the write end stays with this process alone (a vLLM child must not hold it)
        )

    def _watch(self) -> None:
        pause = BACKOFF_S
        while True:
            with self._lock:
                proc = self._proc
            assert proc is not None
            born = time.monotonic()
            rc = proc.wait()  # blocks without the GIL
            if self._stopping.is_set():
                return
            if time.monotonic() - born >= HEALTHY_S:
                pause = BACKOFF_S
            log.warning("%s (pid %d) exited with %s; starting it again in %g s", self.name, proc.pid, rc, pause)
            _close(proc)
            if self._stopping.wait(pause):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._spawn()
                except OSError as e:  # fork refused (memory, process limit): try again later
                    log.warning("%s: could not start: %s", self.name, e)
                    self._proc = proc
                    pause = min(pause * 2, MAX_BACKOFF_S)
                    continue
                self.restarts += 1
            pause = min(pause * 2, MAX_BACKOFF_S)

    def stop(self, timeout: float = STOP_S) -> None:
        """Stop the child (end-of-file on its stdin: it stops its controllers), and the supervision."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None:
            _close(proc)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %g s: killed", self.name, proc.pid, timeout)
                proc.kill()
                proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _close(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


# ---------------------------------------------------------------------------------------- the child


def _watch_stdin(stop: threading.Event) -> None:
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.buffer.read(1):  # the parent writes nothing: this returns at end-of-file
            pass
    stop.set()


def _logging() -> None:
    """The controller's decisions on stderr (the server's log), one line each."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="The rollout controller of `mlops serve`.")
    ap.add_argument("--url", required=True, help="the server the controller judges through")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--model", dest="models", action="append", help="only these deployed models (default: all)")
    args = ap.parse_args(argv)
    stop = threading.Event()
    # Ctrl-C reaches the server's whole process group: the server stops this child itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True, name="parent watch").start()
    _logging()

    from mlops.config import load
    from mlops.env import set_offline
    from mlops.errors import MlopsError
    from mlops.rollout_controller import for_models

    set_offline()
    try:
        controllers = [c.start() for c in for_models(load(args.config, args.sets), args.url, args.models)]
    except MlopsError as e:
        log.error("rollout controller: %s", e.headline)
        return e.exit_code
    log.info("rollout controller (pid %d) judging through %s", os.getpid(), args.url)
    while not stop.wait(1.0):  # a timed wait: a signal handler runs between waits
        pass
    for c in controllers:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
