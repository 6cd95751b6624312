"""The narrow seam between ModalBackend (and the gateway) and Modal: deploy or stop an app, the
routing Dict, the artifacts Volume, call a function, a web URL.

Two implementations: `ModalSDK`, the real thing (the only place the backend touches the `modal`
package, always inside a method), and `TwinAPI` in `modal_twin.py`, which runs the same
`functions/*.py` bodies on this machine. `open_api()` picks the twin when `MLOPS_MODAL_TWIN` names
a directory.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mlops.backends.modal_settings import FAILURE_KEY, TWIN_ENV, ModalSettings
from mlops.errors import ConfigError, InfraError

DEPLOY_TIMEOUT_S = 40 * 60  # building the vLLM image the first time takes 10-20 minutes
# The oldest modal this code runs on (pyproject's floor): Image.uv_pip_install (1.1),
# Volume.with_mount_options (1.4.3), `modal app stop --yes` (1.4.2), and `modal app list --json`
# keyed by snake_case columns (1.5; before, `deployed()` would read the headers and see no app).
MODAL_FLOOR = (1, 5)


class ModalAPI(Protocol):
    settings: ModalSettings

    def deploy(self, script: Path, name: str, env: Mapping[str, str]) -> None:
        """`modal deploy script --name name` with `env` in the deploying process's environment."""

    def stop(self, name: str) -> None: ...

    def deployed(self) -> set[str]:
        """The names of the apps deployed now."""

    def dict_get(self, key: str) -> Any: ...

    def dict_put(self, key: str, value: Any) -> None: ...

    def dict_items(self, prefix: str) -> dict[str, Any]:
        """Every entry whose key starts with `prefix` (the gateway containers' shared stats)."""

    def volume_put(self, files: Mapping[str, Path | bytes]) -> None:
        """Upload (overwriting): Volume path -> a local file or its content."""

    def volume_read(self, path: str) -> Iterator[bytes]:
        """The file's content in chunks; FileNotFoundError where there is none."""

    def failure(self, name: str) -> str | None:
        """Why an app's server died at start (with the end of its log), where that is known."""

    def call(self, app: str, function: str, *args: Any, options: Mapping[str, Any] | None = None) -> Any: ...

    def map(self, app: str, function: str, inputs: Sequence[Any]) -> list[Any]:
        """`Function.map(inputs)`: one call per input, run in parallel; results in input order."""

    def web_url(self, app: str, function: str) -> str | None: ...

    def environments(self) -> list[str]:
        """The workspace's Modal environments (`modal environment list`)."""

    def environment_create(self, name: str) -> None: ...

    def secret_create(self, name: str, values: Mapping[str, str], env: str | None = None, force: bool = False) -> None:
        """`modal secret create [--env env] name ...` (values never on a command line)."""


def open_api(settings: ModalSettings, environ: Mapping[str, str] | None = None) -> ModalAPI:
    """The twin where `$MLOPS_MODAL_TWIN` is set, Modal otherwise."""
    twin = (os.environ if environ is None else environ).get(TWIN_ENV)
    if twin:
        from mlops.backends.modal_twin import TwinAPI

        return TwinAPI(Path(twin), settings)
    return ModalSDK(settings)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, p))
        parts.append(int(digits or 0))
    return tuple(parts)


def check_modal_version(version: str) -> None:
    """Refuse a modal older than the floor, in one line that names it."""
    if _version(version) < MODAL_FLOOR:
        floor = ".".join(map(str, MODAL_FLOOR))
        raise ConfigError(f"backend: modal needs modal>={floor} (installed: {version}): pip install 'modal>={floor}'")


def _modal() -> Any:
    """The modal SDK, imported on first use (never at import of mlops)."""
    try:
        import modal
    except ImportError as e:
        raise ConfigError("backend: modal needs the Modal SDK: pip install 'mlops[cloud]'") from e
    check_modal_version(str(getattr(modal, "__version__", "0")))
    return modal


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@contextlib.contextmanager
def modal_errors(what: str, deploy: str | None = None) -> Iterator[None]:
    """Modal's exceptions -> one-line InfraError (exit 4) that says what to run."""
    mx = _modal().exception
    try:
        yield
    except mx.AuthError as e:
        raise InfraError(
            f"{what}: Modal is not authenticated ({_first_line(e)}); run `modal token new` "
            "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
        ) from e
    except mx.NotFoundError as e:
        hint = f"; run `{deploy}`" if deploy else ""
        raise InfraError(f"{what}: not found on Modal ({_first_line(e)}){hint}") from e
    except mx.Error as e:
        raise InfraError(f"{what}: Modal {type(e).__name__}: {_first_line(e)}") from e


def deployed_apps(out: str) -> set[str]:
    """The deployed apps in `modal app list --json` output: since modal 1.5 the keys are the
    columns in snake_case (modal/cli/utils.py: _col_name_to_json_key), before the headers."""
    try:
        rows = json.loads(out or "[]")
    except json.JSONDecodeError as e:
        raise InfraError(f"`modal app list --json` printed no JSON: {_first_line(out)}") from e
    names = set()
    for r in rows if isinstance(rows, list) else []:
        name, state = r.get("description", r.get("Description")), r.get("state", r.get("State"))
        if name and str(state) == "deployed":
            names.add(str(name))
    return names


def run_cli(cmd: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the `modal` CLI (a seam: tests replace it with a recorder)."""
    return subprocess.run(
        list(cmd), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


class ModalSDK:
    """The real Modal: the SDK for objects and calls, the `modal` CLI for deploy/stop/list."""

    def __init__(self, settings: ModalSettings) -> None:
        self.settings = settings
        self._env = {"environment_name": settings.environment}
        self._state: Any = None

    def _cli(
        self,
        what: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        in_env: str | None = "",
    ) -> str:
        """`in_env`: the environment flag ("": the settings', None: no flag, for workspace-wide commands)."""
        cmd = [sys.executable, "-m", "modal", *args]
        flag = self.settings.environment if in_env == "" else in_env
        if flag:
            cmd += ["--env", flag]
        try:
            proc = run_cli(cmd, dict(os.environ) | dict(env or {}), cwd or Path.cwd(), DEPLOY_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InfraError(f"{what}: {type(e).__name__}: {e}") from e
        if proc.returncode != 0:
            tail = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = tail[-1].strip()[:300] if tail else f"exit {proc.returncode}"
            hint = " (run `modal token new`)" if "token" in why.lower() or "auth" in why.lower() else ""
            raise InfraError(f"{what} failed: {why}{hint}")
        return proc.stdout or ""

    def deploy(self, script: Path, name: str, env: Mapping[str, str]) -> None:
        self.dict_put(FAILURE_KEY + name, None)  # a failure of the last deploy is not this one's
        root = script.resolve().parent.parent
        self._cli(
            f"`modal deploy {script.parent.name}/{script.name}` ({name})",
            "deploy",
            str(script),
            "--name",
            name,
            env=env,
            cwd=root,
        )

    def stop(self, name: str) -> None:
        self._cli(f"`modal app stop {name}`", "app", "stop", "--yes", name)

    def deployed(self) -> set[str]:
        _modal()  # the floor: the CLI run below is the same package
        return deployed_apps(self._cli("`modal app list`", "app", "list", "--json"))

    def environments(self) -> list[str]:
        _modal()
        out = self._cli("`modal environment list`", "environment", "list", "--json", in_env=None)
        try:
            return [str(r["name"]) for r in json.loads(out or "[]")]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InfraError(f"`modal environment list --json` printed something else: {_first_line(out)}") from e

    def environment_create(self, name: str) -> None:
        _modal()
        self._cli(f"`modal environment create {name}`", "environment", "create", name, in_env=None)

    def secret_create(self, name: str, values: Mapping[str, str], env: str | None = None, force: bool = False) -> None:
        import tempfile

        _modal()
        with tempfile.TemporaryDirectory(prefix="mlops-secret-") as tmp:  # 0700: only this user reads it
            path = Path(tmp) / "values.json"
            path.write_text(json.dumps(dict(values)))
            args = ["secret", "create", name, "--from-json", str(path), *(["--force"] if force else [])]
            self._cli(f"`modal secret create {name}`", *args, in_env=env or "")

    def _dict(self) -> Any:
        # one handle per process: the gateway writes its stats every second (a lookup each would double the calls)
        if self._state is None:
            self._state = _modal().Dict.from_name(self.settings.state_dict, create_if_missing=True, **self._env)
        return self._state

    def _volume(self) -> Any:
        return _modal().Volume.from_name(self.settings.volume, create_if_missing=True, **self._env)

    def dict_get(self, key: str) -> Any:
        with modal_errors(f"read {key!r} from the Modal Dict {self.settings.state_dict}"):
            return self._dict().get(key)

    def dict_put(self, key: str, value: Any) -> None:
        with modal_errors(f"write {key!r} to the Modal Dict {self.settings.state_dict}"):
            self._dict().put(key, value)

    def dict_items(self, prefix: str) -> dict[str, Any]:
        with modal_errors(f"read {prefix}* from the Modal Dict {self.settings.state_dict}"):
            return {k: v for k, v in self._dict().items() if isinstance(k, str) and k.startswith(prefix)}

    def volume_put(self, files: Mapping[str, Path | bytes]) -> None:
        with modal_errors(f"upload to the Modal Volume {self.settings.volume}"):
            with self._volume().batch_upload(force=True) as batch:
                for dest, src in files.items():
                    batch.put_file(io.BytesIO(src) if isinstance(src, bytes) else str(src), dest)

    def volume_read(self, path: str) -> Iterator[bytes]:
        mx = _modal().exception
        with modal_errors(f"read {path} from the Modal Volume {self.settings.volume}"):
            try:
                yield from self._volume().read_file(path)
            except FileNotFoundError as e:  # what read_file raises (modal/volume.py) for a missing path
                raise FileNotFoundError(path) from e
            except mx.NotFoundError as e:  # older SDKs, and a missing Volume
                raise FileNotFoundError(path) from e

    def _function(self, app: str, function: str) -> Any:
        return _modal().Function.from_name(app, function, **self._env)

    def call(self, app: str, function: str, *args: Any, options: Mapping[str, Any] | None = None) -> Any:
        with modal_errors(f"call {app}/{function} on Modal", deploy=f"mlops deploy (or modal deploy) for {app}"):
            fn = self._function(app, function)
            if options:
                fn = fn.with_options(**options)
            return fn.remote(*args)

    def map(self, app: str, function: str, inputs: Sequence[Any]) -> list[Any]:
        with modal_errors(f"map {app}/{function} on Modal", deploy=f"mlops deploy (or modal deploy) for {app}"):
            return list(self._function(app, function).map(list(inputs), order_outputs=True))

    def failure(self, name: str) -> str | None:
        # functions/serve.py puts it there when its server dies at start (the full log stays in
        # `modal app logs <name>`); without it the client would wait out startup_timeout
        why = self.dict_get(FAILURE_KEY + name)
        return str(why) if why else None

    def web_url(self, app: str, function: str) -> str | None:
        mx = _modal().exception
        try:
            with modal_errors(f"find {app}/{function} on Modal"):
                url = self._function(app, function).get_web_url()
        except InfraError as e:
            if isinstance(e.__cause__, mx.NotFoundError):
                return None
            raise
        return str(url).rstrip("/") if url else None
