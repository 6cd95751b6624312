"""LoRA adapters as releases (issue 18.3): with `lora.serve: adapter` a release's artifact is the
peft adapter plus its base's fingerprint; the builtin engine loads the base once and the adapters
into it, serving them in one batch; a mismatched base is refused before anything is routed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import make_project, train_and_publish

from mlops.errors import ConfigError

ADAPTER = {
    "base": "bases/tiny",
    "method": "lora",
    "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"], "serve": "adapter"},
    "train": {"steps": 4, "batch_size": 8, "lr": 5.0e-2, "warmup_steps": 1},
}


@dataclass
class Project:
    root: Path
    base: Path
    releases: list[str]
    registry: Any


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Project:
    from mlops.config import load
    from mlops.pipeline import Session
    from mlops.training.offline_base import build_base

    root = make_project(tmp_path_factory.mktemp("adapters") / "proj", {"models": {"tiny": ADAPTER}})
    texts = [json.loads(line)["input"] for line in (root / "data/train.jsonl").read_text().splitlines()]
    base = build_base(
        root / "bases/tiny",
        texts,
        vocab_size=300,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=64,
    )
    releases = [train_and_publish(root, seed=0), train_and_publish(root, seed=1, promote=False)]
    return Project(root, base, releases, Session.open(load(root / "mlops.yaml")).registry)


def test_an_adapter_release_holds_the_adapter_and_its_base_fingerprint(proj: Project) -> None:
    from mlops.training.adapter import base_fingerprint

    for rid in proj.releases:
        m = proj.registry.manifest(rid)
        assert m["adapter"] == {"base": "bases/tiny", "base_fingerprint": base_fingerprint(proj.base)}
        files = set(m["artifact"]["files"])
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
        assert "config.json" not in files and "model.safetensors" not in files  # not a merged copy
    a, b = (proj.registry.manifest(r)["artifact"]["files"]["adapter_model.safetensors"] for r in proj.releases)
    assert a != b  # two seeds, two adapters


def test_the_fingerprint_covers_weights_config_and_tokenizer_only(proj: Project, tmp_path: Path) -> None:
    import shutil

    from mlops.training.adapter import base_fingerprint

    copy = Path(shutil.copytree(proj.base, tmp_path / "copy"))
    (copy / "README.md").write_text("notes beside the weights do not change the model")
    assert base_fingerprint(copy) == base_fingerprint(proj.base)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg | {"model_max_length": 63}))
    assert base_fingerprint(copy) != base_fingerprint(proj.base)


def test_serving_an_adapter_needs_a_lora_method(tmp_path: Path) -> None:
    from mlops.config import load

    root = make_project(tmp_path / "p", {"models": {"tiny": {"lora": {"serve": "adapter"}}}})
    with pytest.raises(ConfigError, match="lora.serve: adapter needs method: lora or qlora"):
        load(root / "mlops.yaml")


# ---------------------------------------------------------------------------- serving


def reference(base: Path, adapter_dir: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """What peft alone makes of each prompt with one adapter on the base (greedy, one at a time)."""
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p, add_special_tokens=False).ids])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
        out.append(tok.decode(gen[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return out


PROMPTS = [f"{w}=" for w in ("abc", "kjxt", "bdw", "hello", "zyx", "mnop", "qrs", "tuvw")]


def _complete(url: str, prompt: str, pin: str | None = None) -> tuple[str, str]:
    import httpx

    headers = {"x-mlops-release": pin} if pin else {}
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-mlops-release"], r.json()["choices"][0]["text"]


def _wait_serving(pool: Any, version: int) -> None:
    import time

    deadline = time.monotonic() + 60  # a loaded 2-core box
    while pool.state().version < version:
        assert time.monotonic() < deadline, "the server never served the new state"
        time.sleep(0.02)


def test_adapter_releases_share_one_base_canary_rollback_and_refusal(proj: Project) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mlops.config import load
    from mlops.errors import UsageError
    from mlops.pipeline import Session
    from mlops.rollout import rollback
    from mlops.serving.runner import build, start_server
    from mlops.serving.server import create_app

    a, b = proj.releases
    want = {
        r: dict(zip(PROMPTS, reference(proj.base, proj.registry.artifact_dir(r), PROMPTS, 6), strict=True))
        for r in (a, b)
    }
    assert want[a] != want[b]  # else a mix-up between the adapters could pass unseen

    s = Session.open(load(proj.root / "mlops.yaml"))
    pool, opts = build(s.loaded, s.registry, threads=1, retain=0.0)
    pool.start()
    try:
        with start_server(create_app(pool, opts)) as url:
            assert _complete(url, PROMPTS[0]) == (a, want[a][PROMPTS[0]])
            base = next(iter(pool.bases.bases().values()))

            def canary(st: Any) -> Any:
                st.stages["canary"], st.routing = b, {a: 50, b: 50}
                return st

            _wait_serving(pool, s.backend.set_state(canary, reason="test canary").version)
            # Whether two requests share a batch is up to the scheduler: on a loaded box one burst can
            # arrive one request at a time. Up to five bursts: mixing never seen in any is a failure.
            for _burst in range(5):
                with ThreadPoolExecutor(8) as ex:
                    answers = list(ex.map(lambda p: (p, *_complete(url, p)), PROMPTS * 3))
                assert {r for _, r, _ in answers} == {a, b}
                for prompt, rel, text in answers:
                    assert text == want[rel][prompt], (rel, prompt)
                if base.mixed_steps > 0:
                    break
            assert base.mixed_steps > 0  # the two adapters decoded in the same batch
            assert pool.bases.loads == 1 and set(base.adapters) == {a, b}

            state, _ = rollback(s.backend, a, reason="test rollback", actor="test")
            _wait_serving(pool, state.version)
            assert {_complete(url, p) for p in PROMPTS[:3]} == {(a, want[a][p]) for p in PROMPTS[:3]}
            assert pool.bases.loads == 1 and next(iter(pool.bases.bases().values())) is base

            # a release that left every stage is unloaded (retain=0 here): its adapter leaves the base
            def only_a(st: Any) -> Any:
                st.stages = dict.fromkeys(st.stages) | {"production": a}
                return st

            _wait_serving(pool, s.backend.set_state(only_a, reason="test drop").version)
            deadline = __import__("time").monotonic() + 60
            while b in base.adapters:
                assert __import__("time").monotonic() < deadline, "the dropped adapter was never unloaded"
                __import__("time").sleep(0.02)
            assert _complete(url, PROMPTS[1]) == (a, want[a][PROMPTS[1]]) and pool.bases.loads == 1

            # an adapter trained on another base: refused before any routing moves, and by the pool
            bad = f"{a}-otherbase"
            s.registry.publish(
                bad,
                s.registry.artifact_dir(b),
                {"model": "tiny", "adapter": {"base": "bases/tiny", "base_fingerprint": "0" * 64}},
            )
            before = s.registry.read_state()[0]
            with pytest.raises(UsageError, match=f"release {bad} is a LoRA adapter for base 'bases/tiny'"):
                rollback(s.backend, bad, reason="test", actor="test")
            assert s.registry.read_state()[0].to_json() == before.to_json()
            with pytest.raises(UsageError, match="refusing to serve it"):
                pool.get(bad)
            assert _complete(url, PROMPTS[2]) == (a, want[a][PROMPTS[2]])
    finally:
        pool.close()
    assert not pool.bases.bases()  # the base closed with its last adapter


def test_closing_an_adapter_release_lets_its_requests_finish_then_unloads_it(proj: Project) -> None:
    import threading

    from mlops.serving.genrequest import EngineClosed, GenRequest
    from mlops.serving.pool import ReleasePool

    a, b = proj.releases
    want = reference(proj.base, proj.registry.artifact_dir(a), PROMPTS[:1], 6)[0]
    pool = ReleasePool(proj.registry, threads=1, root=proj.root)
    try:
        va, vb = pool.get(a), pool.get(b)
        base = va.base  # type: ignore[attr-defined]
        assert vb.base is base and pool.bases.loads == 1  # type: ignore[attr-defined]
        req = GenRequest(prompt=PROMPTS[0], max_tokens=6)
        with base._model_lock:  # the worker cannot run a step: the request stays in flight
            va.submit(req)
            closing = threading.Thread(target=va.close, kwargs={"drain_timeout": 60})
            closing.start()
            assert va.closed and a in base.adapters and va.busy == 1
            with pytest.raises(EngineClosed):
                va.submit(GenRequest(prompt=PROMPTS[1], max_tokens=2))  # a closing release takes no more
        closing.join(timeout=90)
        assert not closing.is_alive()
        assert req.finished and req.error is None and req.text == want  # answered with its adapter
        assert a not in base.adapters and b in base.adapters and not base.closed
        vb.close()
        assert base.closed and not pool.bases.bases()  # the base went with its last adapter
    finally:
        pool.close()


def test_the_fingerprint_is_hashed_once_per_machine_not_per_command(proj: Project, tmp_path: Path) -> None:
    """A deploy command is a new process: it reads the base's digest from the machine's cache, and
    a changed file is hashed again."""
    import shutil
    import subprocess
    import sys

    from mlops.training.adapter import base_fingerprint

    copy = Path(shutil.copytree(proj.base, tmp_path / "fp"))
    code = (
        "import sys, mlops.datasources as d, mlops.training.adapter as a\n"
        "n = [0]; f = d.sha256_path\n"
        "def count(p): n[0] += 1; return f(p)\n"
        "d.sha256_path = count\n"
        f"print(a.base_fingerprint({str(copy)!r}), n[0])"
    )

    def fresh_process() -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        digest, hashed = out.stdout.split()
        return digest, int(hashed)

    first, hashed = fresh_process()
    assert first == base_fingerprint(proj.base) and hashed > 0
    assert fresh_process() == (first, 0)  # remembered on disk: nothing hashed
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "x": 1}', 1))
    changed, hashed = fresh_process()
    assert changed != first and hashed > 0


def test_the_deploy_command_of_an_adapter_release_imports_no_torch_and_refuses_a_broken_one(
    proj: Project, tmp_path: Path
) -> None:
    """`mlops rollback --to <adapter release>` (the one-step deploy) runs without Typer and checks the
    adapter's files without torch (2.4 s of a deploy that otherwise takes a fraction of one), answers
    as the Typer command does, and still refuses weights that do not read."""
    import shutil
    import subprocess
    import sys

    from mlops.config import load
    from mlops.errors import InfraError
    from mlops.pipeline import Session
    from mlops.rollout import rollback

    a, b = proj.releases
    probe = (
        "import sys\n"
        "sys.argv = ['mlops', *sys.argv[1:]]\n"
        "from mlops.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'typer', 'rich'})\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )

    def cli(*args: str, typer: bool = False) -> tuple[dict[str, Any], str]:
        code = "from mlops.cli.app import app; app()" if typer else probe
        out = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=proj.root, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout), out.stderr

    fast, stderr = cli("rollback", "--to", b, "--reason=test fast", "--json")
    assert "HEAVY=\n" in stderr  # neither torch nor Typer and rich
    assert proj.registry.read_state()[0].stages["production"] == b
    slow, _ = cli("rollback", "--to", a, "--reason", "test typer", "--json", typer=True)
    assert list(fast) == list(slow) and (fast["production"], slow["production"]) == (b, a)
    assert fast["rolled_back_from"] == a and slow["rolled_back_from"] == b
    assert fast["state_version"] + 1 == slow["state_version"]

    s = Session.open(load(proj.root / "mlops.yaml"))
    broken = Path(shutil.copytree(proj.registry.artifact_dir(a), tmp_path / "broken"))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # a tensor's bytes lie past the end of the file
    manifest = {k: v for k, v in proj.registry.manifest(a).items() if k in ("model", "adapter")}
    s.registry.publish(f"{a}-truncated", broken, manifest)
    before = s.registry.read_state()[0]
    with pytest.raises(InfraError, match="cannot load adapter .* lies outside the file"):
        rollback(s.backend, f"{a}-truncated", reason="test", actor="test")
    assert s.registry.read_state()[0].to_json() == before.to_json()
