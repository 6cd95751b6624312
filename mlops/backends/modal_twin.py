"""A local twin of Modal: the same `functions/*.py` bodies, run on this machine, for tests and for
rehearsing a deploy. Not a second product: it models what the Modal backend relies on, no more.

    export MLOPS_MODAL_TWIN=.modal-twin           # backend: modal now talks to the twin
    python -m mlops.backends.modal_twin secret create mlops-<project>-auth MLOPS_API_KEYS=... ... [--env E]
    python -m mlops.backends.modal_twin environment create pr | environment list --json
    python -m mlops.backends.modal_twin deploy functions/gateway.py
    python -m mlops.backends.modal_twin app list [--json] | app stop NAME | stop-all

What it models, and how:
- `deploy` snapshots what Modal mounts (the entry file, functions/images.py and the `mlops`
  package's .py files: `add_local_python_source`; later edits are not seen until the next deploy),
  checks that every Secret the functions name exists in the app's environment, and starts each
  web function behind a proxy on its own 127.0.0.1 port (Modal's: it enforces
  `requires_proxy_auth`): `serve` runs `serve_body` (the builtin engine through
  `mlops.serving.standalone` stands in for vLLM), `gateway` runs `gateway_body` under uvicorn,
  each container a process. With a file `cold_start` (seconds) apps scale to zero as on Modal,
  and `containers.json` runs more than one container of an app (see modal_twin_scale.py).
- A scheduled function (`schedule=modal.Period(...)`) is invoked every period, each time in a
  container process of its own, by a scheduler process stopped with the app; a file `schedule`
  (seconds) shortens every period (see modal_twin_schedule.py).
- A container's environment is what Modal gives one: the image's ENV (functions/images.py
  IMAGE_ENV), the function's `env=`, its Secrets, and PATH/HOME/PYTHONPATH (the code snapshot) plus
  the twin's own directory; nothing else of the caller's environment.
- `call`/`map` run a function's plain body (`<name>_body`) in a process, with the Volume at its
  root; an exception it raises is re-raised in the caller with its own class, as Modal does.
- Secrets are per environment (`secret create --env E`; `main` without one), as on Modal, and an
  environment other than `main` exists once `environment create`d.
- The Dict is a JSON file whose entries expire after 7 days without a read or write (clock: the
  file `clock` holds seconds to add, so tests can age it); the Volume is a directory; Secrets
  are JSON files; Proxy Auth Tokens are `proxy-token create`d. A file `fault.json` ({"MLOPS_FAULT_RELEASE":
  ...}) reaches every container's environment: the serving fault hook, for tests (never on Modal).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlops.backends.modal_settings import SETTINGS_ENV, TWIN_ENV, ModalSettings
from mlops.errors import InfraError

DEFAULT_ENV = "main"  # Modal's default environment
# What any container's process has besides what Modal sets: the twin runs on this machine's
# interpreter (PATH), and a temp dir / home the code may write to.
CONTAINER_BASE_ENV = ("PATH", "HOME", "TMPDIR", "LANG")
DICT_TTL_S = 7 * 24 * 3600  # Modal drops a Dict entry after 7 days with no read or write
STOP_WAIT_S = 40.0  # a container's grace period after SIGTERM (modal_twin_scale.STOP_GRACE_S) and some
MAP_WORKERS = 2  # inputs of one `map` run at once (each a process; this machine has few cores)
# Test tooling: MLOPS_FAULT_* variables (mlops/serving/faults.py) every container started after it
# is written gets, so the builtin engine standing in for vLLM fails a release's requests on cue
FAULT_FILE = "fault.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class TwinAPI:
    """`ModalAPI` over a directory (see the module docstring)."""

    def __init__(self, root: Path, settings: ModalSettings) -> None:
        self.root = Path(root).resolve()
        self.settings = settings
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ files, lock, clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self, name: str, default: Any) -> Any:
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else default

    def _write(self, name: str, data: Any) -> None:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(p)

    def now(self) -> float:
        return time.time() + float(self._read("clock", 0))

    @property
    def volume_dir(self) -> Path:
        return self.root / "volumes" / self.settings.volume

    # ------------------------------------------------------------------ Dict

    def _dict(self, op: str, key: str, value: Any = None) -> Any:
        name = f"dicts/{self.settings.state_dict}.json"
        with self._locked():
            now = self.now()
            data = {k: v for k, v in self._read(name, {}).items() if now - v[1] < DICT_TTL_S}
            if op == "put":
                data[key] = [value, now]
            elif key in data:
                data[key][1] = now  # a read is activity too
            self._write(name, data)
            return data.get(key, [None])[0]

    def dict_get(self, key: str) -> Any:
        return self._dict("get", key)

    def dict_put(self, key: str, value: Any) -> None:
        self._dict("put", key, value)

    def dict_items(self, prefix: str) -> dict[str, Any]:
        with self._locked():
            now = self.now()
            data = self._read(f"dicts/{self.settings.state_dict}.json", {})
        return {k: v[0] for k, v in data.items() if k.startswith(prefix) and now - v[1] < DICT_TTL_S}

    # ------------------------------------------------------------------ Volume

    def _vol_path(self, path: str) -> Path:
        rel = path.lstrip("/")
        if ".." in rel.split("/"):
            raise InfraError(f"invalid Volume path {path!r}")
        return self.volume_dir / rel

    def volume_put(self, files: Mapping[str, Path | bytes]) -> None:
        for dest, src in files.items():
            p = self._vol_path(dest)
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                p.write_bytes(src)
            else:
                shutil.copyfile(src, p)

    def volume_read(self, path: str) -> Iterator[bytes]:
        with self._vol_path(path).open("rb") as f:
            yield from iter(lambda: f.read(1 << 20), b"")

    # ------------------------------------------------------------------ Secrets, proxy tokens

    @property
    def environment(self) -> str:
        return self.settings.environment or DEFAULT_ENV

    def environments(self) -> list[str]:
        return sorted({DEFAULT_ENV, *self._read("environments.json", [])})

    def environment_create(self, name: str) -> None:
        with self._locked():
            if name in self.environments():
                raise InfraError(f"Environment {name!r} already exists")
            self._write("environments.json", [*self._read("environments.json", []), name])

    def _require_environment(self) -> None:
        if self.environment not in self.environments():
            env = self.environment
            raise InfraError(f"Environment {env!r} not found (create it: modal environment create {env})")

    def secret_create(self, name: str, values: Mapping[str, str], env: str | None = None, force: bool = False) -> None:
        env = env or self.environment
        p = self.root / "secrets" / env / f"{name}.json"
        if env not in self.environments():
            raise InfraError(f"Environment {env!r} not found (create it: modal environment create {env})")
        if p.is_file() and not force:
            raise InfraError(f"Secret {name!r} already exists in environment {env!r} (use --force to overwrite)")
        self._write(f"secrets/{env}/{name}.json", dict(values))

    def secret_names(self, env: str | None = None) -> list[str]:
        d = self.root / "secrets" / (env or self.environment)
        return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []

    def _secret(self, name: str) -> dict[str, str]:
        env = self.environment
        p = self.root / "secrets" / env / f"{name}.json"
        if not p.is_file():
            raise InfraError(
                f"Secret {name!r} not found in environment {env!r} "
                f"(create it: modal secret create --env {env} {name} KEY=VALUE ...)"
            )
        return dict(json.loads(p.read_text()))

    def proxy_token_create(self) -> tuple[str, str]:
        token = (f"wk-{secrets.token_hex(8)}", f"ws-{secrets.token_hex(16)}")
        with self._locked():
            self._write("proxy_tokens.json", [*self._read("proxy_tokens.json", []), list(token)])
        return token

    def proxy_token_ok(self, key: str | None, secret: str | None) -> bool:
        return [key, secret] in self._read("proxy_tokens.json", [])

    # ------------------------------------------------------------------ apps

    def _apps(self) -> dict[str, dict[str, Any]]:
        return dict(self._read("apps.json", {}))

    def deployed(self) -> set[str]:
        return set(self._apps())

    def app_list_json(self) -> list[dict[str, Any]]:
        """`modal app list --json` as modal 1.6.4 prints it (modal/cli/app.py `list_`: the columns
        App ID, Description, State, Tasks, Created at, Stopped at in snake_case)."""
        rows = []
        for name, app in sorted(self._apps().items()):
            tasks = self.root / "apps" / name / "tasks"
            created = time.strftime("%Y-%m-%d %H:%M:%S+00:00", time.gmtime(float(app.get("created", 0))))
            rows.append(
                {
                    "app_id": "ap-" + hashlib.sha256(name.encode()).hexdigest()[:22],
                    "description": name,
                    "state": "deployed",
                    "tasks": tasks.read_text().strip() if tasks.is_file() else str(int(bool(app.get("pid")))),
                    "created_at": created,
                    "stopped_at": None,
                }
            )
        return rows

    def _env(self, app: dict[str, Any], function: str) -> dict[str, str]:
        """A container's whole environment (see the module docstring): nothing of this process's
        own but CONTAINER_BASE_ENV, so code that looks up a variable Modal would not set fails here too."""
        spec = app["functions"][function]
        values: dict[str, str] = {k: os.environ[k] for k in CONTAINER_BASE_ENV if k in os.environ}
        values |= spec.get("image_env", {})
        values |= spec.get("env", {})
        for name in spec["secrets"]:
            values |= self._secret(name)
        values |= self._read(FAULT_FILE, {})  # test tooling: the serve stand-in's fault hook
        src = self.root / "apps" / app["name"] / "src"
        return values | {"PYTHONPATH": str(src), TWIN_ENV: str(self.root)}

    def deploy(self, script: Path, name: str, env: Mapping[str, str]) -> None:
        import mlops

        script = Path(script).resolve()
        if not script.is_file():
            raise InfraError(f"{script} does not exist")
        env = {SETTINGS_ENV: self.settings.to_json()} | dict(env)
        self._require_environment()
        old = self._apps().get(name)
        if old:
            self.stop(name)
        base = self.root / "apps" / name
        shutil.rmtree(base, ignore_errors=True)
        # What Modal mounts: the entry file (at /root, beside) functions/images.py
        # (`add_local_file`) and the `mlops` package's .py files (`add_local_python_source`).
        src = base / "src"
        package = Path(mlops.__file__).resolve().parent
        for p in package.rglob("*.py"):
            dest = src / "mlops" / p.relative_to(package)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        for p in {script, script.parent / "images.py"}:
            if p.is_file():
                shutil.copyfile(p, src / p.name)
        app: dict[str, Any] = {"name": name, "module": script.stem, "env": env, "functions": {}, "created": time.time()}
        app["functions"] = self._inspect(app)
        for fn in app["functions"]:
            self._env(app, fn)  # every Secret must exist, as `modal deploy` requires
        web = [fn for fn, spec in app["functions"].items() if spec["web"]]
        if web:
            app["web"] = web[0]
            app["port"] = old["port"] if old and old.get("port") else free_port()  # a URL outlives redeploys
            app["url"] = f"http://127.0.0.1:{app['port']}"
            app["pid"] = self._spawn(name, base, "_run", app, web[0])
        if any(spec.get("schedule") for spec in app["functions"].values()):
            app["scheduler_pid"] = self._spawn(name, base, "_schedule", app, next(iter(app["functions"])))
        with self._locked():
            self._write("apps.json", self._apps() | {name: app})
            with (self.root / "deploys.log").open("a") as f:  # what tests count redeploys by
                f.write(name + "\n")

    def _spawn(self, name: str, base: Path, what: str, app: dict[str, Any], function: str) -> int:
        with (base / "log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlops.backends.modal_twin_run", what, name],
                env=self._env(app, function),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends what it starts too
            )
        return proc.pid

    def _inspect(self, app: dict[str, Any]) -> dict[str, Any]:
        """Which functions the module defines, their Secrets and web settings (a fresh interpreter
        imports it, as `modal deploy` does)."""
        src = self.root / "apps" / app["name"] / "src"
        env = dict(os.environ) | app["env"] | {"PYTHONPATH": str(src)}  # the deploying machine's environment
        proc = subprocess.run(
            [sys.executable, "-m", "mlops.backends.modal_twin_run", "_inspect", app["module"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise InfraError(f"deploy {app['name']}: {tail[-1] if tail else proc.returncode}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def stop(self, name: str) -> None:
        app = self._apps().get(name)
        if app is None:
            raise InfraError(f"App {name!r} not found")
        pids = [p for p in (app.get("pid"), app.get("scheduler_pid")) if p and _alive(p)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with self._locked():
            apps = self._apps()
            apps.pop(name, None)
            self._write("apps.json", apps)

    def stop_all(self) -> None:
        for name in sorted(self._apps()):
            self.stop(name)

    def failure(self, name: str) -> str | None:
        app = self._apps().get(name)
        if not app or not app.get("pid") or _alive(app["pid"]):
            return None
        lines = (self.root / "apps" / name / "log").read_text(errors="replace").strip().splitlines()
        return " | ".join(ln.strip() for ln in lines[-12:] if ln.strip()) or "it exited"

    def web_url(self, app: str, function: str) -> str | None:
        a = self._apps().get(app)
        return str(a["url"]) if a and a.get("web") == function else None

    def map(self, app: str, function: str, inputs: Sequence[Any]) -> list[Any]:
        """Modal runs each input in a container of its own, in parallel: here, a process each
        (MAP_WORKERS at a time). Every input is one line in `calls.log`, what tests count."""
        from concurrent.futures import ThreadPoolExecutor

        with self._locked(), (self.root / "calls.log").open("a") as f:
            f.write("".join(f"map {app}/{function}\n" for _ in inputs))
        with ThreadPoolExecutor(max_workers=MAP_WORKERS) as pool:
            return list(pool.map(lambda x: self._run_call(app, function, (x,), None), inputs))

    def call(self, app: str, function: str, *args: Any, options: Mapping[str, Any] | None = None) -> Any:
        return self._run_call(app, function, args, options)

    def _run_call(self, app: str, function: str, args: tuple[Any, ...], options: Mapping[str, Any] | None) -> Any:
        a = self._apps().get(app)
        if a is None or function not in a["functions"]:
            raise InfraError(f"{app}/{function}: not found on Modal (twin); run `modal deploy` for {app}")
        timeout = float((options or {}).get("timeout") or self.settings.train_timeout)
        with tempfile.TemporaryDirectory(prefix="mlops-twin-call-") as tmp:
            io_file = Path(tmp) / "io.pickle"
            io_file.write_bytes(pickle.dumps(args))
            proc = subprocess.run(
                [sys.executable, "-m", "mlops.backends.modal_twin_run", "_call", app, function, str(io_file)],
                env=self._env(a, function),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            result = io_file.with_name(io_file.name + ".out")
            out = pickle.loads(result.read_bytes()) if result.is_file() else None
            if isinstance(out, tuple) and out[0] == "ok":
                return out[1]
            if isinstance(out, tuple) and isinstance(out[1], Exception):
                raise out[1]  # Modal re-raises the remote exception's own class
            tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise InfraError(f"{app}/{function} failed on Modal (twin): {tail[-1] if tail else proc.returncode}")


if __name__ == "__main__":
    from mlops.backends.modal_twin_cli import main

    sys.exit(main(sys.argv[1:], TwinAPI, __doc__ or ""))
