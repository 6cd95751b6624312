"""`backend: modal` end to end through the local twin of Modal (mlops/backends/modal_twin.py).

What is real: the CLI, training (functions/train.py's body in its own process), each release's
serve app (functions/serve.py's body in its own process, the builtin engine standing in for vLLM,
behind a proxy that enforces requires_proxy_auth), the gateway (functions/gateway.py's ASGI app
under uvicorn), the registry, the Dict and Volume (files). What is not: Modal's cloud.
Every process the twin starts is stopped at the end of each test (`stop-all`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, make_project, mlops

STATE_TTL_S = 2.0  # functions/gateway.py: how long the gateway caches the routing state

KEY = "key-1"  # one of MLOPS_API_KEYS; what the runner presents as $MLOPS_API_KEY
APP = "mlops-tiny-reverse"


def twin(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The twin's `modal ...` CLI, as the README tells it."""
    return subprocess.run(
        [sys.executable, "-m", "mlops.backends.modal_twin", *args],
        cwd=cwd,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


class Twin:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.dir = Path(env["MLOPS_MODAL_TWIN"])

    def run(self, *args: str, code: int | None = 0) -> dict[str, Any]:
        r = mlops(*args, "--json", cwd=self.root, env=self.env)
        assert code is None or r.returncode == code, (args, r.returncode, r.stderr[-3000:])
        return dict(json.loads(r.stdout)) if r.stdout.strip() else {"stderr": r.stderr}

    def apps(self) -> dict[str, Any]:
        p = self.dir / "apps.json"
        return dict(json.loads(p.read_text())) if p.is_file() else {}

    def serve_apps(self) -> set[str]:
        return {a.removeprefix(f"{APP}-serve-") for a in self.apps() if a.startswith(f"{APP}-serve-")}

    def deploys(self) -> list[str]:
        p = self.dir / "deploys.log"
        return p.read_text().split() if p.is_file() else []

    @property
    def gateway(self) -> str:
        return str(self.apps()[f"{APP}-gateway"]["url"])

    def ask(self, key: str | None = KEY, **headers: str) -> httpx.Response:
        h = ({"authorization": f"Bearer {key}"} if key else {}) | headers
        body = {"model": "tiny", "prompt": "abc=", "max_tokens": 4}
        return httpx.post(f"{self.gateway}/v1/completions", json=body, headers=h, timeout=60, trust_env=False)


CFG: dict[str, Any] = {
    "backend": "modal",
    "models": {"tiny": {"train": {"steps": 80}}},
    # the fast model's exact match is ~0: its character F-score tells it from a 1-step model
    "gates": [{"eval": "heldout", "metric": "ragas.chrf_score", "min": 0.1}],
    "evals": {"heldout": {"limit": 12, "concurrency": 4}},
    "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 10}},
}


def setup_twin(tmp_path: Path, cfg: dict[str, Any] = CFG) -> Twin:
    """A project with `backend: modal`, and the twin set up with the README's commands."""
    root = make_project(tmp_path / "p", cfg)
    shutil.copytree(REPO / "functions", root / "functions", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"MLOPS_MODAL_TWIN": str(tmp_path / "twin"), "MLOPS_API_KEY": KEY, "MLOPS_WANDB": "disabled"}
    t = Twin(root, env)
    tok = twin("proxy-token", "create", env=env, cwd=root)
    assert tok.returncode == 0, tok.stderr
    values = [
        f"MLOPS_API_KEYS={KEY},key-2",
        "MLOPS_VLLM_API_KEY=vllm-secret",
        *tok.stdout.split(),
    ]
    r = twin("secret", "create", f"{APP}-auth", *values, env=env, cwd=root)
    assert r.returncode == 0, r.stderr
    return t


@pytest.fixture
def t(tmp_path: Path) -> Iterator[Twin]:
    tw = setup_twin(tmp_path)
    try:
        yield tw
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)


@pytest.mark.timeout(900)  # five CLI runs, each starting processes: ~2.5 min quiet, ~6 min on a loaded machine
def test_the_whole_modal_loop_through_the_twin(t: Twin) -> None:
    a = t.run("run")
    assert a["status"] == "promoted" and a["served_by"] == a["release"]
    ev = a["evals"]["heldout"]
    assert ev["exact_match"]["failed"] == 0 and ev["ragas.chrf_score"]["mean"] > 0  # the client had the key
    assert t.ask(key=None).status_code == 401 and t.ask(key="wrong").status_code == 401

    b = t.run("run", "--set", "models.tiny.train.seed=1")
    assert b["status"] == "promoted" and b["previous"] == a["release"]
    steps = b["canary"]
    assert [s["percent"] for s in steps] == [50, 100]
    assert all(s["candidate"]["requests"] > 0 for s in steps)  # live stats, per release, from the gateway
    assert t.ask().headers["x-mlops-release"] == b["release"]
    # a release's own URL is not public: Modal's proxy (the twin's) wants the Proxy Auth Token
    url = t.apps()[f"{APP}-serve-{b['release']}"]["url"]
    assert httpx.get(f"{url}/health", timeout=30, trust_env=False).status_code == 401

    bad = t.run("run", "--set", "models.tiny.train.steps=1", code=3)
    assert bad["status"] == "rejected" and bad["production"] == b["release"]
    assert bad["served_by"] == b["release"] and t.ask().headers["x-mlops-release"] == b["release"]
    assert f"{APP}-serve-{bad['release']}" in t.deploys()  # evaluated through its own app

    before = t.deploys()
    back = t.run("rollback")
    assert back["production"] == a["release"]
    assert f"{APP}-serve-{a['release']}" not in t.deploys()[len(before) :]  # it was up: no redeploy
    assert t.ask().headers["x-mlops-release"] == a["release"]
    # production and previous stay; the rejected release's app is stopped
    assert t.serve_apps() == {a["release"], b["release"]}
    # each release's container counted its GPU time in the Dict (serve_body's Uptime); the runs collected it
    from mlops.backends.modal_settings import ModalSettings
    from mlops.backends.modal_twin import TwinAPI
    from mlops.config import load
    from mlops.serving.uptime import UPTIME

    api = TwinAPI(t.dir, ModalSettings.from_config(load(t.root / "mlops.yaml").cfg, t.root))
    counted = {r for v in api.dict_items(UPTIME).values() for r in v["releases"]}
    assert {a["release"], b["release"], bad["release"]} <= counted
    assert t.run("plan")["budget"]["spent"]["serve_gpu_hours"] > 0

    # a PR's job: its own (empty) registry, the same Modal apps; it trains and evaluates a
    # candidate, and must not publish its registry's routing (production would answer 503)
    pr = Twin(make_project(t.root.parent / "pr", CFG), t.env)
    shutil.copytree(REPO / "functions", pr.root / "functions", ignore=shutil.ignore_patterns("__pycache__"))
    cand = pr.run("train", "--set", "models.tiny.train.seed=2")["release"]
    pr.run("eval", "--release", str(cand), "--set", "models.tiny.train.seed=2", code=None)
    assert t.ask().headers["x-mlops-release"] == a["release"]

    # eight idle days later Modal has dropped every Dict entry: the gateway still routes
    (t.dir / "clock").write_text(str(8 * 24 * 3600))
    deadline = time.monotonic() + 3 * STATE_TTL_S  # past the gateway's state cache
    while time.monotonic() < deadline:
        r = t.ask()
        assert r.status_code == 200 and r.headers["x-mlops-release"] == a["release"], r.text


def test_a_server_that_dies_at_start_fails_fast_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlops.backends.modal import ModalBackend
    from mlops.config import load
    from mlops.errors import InfraError
    from mlops.registry.releases import Registry
    from mlops.registry.store import LocalStore

    tw = setup_twin(tmp_path)
    for k, v in tw.env.items():
        monkeypatch.setenv(k, v)
    registry = Registry(LocalStore(tw.root / ".mlops"), cache_dir=tmp_path / "cache")
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    (art / "model.safetensors").write_bytes(b"not weights")  # sha256-consistent, but it cannot load
    rid = "tiny-20250101-000000-abcdef"
    registry.publish(rid, art, {"model": "tiny"})
    backend = ModalBackend(load(tw.root / "mlops.yaml"), registry)
    t0 = time.monotonic()
    try:
        with pytest.raises(InfraError, match=f"the vLLM server of {rid} failed to start") as e:
            backend.prepare(rid)
        assert "did not load" in e.value.headline  # the end of the server's own log
        assert time.monotonic() - t0 < 300  # not startup_timeout (900 s) + 60
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)


def test_train_and_gateway_apps_are_redeployed_when_their_code_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployed app runs the code of its deploy (the twin snapshots it, as Modal mounts it): a
    change to the code it would run redeploys it before it is used."""
    from mlops.backends.modal import ModalBackend
    from mlops.config import load
    from mlops.registry.releases import Registry
    from mlops.registry.store import LocalStore

    tw = setup_twin(tmp_path)
    for k, v in tw.env.items():
        monkeypatch.setenv(k, v)
    backend = ModalBackend(load(tw.root / "mlops.yaml"), Registry(LocalStore(tw.root / ".mlops")))
    app = f"{APP}-train"
    backend.ensure_current("train.py", app)
    backend.ensure_current("train.py", app)
    assert tw.deploys() == [app]  # unchanged: deployed once
    with (tw.root / "functions" / "train.py").open("a") as f:
        f.write("\nCHANGED = True  # a push that changes the training code\n")
    backend.ensure_current("train.py", app)
    assert tw.deploys() == [app, app]
    assert "CHANGED = True" in (tw.dir / "apps" / app / "src" / "train.py").read_text()

    try:
        # the gateway deployed by hand with ./mlops.yaml's storage, not the run's (CI's old step did
        # that after a proper deploy, so the Dict's digest still matched): the run repairs it
        gw = f"{APP}-gateway"
        run_storage = str(tmp_path / "shared-registry")
        backend = ModalBackend(load(tw.root / "mlops.yaml", [f"storage={run_storage}"]), backend.registry)
        backend.ensure_current("gateway.py", gw)
        assert tw.deploys()[2:] == [gw]
        r = twin("deploy", "functions/gateway.py", env=tw.env, cwd=tw.root)
        assert r.returncode == 0 and tw.deploys()[2:] == [gw, gw], r.stderr
        backend = ModalBackend(backend.loaded, backend.registry)  # the next run
        backend.ensure_current("gateway.py", gw)
        backend.ensure_current("gateway.py", gw)
        assert tw.deploys()[2:] == [gw, gw, gw]  # repaired, once
        assert json.loads(tw.apps()[gw]["env"]["MLOPS_MODAL_SETTINGS"])["storage"] == run_storage
    finally:  # the gateway's container runs until stopped (as on Modal)
        twin("stop-all", env=tw.env, cwd=tw.root)


@pytest.mark.timeout(900)  # two `mlops run`s (~2.5 min quiet)
def test_the_gateway_scales_out_and_to_zero_keeping_its_stats_and_capture(tmp_path: Path) -> None:
    """Two gateway containers share the traffic, and both scale to zero when idle (the twin's
    `containers.json` and `cold_start`, as Modal does under load and without it): the live stats
    the canary reads count every request whichever container served or reads them, also after a
    scale-down in the middle of a canary bake; each container's capture reaches the registry."""
    tw = setup_twin(tmp_path, CFG | {"deploy": {"rollout": {"steps": [100], "requests_per_step": 4}}})
    gateway = f"{APP}-gateway"
    (tw.dir / "containers.json").write_text(json.dumps({gateway: 2}))
    (tw.dir / "cold_start").write_text("0")  # scale to zero, no modelled GPU boot on top
    aged = 0

    def count(what: str) -> int:
        p = tw.dir / "apps" / gateway / what
        return int(p.read_text()) if p.is_file() else 0

    def age() -> None:  # past scaledown_window (300 s) on the twin's clock
        nonlocal aged
        aged += 301
        (tw.dir / "clock").write_text(str(aged))

    def stats(since: float) -> dict[str, Any]:
        h = {"authorization": f"Bearer {KEY}", "x-mlops-capture": "off"}
        r = httpx.get(f"{tw.gateway}/v1/mlops/stats", params={"since": since}, headers=h, timeout=60, trust_env=False)
        assert r.status_code == 200, r.text
        return dict(r.json()["releases"])

    try:
        a = tw.run("run")
        assert a["status"] == "promoted"
        t0 = time.time()
        for _ in range(3):
            r = tw.ask()
            assert r.status_code == 200 and r.headers["x-mlops-release"] == a["release"], r.text
        assert count("tasks") == 2  # the proxy spread the requests over two containers
        assert stats(t0)[a["release"]]["requests"] == 3  # either container counts the other's
        age()
        deadline = time.monotonic() + 120
        while count("tasks") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert count("tasks") == 0, "the idle gateway did not scale to zero"
        starts = count("starts")
        assert stats(t0)[a["release"]]["requests"] == 3  # a fresh container: the stats outlived them
        assert count("starts") == starts + 1

        # each scaled-down container flushed its capture: only the users' requests, not the run's
        files = sorted((tw.root / ".mlops" / "monitor" / "capture").rglob("*-gateway-*.jsonl"))
        records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        assert [(x["prompt"], x["release"], x["source"], x["status"]) for x in records] == [
            ("abc=", a["release"], "gateway", 200)
        ] * 3
        m = tw.run("monitor", "--since", "1h")  # exit 0: the traffic is the eval data's
        assert m["release"] == a["release"] and m["requests"] == len(records) == m["statuses"]["200"], m

        # a canary step whose bake outlasts scaledown_window: the gateway is scaled to zero while
        # it bakes, and the analysis after the bake reads a fresh container
        state = tw.dir / "dicts" / f"{APP}-state.json"
        done = threading.Event()

        def scale_down_mid_bake() -> None:
            while not done.wait(0.1):
                routing = json.loads(state.read_text()).get("state", [{}])[0].get("routing", {})
                if len(routing) == 2:  # the 50% step: its traffic is sent (a second or two), it bakes 6 s
                    time.sleep(2.5)
                    age()
                    return

        watcher = threading.Thread(target=scale_down_mid_bake, daemon=True)
        watcher.start()
        before = count("starts")
        rollout = "deploy.rollout={steps: [50, 100], requests_per_step: 10, bake: 6}"
        try:
            b = tw.run("run", "--set", "models.tiny.train.seed=1", "--set", rollout)
        finally:
            done.set()
            watcher.join(timeout=10)
        assert b["status"] == "promoted" and b["previous"] == a["release"], b
        step = b["canary"][0]
        assert step["percent"] == 50 and step["candidate"]["requests"] > 0, step
        assert count("starts") > before  # it was scaled down mid-bake and started again
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)


@pytest.mark.timeout(1200)  # three `mlops run`s, a rollback, five cold starts: ~4 min quiet
def test_releases_scaled_to_zero_are_woken_not_hit_cold_or_redeployed(tmp_path: Path) -> None:
    """Modal stops an idle release's container (scale to zero) and a request then waits for a cold
    start, minutes for vLLM: longer than the smoke request waits (deploy.server.request_timeout).
    `mlops run` wakes production through the gateway first, so a rejected run still answers
    which release serves (exit 3), rather than failing on a timeout (exit 4); and a rollback to a
    release whose app is deployed but cold wakes it rather than redeploying it."""
    cold_s, smoke_s = 12, 4  # each container start takes 12 s more than the stand-in server's own
    cfg = CFG | {
        "deploy": {"rollout": {"steps": [100], "requests_per_step": 4}, "server": {"request_timeout": smoke_s}}
    }
    tw = setup_twin(tmp_path, cfg)
    (tw.dir / "cold_start").write_text(str(cold_s))
    aged = 0

    def tasks(release: str) -> int:  # running containers: the Tasks column of Modal's app list
        return int((tw.dir / "apps" / f"{APP}-serve-{release}" / "tasks").read_text())

    def idle(*releases: str) -> None:
        """Age the twin's clock past scaledown_window (300 s); wait (bounded) for the scale-down."""
        nonlocal aged
        aged += 301
        (tw.dir / "clock").write_text(str(aged))
        deadline = time.monotonic() + 60
        while any(tasks(r) for r in releases) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [tasks(r) for r in releases] == [0] * len(releases), "idle apps were not scaled to zero"

    try:
        a = tw.run("run")
        assert a["status"] == "promoted" and a["served_by"] == a["release"]
        assert tasks(a["release"]) == 1
        idle(a["release"])
        bad = tw.run("run", "--set", "models.tiny.train.steps=1", code=3)
        assert bad["status"] == "rejected" and bad["served_by"] == a["release"], bad
        assert tasks(a["release"]) == 1  # woken, not redeployed
        assert tw.deploys().count(f"{APP}-serve-{a['release']}") == 1

        b = tw.run("run", "--set", "models.tiny.train.seed=1")
        assert b["status"] == "promoted" and b["previous"] == a["release"]
        idle(a["release"], b["release"])
        before = tw.deploys()
        back = tw.run("rollback")
        assert back["production"] == a["release"]
        assert f"{APP}-serve-{a['release']}" not in tw.deploys()[len(before) :]  # woken, not redeployed
        assert tasks(a["release"]) == 1 and tw.ask().headers["x-mlops-release"] == a["release"]
    finally:
        twin("stop-all", env=tw.env, cwd=tw.root)


PROBE = """
import os
from pathlib import Path

import modal
from images import extra_secrets, settings

app = modal.App("acme-probe")


def probe_body(what, root=None):
    if what == "env":
        return dict(os.environ)
    if what == "files":
        here = Path(__file__).resolve().parent
        return sorted(p.relative_to(here).as_posix() for p in here.rglob("*") if "__pycache__" not in p.parts)
    raise KeyError(f"no {what} here")


@app.function(secrets=extra_secrets(), env=settings.env(PROBE_SETTING="from env="))
def probe(what):
    return probe_body(what)
"""


def test_twin_containers_are_as_bare_as_modals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A twin container sees only what a Modal container would: the image's ENV, `env=`, its
    Secrets (from its environment) and the code Modal mounts; a remote exception keeps its class."""
    from mlops.backends.modal_settings import ModalSettings
    from mlops.backends.modal_twin import TwinAPI
    from mlops.errors import InfraError

    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "probe.py").write_text(PROBE)
    shutil.copy(REPO / "functions" / "images.py", functions / "images.py")
    (functions / "notes.txt").write_text("not mounted")
    monkeypatch.setenv("RUNNER_ONLY", "the runner's")  # e.g. a judge's key exported on the runner
    settings = ModalSettings(app="acme", secrets=("acme-keys",), environment="pr")
    api = TwinAPI(tmp_path / "twin", settings)
    monkeypatch.setenv("MLOPS_MODAL_SETTINGS", settings.to_json())  # what images.py reads at deploy
    with pytest.raises(InfraError, match="Environment 'pr' not found .*modal environment create pr"):
        api.deploy(functions / "probe.py", "acme-probe", {})
    api.environment_create("pr")
    api.secret_create("acme-keys", {"JUDGE_KEY": "main's"}, env="main")  # Secrets are per environment
    with pytest.raises(InfraError, match="Secret 'acme-keys' not found in environment 'pr'"):
        api.deploy(functions / "probe.py", "acme-probe", {})
    api.secret_create("acme-keys", {"JUDGE_KEY": "pr's"})
    api.deploy(functions / "probe.py", "acme-probe", {"DEPLOY_ONLY": "x"})
    try:
        env = api.call("acme-probe", "probe", "env")
        assert env["JUDGE_KEY"] == "pr's" and env["PROBE_SETTING"] == "from env="
        assert "RUNNER_ONLY" not in env and "DEPLOY_ONLY" not in env
        assert set(env) <= {
            "PATH",
            "HOME",
            "TMPDIR",
            "LANG",
            "PYTHONPATH",
            "MLOPS_MODAL_TWIN",
            "MLOPS_MODAL_SETTINGS",
        } | {
            "JUDGE_KEY",
            "PROBE_SETTING",
        }, set(env)
        files = api.call("acme-probe", "probe", "files")
        assert "probe.py" in files and "images.py" in files and "mlops/__init__.py" in files
        assert "notes.txt" not in files and all(f.endswith(".py") or "." not in f.rsplit("/", 1)[-1] for f in files)
        with pytest.raises(KeyError, match="no nothing here"):  # the remote class, as Modal re-raises it
            api.call("acme-probe", "probe", "nothing")
        with pytest.raises(KeyError):
            api.map("acme-probe", "probe", ["env", "nothing"])
        rows = {r["description"]: r for r in api.app_list_json()}
        assert rows["acme-probe"]["state"] == "deployed"
    finally:
        api.stop_all()


def test_serving_uptime_becomes_cost_records_and_the_monthly_cap_stops_a_run(t: Twin) -> None:
    """A serving container's heartbeat (functions/serve.py's Uptime, a real process as its server)
    reaches the twin's Dict; `mlops plan` collects it into cost records, idempotently; a monthly
    serving cap below it stops `mlops run` before it trains. The container's own Uptime is written
    by serve_body in the twin loop above; here the writer is driven directly, to measure its time."""
    from mlops.backends.modal_settings import ModalSettings
    from mlops.backends.modal_twin import TwinAPI
    from mlops.config import load
    from mlops.registry.costs import _gpu_price
    from mlops.serving.uptime import UPTIME, Uptime

    cfg = load(t.root / "mlops.yaml").cfg
    api = TwinAPI(t.dir, ModalSettings.from_config(cfg, t.root))
    t0 = time.time()
    up = Uptime(api.dict_put, f"{APP}-serve-r1", gpu="L4:2", releases=["r1"], model="tiny", beat_s=0.2)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"], text=True)
    up.follow(server)
    assert server.wait(timeout=60) == 0
    assert up.thread is not None
    up.thread.join(timeout=30)
    wall = time.time() - t0
    (entry,) = api.dict_items(UPTIME).values()
    seconds = entry["last_beat"] - entry["started"]
    # it lived from before the server started to after its final beat; the server slept 1.5 s
    assert 1.5 <= seconds <= wall and entry["releases"] == ["r1"] and entry["gpu"] == "L4:2"

    def spent() -> dict[str, float]:
        return dict(t.run("plan")["budget"]["spent"])

    first = spent()
    assert first["serve_gpu_hours"] == pytest.approx(seconds * 2 / 3600, rel=1e-6)
    assert first["usd"] == pytest.approx(seconds * 2 / 3600 * _gpu_price(cfg, "L4"), rel=1e-6)
    assert spent() == first  # collected again: the same records, nothing added

    over = f"budget.per_month.serve_gpu_hours={first['serve_gpu_hours'] / 2}"
    r = mlops("run", "--set", over, cwd=t.root, env=t.env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "budget.per_month.serve_gpu_hours" in r.stderr and "serving has spent" in r.stderr
    assert not (t.root / ".mlops" / "registry" / "releases").exists() or not list(
        (t.root / ".mlops" / "registry" / "releases").iterdir()
    )  # nothing trained
    r = mlops("deploy", "--release", "r1", "--set", over, cwd=t.root, env=t.env)
    assert r.returncode == 1 and "budget.per_month.serve_gpu_hours" in r.stderr, r.stderr[-2000:]
