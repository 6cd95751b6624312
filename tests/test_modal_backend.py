"""ModalBackend against a recording double of the Modal SDK boundary.

Modal's cloud cannot be reached from here, so `modal.Function.from_name`, `modal.Dict.from_name`
and `modal.Volume.from_name` are replaced by objects that record every call (and the `modal deploy`
subprocess by a recorder); the tests assert the exact calls and arguments. What is real: the
registry, the files, the sha256 checks, Modal's own exception classes, the container-side checks
of functions/serve.py and functions/evaluate.py, and a health server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlops.backends import backend_class
from mlops.backends.modal import SETTINGS_ENV, ModalBackend, ModalSettings, current_settings, modal_name
from mlops.config import load
from mlops.errors import ConfigError, InfraError, IntegrityError
from mlops.registry.releases import Registry, State
from mlops.registry.store import LocalStore
from mlops.training.train import TrainJob, TrainResult

ROOT = Path(__file__).resolve().parent.parent
RID = "tiny-20250101-000000-abcdef"


# ---------------------------------------------------------------------------- the double


class FakeModal:
    """Stands in for the Modal SDK: records calls, serves a Volume from a local directory."""

    def __init__(self, volume_root: Path) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.volume_root = volume_root
        self.dicts: dict[str, dict[str, Any]] = {}
        self.remote: dict[tuple[str, str], Callable[..., Any]] = {}  # (app, fn) -> body
        self.web_urls: dict[tuple[str, str], str] = {}
        self.fail: dict[str, BaseException] = {}  # call name -> exception to raise

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            raise self.fail[what]

    # modal.Function.from_name(app, name, *, environment_name=...)
    def function_from_name(self, app_name: str, name: str, **kw: Any) -> FakeFunction:
        self.calls.append(("Function.from_name", app_name, name, kw))
        return FakeFunction(self, app_name, name)

    def dict_from_name(self, name: str, **kw: Any) -> FakeDict:
        self.calls.append(("Dict.from_name", name, kw))
        return FakeDict(self, self.dicts.setdefault(name, {}))

    def volume_from_name(self, name: str, **kw: Any) -> FakeVolume:
        self.calls.append(("Volume.from_name", name, kw))
        return FakeVolume(self)


class FakeFunction:
    def __init__(self, sdk: FakeModal, app: str, name: str) -> None:
        self.sdk, self.app, self.name = sdk, app, name

    def with_options(self, **kw: Any) -> FakeFunction:
        self.sdk.calls.append(("Function.with_options", self.app, self.name, kw))
        return self

    def remote(self, *args: Any, **kw: Any) -> Any:
        self.sdk.calls.append(("Function.remote", self.app, self.name, args, kw))
        self.sdk._maybe_fail("remote")
        return self.sdk.remote[(self.app, self.name)](*args, **kw)

    def map(self, inputs: Any) -> Iterator[Any]:
        items = list(inputs)
        self.sdk.calls.append(("Function.map", self.app, self.name, items))
        self.sdk._maybe_fail("map")
        return iter([self.sdk.remote[(self.app, self.name)](x) for x in items])

    def get_web_url(self) -> str | None:
        self.sdk.calls.append(("Function.get_web_url", self.app, self.name))
        self.sdk._maybe_fail("get_web_url")
        return self.sdk.web_urls.get((self.app, self.name))


class FakeDict:
    def __init__(self, sdk: FakeModal, data: dict[str, Any]) -> None:
        self.sdk, self.data = sdk, data

    def __setitem__(self, key: str, value: Any) -> None:
        self.sdk.calls.append(("Dict.__setitem__", key, value))
        self.sdk._maybe_fail("dict_set")
        self.data[key] = json.loads(json.dumps(value))  # Modal pickles: nothing live crosses


class FakeVolume:
    CHUNK = 7  # small, so a file arrives in several chunks as from the real read_file

    def __init__(self, sdk: FakeModal) -> None:
        self.sdk = sdk

    def read_file(self, path: str) -> Iterator[bytes]:
        self.sdk.calls.append(("Volume.read_file", path))
        data = (self.sdk.volume_root / path).read_bytes()
        for i in range(0, len(data), self.CHUNK):
            yield data[i : i + self.CHUNK]

    @contextlib.contextmanager
    def batch_upload(self, force: bool = False) -> Iterator[FakeBatch]:
        self.sdk.calls.append(("Volume.batch_upload", {"force": force}))
        yield FakeBatch(self.sdk)


class FakeBatch:
    def __init__(self, sdk: FakeModal) -> None:
        self.sdk = sdk

    def _dest(self, remote: str) -> Path:
        return self.sdk.volume_root / remote.lstrip("/")

    def put_directory(self, local: str, remote: str) -> None:
        self.sdk.calls.append(("Batch.put_directory", local, remote))
        shutil.copytree(local, self._dest(remote), dirs_exist_ok=True)

    def put_file(self, local: Any, remote: str) -> None:
        data = local.getvalue() if isinstance(local, io.BytesIO) else Path(local).read_bytes()
        self.sdk.calls.append(("Batch.put_file", remote, json.loads(data)))
        self._dest(remote).parent.mkdir(parents=True, exist_ok=True)
        self._dest(remote).write_bytes(data)


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeModal:
    import modal

    fake = FakeModal(tmp_path / "volume")
    fake.volume_root.mkdir()
    monkeypatch.setattr(modal.Function, "from_name", fake.function_from_name)
    monkeypatch.setattr(modal.Dict, "from_name", fake.dict_from_name)
    monkeypatch.setattr(modal.Volume, "from_name", fake.volume_from_name)
    return fake


@pytest.fixture
def deploys(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records `modal deploy` runs instead of starting them."""
    import mlops.backends.modal as mb

    seen: list[dict[str, Any]] = []

    def run_cli(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        seen.append({"cmd": list(cmd), "env": env, "cwd": cwd, "timeout": timeout})
        return subprocess.CompletedProcess(cmd, 0, "deployed", "")

    monkeypatch.setattr(mb, "_run_cli", run_cli)
    return seen


def make_backend(tmp_path: Path, *sets: str) -> ModalBackend:
    loaded = load(
        ROOT / "mlops.yaml",
        ["backend=modal", "modal.app_name=acme", "modal.environment=ci", "modal.secrets=[wandb-key]", *sets],
    )
    registry = Registry(LocalStore(tmp_path / "store"), cache_dir=tmp_path / "cache")
    backend = backend_class("modal")(loaded, registry)
    assert isinstance(backend, ModalBackend)
    return backend


@pytest.fixture
def backend(tmp_path: Path) -> ModalBackend:
    return make_backend(tmp_path)


def publish_release(backend: ModalBackend, tmp_path: Path) -> dict[str, Any]:
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "config.json").write_text('{"model_type": "gpt2"}')
    (art / "model.safetensors").write_bytes(b"\x00weights" * 50)
    (art / "tokenizer.json").write_text("{}")
    return backend.registry.publish(RID, art, {"model": "tiny"})


@pytest.fixture(scope="module")
def fn_modules() -> Iterator[dict[str, ModuleType]]:
    """functions/serve.py and evaluate.py as `modal deploy` imports them (see test_functions.py).
    Module-scoped, so it is set up before (and without) the SDK double."""
    names = ("images", "serve", "evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "functions"))
        mp.setenv("MLOPS_CONFIG", str(ROOT / "mlops.yaml"))
        for name in names:
            mp.delitem(sys.modules, name, raising=False)
        mods = {name: importlib.import_module(name) for name in names}
        for name in names:
            sys.modules.pop(name, None)  # (not mp.delitem: its undo would put them back)
        yield mods


class HealthServer:
    """A stand-in vLLM /health on 127.0.0.1 (real HTTP), answering `status`."""

    def __init__(self, status: int = 200) -> None:
        self.hits = 0

        async def health(request: Request) -> Response:
            self.hits += 1
            return JSONResponse({}, status_code=status)

        app = Starlette(routes=[Route("/health", health)])
        cfg = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> HealthServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "health server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# ---------------------------------------------------------------------------- settings


def test_settings_come_from_the_config(backend: ModalBackend) -> None:
    s = backend.settings
    assert (s.app, s.environment, s.secrets) == ("acme", "ci", ("wandb-key",))
    assert (s.train_app, s.eval_app, s.gateway_app) == ("acme-train", "acme-eval", "acme-gateway")
    assert (s.volume, s.state_dict, s.auth_secret) == ("acme-artifacts", "acme-state", "acme-auth")
    assert s.serve_app(RID) == f"acme-serve-{RID}"
    assert (s.train_gpu, s.train_timeout, s.serve_gpu) == ("A10G", 1800, "L4")
    assert (s.min_containers, s.max_containers, s.served_model, s.prompt) == (0, 4, "tiny", "{input}=")
    assert ModalSettings.from_json(s.to_json()) == s
    assert current_settings({SETTINGS_ENV: s.to_json()}) == s
    assert current_settings({"MLOPS_CONFIG": "/nonexistent.yaml"}) == ModalSettings()
    long = modal_name("a" * 40, "serve", "tiny-20250101-000000-abcdef")
    assert len(long) <= 63 and long.startswith("a" * 20) and long != modal_name("a" * 40, "serve", "other")
    assert modal_name("My Project!", "train") == "my-project-train"


def test_importing_the_backend_does_not_import_modal() -> None:
    code = "import sys, mlops.backends.modal; print('modal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- train


def fake_train_container(sdk: FakeModal, payload: bytes = b"\x00\x01weights" * 20) -> Callable[..., Any]:
    """What functions/train.py:train does, minus the GPU: files on the Volume, their sha256s."""

    def remote(job_dict: dict[str, Any], dataset: bytes, run_id: str) -> dict[str, Any]:
        out = sdk.volume_root / "runs" / run_id
        out.mkdir(parents=True)
        files = {"config.json": b'{"n_positions": 32}', "model.safetensors": payload, "sub/tokenizer.json": b"{}"}
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        result = TrainResult(str(out), job_dict["steps"], 0.5, 1.0, 100.0, 1234, "cuda")
        digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
        return asdict(result) | {"run_id": run_id, "volume_dir": f"runs/{run_id}", "files": digests}

    return remote


def tiny_job(tmp_path: Path) -> TrainJob:
    return TrainJob(
        model_name="tiny", dataset_path=str(ROOT / "data" / "train.jsonl"), out_dir=str(tmp_path / "out"), steps=3
    )


def test_train_calls_the_deployed_function_and_downloads_the_model(
    sdk: FakeModal, backend: ModalBackend, tmp_path: Path
) -> None:
    sdk.remote[("acme-train", "train")] = fake_train_container(sdk)
    job = tiny_job(tmp_path)
    progress: list[dict[str, float]] = []
    result = backend.train(job, progress.append)

    run_id = sdk.calls[2][3][2]
    assert run_id.startswith("tiny-")
    assert sdk.calls == [
        ("Function.from_name", "acme-train", "train", {"environment_name": "ci"}),
        ("Function.with_options", "acme-train", "train", {"gpu": "A10G", "timeout": 1800}),
        (
            "Function.remote",
            "acme-train",
            "train",
            (asdict(job), (ROOT / "data" / "train.jsonl").read_bytes(), run_id),
            {},
        ),
        ("Volume.from_name", "acme-artifacts", {"environment_name": "ci", "create_if_missing": True}),
        ("Volume.read_file", f"runs/{run_id}/config.json"),
        ("Volume.read_file", f"runs/{run_id}/model.safetensors"),
        ("Volume.read_file", f"runs/{run_id}/sub/tokenizer.json"),
    ]
    assert result.out_dir == job.out_dir and result.steps == 3 and result.device == "cuda"
    out = Path(job.out_dir)
    assert (out / "model.safetensors").read_bytes() == b"\x00\x01weights" * 20
    assert (out / "sub" / "tokenizer.json").read_bytes() == b"{}"
    assert progress == [{"step": 3.0, "loss": 0.5, "tokens_per_s": 100.0}]


def test_train_uses_each_models_resources(sdk: FakeModal, tmp_path: Path) -> None:
    backend = make_backend(tmp_path, "models.tiny.resources={gpu: H100, timeout: 2h, memory: 16384}")
    sdk.remote[("acme-train", "train")] = fake_train_container(sdk)
    backend.train(tiny_job(tmp_path))
    assert sdk.calls[1] == (
        "Function.with_options",
        "acme-train",
        "train",
        {"gpu": "H100", "timeout": 7200, "memory": 16384},
    )


def test_train_refuses_a_corrupt_download(sdk: FakeModal, backend: ModalBackend, tmp_path: Path) -> None:
    remote = fake_train_container(sdk)

    def lying(*args: Any) -> dict[str, Any]:
        out: dict[str, Any] = remote(*args)
        out["files"]["model.safetensors"] = "0" * 64
        return out

    sdk.remote[("acme-train", "train")] = lying
    with pytest.raises(IntegrityError, match="model.safetensors .*does not match its sha256") as e:
        backend.train(tiny_job(tmp_path))
    assert e.value.exit_code == 4
    assert not (tmp_path / "out" / "model.safetensors").exists()

    def escaping(*args: Any) -> dict[str, Any]:
        out: dict[str, Any] = remote(*args)
        out["files"] = {"../../evil": "0" * 64}
        return out

    sdk.remote[("acme-train", "train")] = escaping
    with pytest.raises(IntegrityError, match="unsafe path"):
        backend.train(tiny_job(tmp_path))


# ---------------------------------------------------------------------------- errors


def _one_line_infra(exc: pytest.ExceptionInfo[InfraError]) -> str:
    msg = str(exc.value)
    assert exc.value.exit_code == 4 and "\n" not in msg
    return msg


def test_not_authenticated_is_one_line_with_the_fix(sdk: FakeModal, backend: ModalBackend, tmp_path: Path) -> None:
    from modal.exception import AuthError

    sdk.fail["remote"] = AuthError("Token missing. Could not authenticate client.\nIf you have token credentials ...")
    with pytest.raises(InfraError) as e:
        backend.train(tiny_job(tmp_path))
    msg = _one_line_infra(e)
    assert "not authenticated" in msg and "`modal token new`" in msg and "Token missing" in msg

    sdk.fail = {"dict_set": AuthError("Token missing.")}
    with pytest.raises(InfraError) as e:
        backend.set_state(lambda st: st, reason="test")
    assert "`modal token new`" in _one_line_infra(e)


def test_not_deployed_names_the_deploy_command(sdk: FakeModal, backend: ModalBackend, tmp_path: Path) -> None:
    from modal.exception import ConnectionError, NotFoundError

    sdk.fail["remote"] = NotFoundError("Lookup failed for Function 'train' from the 'acme-train' app: App not found.")
    with pytest.raises(InfraError) as e:
        backend.train(tiny_job(tmp_path))
    assert "`modal deploy functions/train.py`" in _one_line_infra(e)

    sdk.fail = {"get_web_url": NotFoundError("Lookup failed for Function 'gateway' from the 'acme-gateway' app")}
    with pytest.raises(InfraError) as e:
        backend.endpoint()
    assert "`modal deploy functions/gateway.py`" in _one_line_infra(e)

    sdk.fail = {"map": ConnectionError("could not connect to api.modal.com")}
    with pytest.raises(InfraError) as e:
        backend.score_cases(["exact_match"], [{"id": "a", "input": "x"}], [{"text": "x"}])
    assert "ConnectionError" in _one_line_infra(e)

    sdk.fail = {}  # a deployed function without a URL (not a web endpoint) is an InfraError too
    with pytest.raises(InfraError, match="no web URL"):
        backend.endpoint()


def test_without_the_modal_sdk_the_error_says_what_to_install(
    backend: ModalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "modal", None)  # `import modal` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mlops\[cloud\]'") as e:
        backend.endpoint()
    assert e.value.exit_code == 1


# ---------------------------------------------------------------------------- routing and serving


def test_publish_writes_the_state_to_the_dict(sdk: FakeModal, backend: ModalBackend, tmp_path: Path) -> None:
    publish_release(backend, tmp_path)

    def route(st: State) -> State:
        st.stages["production"] = RID
        st.routing = {RID: 100}
        return st

    state = backend.set_state(route, reason="promote")
    assert sdk.calls == [
        ("Dict.from_name", "acme-state", {"environment_name": "ci", "create_if_missing": True}),
        ("Dict.__setitem__", "state", state.to_json()),
    ]
    assert sdk.dicts["acme-state"]["state"]["routing"] == {RID: 100}
    assert state.version == 1


def test_serve_yields_the_gateway_url_after_publishing(sdk: FakeModal, backend: ModalBackend, tmp_path: Path) -> None:
    sdk.web_urls[("acme-gateway", "gateway")] = "https://acme--acme-gateway-gateway.modal.run/"
    with backend.serve() as url:
        assert url == "https://acme--acme-gateway-gateway.modal.run"
    assert sdk.calls == [
        ("Dict.from_name", "acme-state", {"environment_name": "ci", "create_if_missing": True}),
        ("Dict.__setitem__", "state", State().to_json()),
        ("Function.from_name", "acme-gateway", "gateway", {"environment_name": "ci"}),
        ("Function.get_web_url", "acme-gateway", "gateway"),
    ]
    assert backend.endpoint() == url


def test_preflight_stages_deploys_records_and_waits(
    fn_modules: dict[str, ModuleType],
    sdk: FakeModal,
    deploys: list[dict[str, Any]],
    backend: ModalBackend,
    tmp_path: Path,
) -> None:
    manifest = publish_release(backend, tmp_path)
    artifact_dir = backend.registry.artifact_dir(RID)
    with HealthServer() as health:
        sdk.web_urls[(f"acme-serve-{RID}", "serve")] = health.url
        backend.preflight(RID)
        assert health.hits == 1
    url = health.url.rstrip("/")
    staged = {"id": RID, "artifact": manifest["artifact"]}
    assert sdk.calls == [
        ("Volume.from_name", "acme-artifacts", {"environment_name": "ci", "create_if_missing": True}),
        ("Volume.batch_upload", {"force": True}),
        ("Batch.put_directory", str(artifact_dir), f"/releases/{RID}/model"),
        ("Batch.put_file", f"/releases/{RID}/manifest.json", staged),
        ("Function.from_name", f"acme-serve-{RID}", "serve", {"environment_name": "ci"}),
        ("Function.get_web_url", f"acme-serve-{RID}", "serve"),
        ("Dict.from_name", "acme-state", {"environment_name": "ci", "create_if_missing": True}),
        ("Dict.__setitem__", f"url:{RID}", url),
    ]
    [run] = deploys
    script = str(ROOT / "functions" / "serve.py")
    assert run["cmd"] == [sys.executable, "-m", "modal", "deploy", script, "--name", f"acme-serve-{RID}", "--env", "ci"]
    assert run["cwd"] == ROOT and run["timeout"] >= 600
    assert run["env"]["MLOPS_RELEASE"] == RID
    assert run["env"]["MLOPS_RELEASE_SHA256"] == manifest["artifact"]["sha256"]
    assert ModalSettings.from_json(run["env"][SETTINGS_ENV]) == backend.settings

    # what was staged passes the very check the vLLM container runs before it starts
    model_dir = fn_modules["serve"].prepare_release(sdk.volume_root, RID, manifest["artifact"]["sha256"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_prepare_deploys_the_release_before_it_is_evaluated(
    sdk: FakeModal, deploys: list[dict[str, Any]], backend: ModalBackend, tmp_path: Path
) -> None:
    """The pipeline pins eval requests to a release, so on Modal that release's vLLM app must exist first."""
    publish_release(backend, tmp_path)
    with HealthServer() as health:
        sdk.web_urls[(f"acme-serve-{RID}", "serve")] = health.url
        backend.prepare(RID)
        assert health.hits == 1
    assert [d["env"]["MLOPS_RELEASE"] for d in deploys] == [RID]
    assert ("Dict.__setitem__", f"url:{RID}", health.url.rstrip("/")) in sdk.calls


def test_preflight_failures_are_infra_errors(
    sdk: FakeModal,
    deploys: list[dict[str, Any]],
    backend: ModalBackend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlops.backends.modal as mb

    publish_release(backend, tmp_path)

    def failing(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        err = "Traceback ...\nmodal.exception.AuthError: Token missing. Could not authenticate client.\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(mb, "_run_cli", failing)
    with pytest.raises(InfraError) as e:
        backend.preflight(RID)
    msg = _one_line_infra(e)
    assert "modal deploy functions/serve.py" in msg and "Token missing" in msg and "`modal token new`" in msg

    with HealthServer(status=503) as health, pytest.raises(InfraError) as e:
        backend._wait_healthy(RID, health.url.rstrip("/"), timeout=0.0)
    assert "did not become healthy" in _one_line_infra(e) and "HTTP 503" in str(e.value)


# ---------------------------------------------------------------------------- eval fan-out


def test_score_cases_fans_shards_out_with_map(
    fn_modules: dict[str, ModuleType], sdk: FakeModal, backend: ModalBackend
) -> None:
    evaluate = fn_modules["evaluate"]
    sdk.remote[("acme-eval", "evaluate")] = lambda shard: evaluate.score_shard(shard, base_dir=ROOT)
    cases = [{"id": str(i), "input": f"x{i}", "expected": f"{i}x"} for i in range(5)]
    outputs = [{"text": f"{i}x" if i % 2 == 0 else "wrong", "latency_s": 0.1} for i in range(5)]
    out = backend.score_cases(["exact_match"], cases, outputs, shard_size=2)
    assert [c[0] for c in sdk.calls] == ["Function.from_name", "Function.map"]
    assert sdk.calls[0] == ("Function.from_name", "acme-eval", "evaluate", {"environment_name": "ci"})
    shards = sdk.calls[1][3]
    assert [len(s["cases"]) for s in shards] == [2, 2, 1]
    assert all(s["metrics"] == ["exact_match"] for s in shards)
    assert [r["value"] for r in out["scores"]["exact_match"]] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert out["higher_is_better"] == {"exact_match": True}
    assert backend.score_cases(["exact_match"], [], []) == {"scores": {}, "higher_is_better": {}}
    assert len(sdk.calls) == 2  # nothing to score: no call


def test_remote_result_matches_train_result_fields() -> None:
    """The dict functions/train.py returns carries every TrainResult field (the client rebuilds it)."""
    from mlops.backends.modal import _Remote

    out = {f.name: 1 for f in fields(TrainResult)} | {"volume_dir": "runs/x", "files": {}}
    assert _Remote.parse(out).volume_dir == "runs/x"
    with pytest.raises(InfraError, match="unexpected result"):
        _Remote.parse({"volume_dir": "runs/x"})
