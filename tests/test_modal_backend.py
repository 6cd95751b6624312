"""The real side of the Modal seam (`ModalSDK`) against a recording double of the SDK boundary, and
the settings every name comes from. The backend's behaviour end to end is in test_modal_twin.py.

Modal's cloud cannot be reached from here, so `modal.Function.from_name`, `modal.Dict.from_name`,
`modal.Volume.from_name` and the `modal` CLI are replaced by recorders; the tests assert the exact
calls. Modal's own exception classes are real.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlops.backends import backend_class
from mlops.backends.modal import ModalBackend
from mlops.backends.modal_api import ModalSDK, open_api
from mlops.backends.modal_settings import SETTINGS_ENV, ModalSettings, current_settings, modal_name
from mlops.config import load
from mlops.errors import ConfigError, InfraError
from mlops.registry.releases import Registry
from mlops.registry.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
RID = "tiny-20250101-000000-abcdef"


class Recorder:
    """Stands in for the Modal SDK objects: records calls; a Volume and a Dict in memory."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.dict: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}
        self.fail: BaseException | None = None
        self.url: str | None = "https://acme--gateway.modal.run/"

    def function_from_name(self, app: str, name: str, **kw: Any) -> Recorder:
        self.calls.append(("Function.from_name", app, name, kw))
        if self.fail:
            raise self.fail
        return self

    def with_options(self, **kw: Any) -> Recorder:
        self.calls.append(("with_options", kw))
        return self

    def remote(self, *args: Any) -> Any:
        self.calls.append(("remote", args))
        return {"ok": True}

    def map(self, inputs: list[Any], order_outputs: bool = True) -> Iterator[Any]:
        self.calls.append(("map", list(inputs), order_outputs))
        return iter([{"n": x} for x in inputs])  # Modal yields results as they come: ordered here

    def get_web_url(self) -> str | None:
        return self.url

    def dict_from_name(self, name: str, **kw: Any) -> Recorder:
        self.calls.append(("Dict.from_name", name, kw))
        return self

    def get(self, key: str) -> Any:
        return self.dict.get(key)

    def put(self, key: str, value: Any) -> None:
        self.dict[key] = json.loads(json.dumps(value))  # Modal pickles: nothing live crosses

    def volume_from_name(self, name: str, **kw: Any) -> Recorder:
        self.calls.append(("Volume.from_name", name, kw))
        return self

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[Recorder]:
        self.calls.append(("batch_upload", force))
        yield self

    def put_file(self, local: Any, remote: str) -> None:
        self.files[remote] = local.getvalue() if isinstance(local, io.BytesIO) else Path(local).read_bytes()

    def read_file(self, path: str) -> Iterator[bytes]:
        if path not in self.files:  # modal 1.6.4 (modal/volume.py) turns NotFoundError into this
            raise FileNotFoundError(f"No such file: {path}")
        data = self.files[path]
        for i in range(0, len(data), 7):  # in chunks, as the real read_file
            yield data[i : i + 7]


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    import modal

    rec = Recorder()
    monkeypatch.setattr(modal.Function, "from_name", rec.function_from_name)
    monkeypatch.setattr(modal.Dict, "from_name", rec.dict_from_name)
    monkeypatch.setattr(modal.Volume, "from_name", rec.volume_from_name)
    return rec


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """Records `modal ...` CLI runs instead of starting them; `app list --json` prints what the
    twin's CLI double prints (checked against the installed modal in test_twin_app_list_json_...)."""
    import mlops.backends.modal_api as api
    from mlops.backends.modal_twin import TwinAPI

    twin = TwinAPI(tmp_path / "twin", ModalSettings(app="acme"))
    (twin.root / "apps.json").write_text(json.dumps({"acme-gateway": {"name": "acme-gateway", "created": 1.7e9}}))
    seen: list[dict[str, Any]] = []

    def run_cli(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        seen.append({"cmd": list(cmd), "env": env, "cwd": cwd})
        out = json.dumps(twin.app_list_json())
        return subprocess.CompletedProcess(cmd, 0, out if "list" in cmd else "ok", "")

    monkeypatch.setattr(api, "run_cli", run_cli)
    return seen


def make_backend(tmp_path: Path, *sets: str) -> ModalBackend:
    loaded = load(
        ROOT / "mlops.yaml",
        ["backend=modal", "modal.app_name=acme", "modal.environment=ci", "modal.secrets=[wandb-key]", *sets],
    )
    backend = backend_class("modal")(loaded, Registry(LocalStore(tmp_path / "store"), cache_dir=tmp_path / "c"))
    assert isinstance(backend, ModalBackend)
    return backend


def test_settings_come_from_the_config(tmp_path: Path) -> None:
    s = make_backend(tmp_path).settings
    assert (s.app, s.environment, s.secrets) == ("acme", "ci", ("wandb-key",))
    assert (s.train_app, s.gateway_app) == ("acme-train", "acme-gateway")
    assert (s.volume, s.state_dict, s.auth_secret) == ("acme-artifacts", "acme-state", "acme-auth")
    assert s.serve_app(RID) == f"acme-serve-{RID}"
    assert (s.train_gpu, s.train_timeout, s.serve_gpu) == ("A10G", 1800, "L4")
    assert ModalSettings.from_json(s.to_json()) == s
    assert current_settings({SETTINGS_ENV: s.to_json()}) == s
    assert modal_name("A b", "c/d") == "a-b-c-d" and len(modal_name("x" * 100)) == 63


def test_open_api_picks_the_twin_from_the_environment(tmp_path: Path) -> None:
    from mlops.backends.modal_twin import TwinAPI

    s = ModalSettings(app="acme")
    assert isinstance(open_api(s, {}), ModalSDK)
    twin = open_api(s, {"MLOPS_MODAL_TWIN": str(tmp_path / "twin")})
    assert isinstance(twin, TwinAPI) and twin.root == (tmp_path / "twin").resolve()


def test_sdk_objects_calls_and_names(sdk: Recorder) -> None:
    api = ModalSDK(ModalSettings(app="acme", environment="ci"))
    api.dict_put("state", {"version": 3})
    assert api.dict_get("state") == {"version": 3} and api.dict_get("nope") is None
    api.volume_put({"releases/r/manifest.json": b'{"a": 1}'})
    assert b"".join(api.volume_read("releases/r/manifest.json")) == b'{"a": 1}'
    with pytest.raises(FileNotFoundError):
        b"".join(api.volume_read("routing/state.json"))
    assert api.call("acme-train", "train", {"job": 1}, b"data", options={"gpu": "H100"}) == {"ok": True}
    assert api.web_url("acme-gateway", "gateway") == "https://acme--gateway.modal.run"
    env = {"environment_name": "ci"}
    assert ("Dict.from_name", "acme-state", env | {"create_if_missing": True}) in sdk.calls
    assert ("Volume.from_name", "acme-artifacts", env | {"create_if_missing": True}) in sdk.calls
    assert ("Function.from_name", "acme-train", "train", env) in sdk.calls
    assert ("with_options", {"gpu": "H100"}) in sdk.calls and ("remote", ({"job": 1}, b"data")) in sdk.calls
    # the eval fan-out: Function.map over the batches, results in input order
    assert api.map("acme-eval", "score", [1, 2, 3]) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert ("Function.from_name", "acme-eval", "score", env) in sdk.calls and ("map", [1, 2, 3], True) in sdk.calls


def test_sdk_errors_are_one_line_with_the_fix(sdk: Recorder) -> None:
    import modal

    api = ModalSDK(ModalSettings(app="acme"))
    sdk.fail = modal.exception.AuthError("Token missing.\nmore")
    with pytest.raises(InfraError) as e:
        api.call("acme-train", "train")
    assert "modal token new" in e.value.headline and "\n" not in e.value.headline
    sdk.fail = modal.exception.NotFoundError("App 'acme-gateway' not found")
    assert api.web_url("acme-gateway", "gateway") is None  # not deployed: the backend deploys it


def test_sdk_cli_deploy_stop_and_list(cli: list[dict[str, Any]], sdk: Recorder) -> None:
    api = ModalSDK(ModalSettings(app="acme", environment="ci"))
    api.deploy(ROOT / "functions" / "serve.py", f"acme-serve-{RID}", {"MLOPS_RELEASE": RID})
    api.stop(f"acme-serve-{RID}")
    assert api.deployed() == {"acme-gateway"}
    deploy, stop, _ = cli
    assert deploy["cmd"][1:] == [
        "-m",
        "modal",
        "deploy",
        str(ROOT / "functions" / "serve.py"),
        "--name",
        f"acme-serve-{RID}",
        "--env",
        "ci",
    ]
    assert deploy["env"]["MLOPS_RELEASE"] == RID and deploy["cwd"] == ROOT
    assert stop["cmd"][1:] == ["-m", "modal", "app", "stop", "--yes", f"acme-serve-{RID}", "--env", "ci"]


def test_twin_app_list_json_is_the_pinned_modals(tmp_path: Path) -> None:
    """The twin's `app list --json` has the keys the installed modal prints (its columns, through
    its own snake_case rule), and `deployed()` reads them; the pre-1.5 headers still parse."""
    import inspect
    import re

    from modal.cli import app as modal_app
    from modal.cli.utils import _col_name_to_json_key

    from mlops.backends.modal_api import deployed_apps

    src = inspect.getsource(modal_app)
    body = src[src.index("async def list_(") :]
    columns = re.findall(r'Column\("([^"]+)"', body[: body.index("display_table(")])
    assert len(columns) == 6
    env = {"MLOPS_MODAL_TWIN": str(tmp_path / "twin")}
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / "apps.json").write_text(json.dumps({"acme-train": {"name": "acme-train"}}))
    cmd = [sys.executable, "-m", "mlops.backends.modal_twin", "app", "list", "--json"]
    out = subprocess.run(cmd, env=os.environ | env, capture_output=True, text=True, timeout=120)
    rows = json.loads(out.stdout)
    assert [list(r) for r in rows] == [[_col_name_to_json_key(c) for c in columns]]
    assert deployed_apps(out.stdout) == {"acme-train"}
    old = [
        {"App ID": "ap-1", "Description": "acme-gateway", "State": "deployed"},
        {"Description": "x", "State": "stopped"},
    ]
    assert deployed_apps(json.dumps(old)) == {"acme-gateway"}


def test_an_older_modal_is_refused_with_the_floor(sdk: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    import modal

    monkeypatch.setattr(modal, "__version__", "1.4.3")
    with pytest.raises(ConfigError) as e:
        ModalSDK(ModalSettings(app="acme")).dict_get("state")
    assert "modal>=1.5" in e.value.headline and "1.4.3" in e.value.headline and "\n" not in e.value.headline
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"modal>=1.5"' in pyproject  # the floor the code names is the one pip installs


def test_a_server_that_died_at_start_is_reported_through_the_dict(sdk: Recorder, cli: list[dict[str, Any]]) -> None:
    """functions/serve.py puts why in the Dict (test_functions), the client reads it at once;
    a redeploy clears the last one's."""
    api = ModalSDK(ModalSettings(app="acme"))
    app = f"acme-serve-{RID}"
    assert api.failure(app) is None
    sdk.dict[f"failure:{app}"] = "RuntimeError: vllm exited with code 1 before serving"
    assert api.failure(app) == "RuntimeError: vllm exited with code 1 before serving"
    api.deploy(ROOT / "functions" / "serve.py", app, {})
    assert api.failure(app) is None


def test_modal_backend_needs_a_gateway_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_backend(tmp_path)
    monkeypatch.delenv("MLOPS_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$MLOPS_API_KEY .*acme-auth"):
        b.client_key()
    monkeypatch.setenv("MLOPS_API_KEY", "k1")
    assert b.client_key() == "k1"
    monkeypatch.setenv("MY_KEY", "k2")
    assert make_backend(tmp_path, "deploy.server.api_key_env=MY_KEY").client_key() == "k2"


def test_importing_the_backend_does_not_import_modal() -> None:
    code = "import mlops.backends.modal, mlops.backends.modal_api, sys; print('modal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


MODAL_SETS = [
    "--set",
    "backend=modal",
    "--set",
    "modal.secrets=[acme-keys]",
    "--set",
    "storage=s3://bucket/prefix",
    "--set",
    "deploy.server.api_key_env=GW_KEY",
    "--set",
    'judges={ref: {model: gpt, base_url: "http://127.0.0.1:9/v1", api_key_env: JUDGE_KEY}}',
]


def test_validate_and_doctor_say_what_a_modal_container_looks_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container sees only its Secrets: `mlops validate` names each variable the code looks up
    there and its Secret; `mlops doctor --modal` prints the set-up (names only) and --apply runs
    it for one environment (here on the twin), all values or nothing."""
    from conftest import mlops

    from mlops.backends.modal_twin import TwinAPI

    auth = "mlops-tiny-reverse-auth"
    v = mlops("validate", "--json", *MODAL_SETS, cwd=ROOT, timeout=120)
    assert v.returncode == 0, v.stderr
    found = {(x["var"], x["secret"], x["where"]) for x in json.loads(v.stdout)["modal"]["lookups"]}
    assert {
        ("MLOPS_API_KEYS", auth, "gateway, controller"),
        ("GW_KEY", auth, "gateway"),
        ("JUDGE_KEY", "acme-keys", "eval"),
        ("AWS_ACCESS_KEY_ID", "acme-keys", "gateway, controller"),
    } <= found, found
    human = mlops("validate", *MODAL_SETS, cwd=ROOT, timeout=120).stdout
    assert "JUDGE_KEY" in human and "from Secret acme-keys" in human

    for var in ("JUDGE_KEY", "MLOPS_MODAL_TWIN"):
        monkeypatch.delenv(var, raising=False)
    values = {
        "MLOPS_API_KEYS": "pr-key",
        "MLOPS_VLLM_API_KEY": "v",
        "MLOPS_PROXY_TOKEN_ID": "wk-1",
        "MLOPS_PROXY_TOKEN_SECRET": "ws-1",
        "GW_KEY": "g",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    d = mlops("doctor", "--modal", *MODAL_SETS, cwd=ROOT, env=values, timeout=120)
    assert d.returncode == 0, d.stderr
    assert "modal environment create pr\n" in d.stdout
    assert 'modal secret create --env pr acme-keys JUDGE_KEY="$JUDGE_KEY" AWS_ACCESS_KEY_ID=' in d.stdout
    assert "pr-key" not in d.stdout  # names only: values stay in the operator's shell

    twin = {"MLOPS_MODAL_TWIN": str(tmp_path / "twin")}
    apply = ["doctor", "--modal", "--apply", "--env", "pr", *MODAL_SETS]
    r = mlops(*apply, cwd=ROOT, env=values | twin, timeout=120)
    assert r.returncode == 1 and "JUDGE_KEY" in r.stderr and not (tmp_path / "twin" / "secrets").exists()
    r = mlops(*apply, cwd=ROOT, env=values | twin | {"JUDGE_KEY": "j"}, timeout=120)
    assert r.returncode == 0, r.stderr
    api = TwinAPI(tmp_path / "twin", ModalSettings(app="mlops-tiny-reverse", environment="pr"))
    assert "pr" in api.environments() and api.secret_names() == ["acme-keys", auth]
    assert api._secret(auth)["MLOPS_API_KEYS"] == "pr-key" and api._secret("acme-keys")["JUDGE_KEY"] == "j"
    assert api.secret_names("main") == []  # the PR environment's Secrets only


def test_a_remote_failure_of_the_eval_fan_out_names_the_dead_judge() -> None:
    """Modal re-raises the remote exception's own class (a RuntimeError from the eval function,
    not an InfraError): the judge-app hint still fires, in one line (exit 4)."""
    from mlops.backends.modal_eval import map_with_hint

    class Api:
        def map(self, app: str, function: str, inputs: list[Any]) -> list[Any]:
            raise RuntimeError("judge http://127.0.0.1:9 did not become healthy in 960s\nmore")

    with pytest.raises(InfraError) as e:
        map_with_hint(Api(), "acme-eval", [{}], lambda: ["acme-judge-ref: exited: CUDA out of memory"])
    assert e.value.headline == (
        "acme-eval/score failed on Modal: RuntimeError: judge http://127.0.0.1:9 did not become healthy in 960s "
        "(judge app acme-judge-ref: exited: CUDA out of memory)"
    )
    with pytest.raises(InfraError, match=r"^acme-eval/score failed on Modal: RuntimeError: judge"):
        map_with_hint(Api(), "acme-eval", [{}], lambda: [])
