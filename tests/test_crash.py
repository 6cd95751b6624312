"""Issue 9 item 5: kill -9 at random moments (not only at step boundaries), seeded and bounded.

After each kill: the state is consistent, a running server answers only from production (or a
canary whose lease is still live) and, once the killed run's lease has expired, only from
production; after the next run there is no orphan artifact directory, `.tmp` file or training output."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Served, make_project, wait_for
from test_rollout import Zygote, consistent, killable, served_by

from mlops.config import load
from mlops.pipeline import Session
from mlops.pipeline import run as run_pipeline
from mlops.registry.lease import live

# one xdist queue with the other load-sensitive modules (tests/conftest.py: pytest-xdist)
pytestmark = pytest.mark.xdist_group("heavy")

TTL_S = 4.0
CRASH = {
    "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 8, "lease_ttl": f"{TTL_S}s"}},
    "evals": {"heldout": {"limit": 8}},
    "models": {"tiny": {"max_tokens": 4, "train": {"steps": 4}}},
}
ROUNDS = 5


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served, Zygote]]:
    with killable(make_project(tmp_path_factory.mktemp("crash"), CRASH)) as k:
        yield k


def orphans(root: Path) -> list[str]:
    reg = root / ".mlops"
    out = [str(p) for p in reg.rglob(".*.tmp")]
    for d in (reg / "artifacts").iterdir():
        if not (reg / "releases" / d.name / "manifest.json").is_file():
            out.append(str(d))
    build = reg / "cache" / "build"
    out += [str(p) for p in build.iterdir() if p.is_dir()] if build.is_dir() else []
    return out


def test_kill_9_at_random_offsets_never_leaves_a_canary_serving_or_orphans(cp: tuple[Path, Served, Zygote]) -> None:
    root, server, zygote = cp
    rng = random.Random(20261130)
    reg = Session.open(load(root / "mlops.yaml")).registry
    for i in range(ROUNDS):
        seed = f"models.tiny.train.seed={300 + i}"
        delay = rng.uniform(0.3, 9.0)
        rc, output = zygote.mlops("run", "--set", seed, cwd=root, env={"MLOPS_TEST_KILL_AFTER": f"{delay:.2f}"})
        killed_at = time.time()
        assert rc in (-signal.SIGKILL, 0), f"round {i}: rc {rc}\n{output[-3000:]}"
        st = consistent(reg)
        prod = st.stages["production"]
        for rid in st.live_routing():
            assert rid == prod or (rid == st.stages["canary"] and live(st.lease)), (i, delay, st.to_json())
        # once the dead run's lease has expired, the server answers from production alone
        until = killed_at + TTL_S + 0.5
        wait_for(lambda t=until: time.time() > t and not live(reg.read_state()[0].lease), "expiry")  # type: ignore[misc]
        assert set(served_by(server.url, 8)) == {reg.read_state()[0].stages["production"]}, (i, delay)

        res = run_pipeline(Session.open(load(root / "mlops.yaml", [seed])))  # the next run
        assert res.exit_code in (0, 3), res.message
        st = consistent(reg)
        assert st.routing == {st.stages["production"]: 100} and not st.lease, st.to_json()
        assert orphans(root) == [], (i, delay, orphans(root))
