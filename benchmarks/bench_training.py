"""Training throughput and memory: fp32 vs bf16, with and without gradient checkpointing.

    python benchmarks/bench_training.py                  # CPU, ~30 M parameters, ~3 minutes on 2 cores
    python benchmarks/bench_training.py --device cuda    # GPU, ~125 M parameters in bf16: tokens/s and MFU

Each configuration runs `mlops.training.train.train_model` (the real loop: the lean GPT-2 from
scratch, AdamW, clipping, the LR schedule) in its own subprocess on the same synthetic dataset
(reversal of random letter strings, as the shipped example, but long enough that activations
matter), so every peak-memory figure is that process's own. Reported per configuration: tokens/s
over the timed steps (the first `--warmup` steps are excluded), the training's peak memory up to its
last step, before the export (CPU: peak resident set minus the resident set before training
started, so it includes the model build; CUDA: torch's peak allocated),
and ratios against the fp32 baseline measured in the same run.

MFU (CUDA only) = achieved FLOP/s / the GPU's peak dense bf16 FLOP/s, counting 6 N FLOPs per token
for the weights plus 12 L d T for attention (the PaLM appendix B accounting).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

CPU_ARCH = {"n_layer": 10, "n_embd": 512, "n_head": 8, "n_positions": 128}  # ~31.5 M parameters
GPU_ARCH = {"n_layer": 18, "n_embd": 768, "n_head": 12, "n_positions": 512}  # ~128 M parameters
# Peak dense bf16 tensor FLOP/s from the vendors' data sheets (no sparsity); --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121, "B200": 2250}

CONFIGS_CPU = [
    ("fp32", {"precision": "fp32"}),
    ("bf16", {"precision": "bf16"}),
    ("fp32 + grad ckpt", {"precision": "fp32", "gradient_checkpointing": True}),
    ("bf16 + grad ckpt", {"precision": "bf16", "gradient_checkpointing": True}),
]
CONFIGS_GPU = [
    ("bf16", {"precision": "bf16"}),
    ("bf16 + grad ckpt", {"precision": "bf16", "gradient_checkpointing": True}),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process; prints its result as one JSON line."""
    import torch

    from mlops.training.runtime import peak_memory_mb
    from mlops.training.train import TrainJob, train_model

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    stamps: list[tuple[int, float]] = []
    peaks: list[float] = []
    before = _rss_mb()

    def tick(d: dict[str, float]) -> None:
        stamps.append((int(d["step"]), time.perf_counter()))
        # the high-water mark while training, read before the export (which copies the weights)
        peaks.append(peak_memory_mb("cuda" if torch.cuda.is_available() else "cpu"))

    r = train_model(TrainJob(**spec["job"]), progress=tick)
    warm = spec["warmup"]
    (s0, t0), (s1, t1) = stamps[warm - 1], stamps[-1]
    tokens_per_step = r.tokens / r.steps  # every row has the same length: equal tokens per step
    out = {
        "tokens_per_s": tokens_per_step * (s1 - s0) / (t1 - t0),
        "parameters": r.parameters,
        "precision": r.precision,
        "device": r.device,
        "tokens_per_step": tokens_per_step,
    }
    if r.device == "cuda":
        out["peak_mb"] = peaks[-1]
        out["gpu"] = torch.cuda.get_device_name(0)
    else:
        out["peak_mb"] = peaks[-1] - before
    return out


def lean_vs_hf(iters: int = 30) -> tuple[float, float]:
    """Seconds per forward+backward+AdamW step, tiny example shape (mlops.yaml), batch 64 of 32 tokens:
    the lean GPT-2 that `base: scratch` trains, then transformers' GPT2LMHeadModel of the same shape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlops.training.model import TinyGPT

    arch = {"n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 32}
    ids = torch.randint(0, 40, (64, 32), generator=torch.Generator().manual_seed(0))
    out = []
    for lean in (True, False):
        torch.manual_seed(0)
        model: Any = (
            TinyGPT(40, **arch)
            if lean
            else GPT2LMHeadModel(GPT2Config(vocab_size=40, bos_token_id=0, eos_token_id=0, **arch))
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            logits = model(ids) if lean else model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out.append(sorted(times)[len(times) // 2])  # median: robust to a neighbour's burst
    return out[0], out[1]


def dataset(path: Path, rows: int, length: int, seed: int = 0) -> None:
    """Reversal of random strings; every row the same length, so every step has the same tokens."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
            f.write(json.dumps({"id": f"r{i}", "input": s, "expected": s[::-1]}) + "\n")


def run(name: str, job: dict[str, Any], warmup: int, threads: int | None) -> dict[str, Any]:
    spec = {"job": job, "warmup": warmup, "threads": threads}
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=900
    )
    if p.returncode != 0:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps per configuration (default: 6 cpu, 60 cuda)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 2 cpu, 10 cuda)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 8 cpu, 16 cuda")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(json.loads(args.child))))
        return

    gpu = args.device == "cuda"
    arch = GPU_ARCH if gpu else CPU_ARCH
    steps = args.steps or (60 if gpu else 6)
    warmup = args.warmup or (10 if gpu else 2)
    batch = args.batch_size or (16 if gpu else 8)
    # prompt "<s>=" + completion + eos fills the context exactly: (L + 1) + L + 1 = n_positions
    length = (arch["n_positions"] - 2) // 2
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        data = Path(tmp) / "data.jsonl"
        dataset(data, 2000, length)
        base = {
            "model_name": "bench",
            "dataset_path": str(data),
            "out_dir": str(Path(tmp) / "out"),
            "prompt": "{input}=",
            "steps": steps,
            "batch_size": batch,
            "lr": 1e-3,
            "warmup_steps": 1,
            "arch": arch,
            "threads": args.threads,
        }
        results = []
        for name, extra in CONFIGS_GPU if gpu else CONFIGS_CPU:
            r = run(name, base | extra, warmup, args.threads)
            results.append((name, r))
            print(f"  {name:<18} {r['tokens_per_s']:>10,.0f} tok/s  peak {r['peak_mb']:>8,.0f} MiB", flush=True)

    ref = results[0][1]
    print(
        f"\n{ref['parameters'] / 1e6:.1f} M parameters, {ref['tokens_per_step']:.0f} tokens/step, {steps} steps "
        f"({warmup} untimed), device {ref['device']}{' ' + ref.get('gpu', '') if gpu else ''}"
    )
    print(f"\n| configuration | tokens/s | vs {results[0][0]} | peak MiB | vs {results[0][0]} |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results:
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x "
            f"| {r['peak_mb']:,.0f} | {r['peak_mb'] / max(ref['peak_mb'], 1e-9):.2f}x |"
        )
    if gpu:
        name = ref.get("gpu", "").upper()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        n, layers, d, t = ref["parameters"], arch["n_layer"], arch["n_embd"], arch["n_positions"]
        flops_per_token = 6 * n + 12 * layers * d * t
        if peak is None:
            print(f"\nMFU: unknown peak for {name!r}; pass --peak-tflops")
        else:
            mfu = ref["tokens_per_s"] * flops_per_token / (peak * 1e12)
            print(f"\nMFU ({results[0][0]}): {mfu:.1%} of {peak:g} TFLOP/s (target >= 35%)")
    if not gpu:
        sys.path.insert(0, str(REPO))
        lean, hf = lean_vs_hf()
        print(
            f"\nscratch path, tiny example shape: lean GPT-2 {lean * 1e3:.1f} ms/step, "
            f"GPT2LMHeadModel {hf * 1e3:.1f} ms/step: lean is {hf / lean:.2f}x faster"
        )
    print(f"wall time {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
