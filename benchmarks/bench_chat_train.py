"""Chat LoRA fine-tuning throughput: this project's training over TRL's `SFTTrainer` alone.

    python benchmarks/bench_chat_train.py              # ~1-2 minutes on 2 cores
    python benchmarks/bench_chat_train.py --steps 60 --reps 3

Same offline Llama base (built once: 4 layers, hidden 256, 8 heads of 32 with 4 key/value heads,
~3.5 M parameters), same synthetic chat data (multi-turn lookups, system prompt), same settings:
LoRA r 8 on all linear layers, batch 16, max length 256, assistant-only loss, no packing, fp32,
AdamW, the same number of optimizer steps, one CPU thread each. Each side runs in its own
subprocess, alternated `--reps` times; the best of each is kept (the machine is shared).

Tokens/s = real (unpadded) tokens in the batches trained on / the seconds of the training loop
(ours: `train_model`'s loop, as its run record reports; TRL: `trainer.train()`, tokens counted in
its collator). Also reported: the whole call's wall time (ours: `train_model`, setup and export
included; TRL: building the `SFTTrainer` and `train()`). Goal: ours / TRL >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIZES = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "max_position_embeddings": 512}
SETTINGS = {"batch_size": 16, "lr": 2e-3, "max_seq_len": 256, "warmup_steps": 2, "seed": 0}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]}


def conversations(n: int) -> list[dict[str, Any]]:
    rnd = random.Random(0)
    cities = ["Paris", "Lima", "Oslo", "Quito", "Hanoi", "Accra", "Bern", "Doha", "Riga", "Sofia"]
    rows = []
    for i in range(n):
        city = rnd.choice(cities)
        code = f"{rnd.randint(100, 999)}"
        turns = [
            {"role": "system", "content": "You look codes up in the table and answer with the code only."},
            {"role": "user", "content": f"Table: {city}={code}; other=000. What is the code of {city}?"},
            {"role": "assistant", "content": code},
        ]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "And again, please?"}, {"role": "assistant", "content": code}]
        rows.append({"messages": turns})
    return rows


def ours(base: str, data: str, steps: int) -> dict[str, Any]:
    import trl.trainer.sft_trainer  # noqa: F401 - imported before the clock, as on the TRL side

    from mlops.training.train import TrainJob, train_model

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        job = TrainJob(
            model_name="bench", dataset_path=data, out_dir=tmp, base=base, method="lora", lora=LORA,
            steps=steps, threads=1, checkpoint_every=None, **SETTINGS,
        )  # fmt: skip
        r = train_model(job)
        wall = time.perf_counter() - t0
    return {"tokens_per_s": r.tokens_per_s, "tokens": r.tokens, "wall_s": wall, "final_loss": r.final_loss}


def trl(base: str, data: str, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(base)
    counted = [0]
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)

    def counting(batch: list[dict[str, Any]]) -> dict[str, Any]:
        counted[0] += sum(len(b["input_ids"]) for b in batch)
        return collate(batch)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg = SFTConfig(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=SETTINGS["batch_size"],
            learning_rate=SETTINGS["lr"], warmup_steps=SETTINGS["warmup_steps"], lr_scheduler_type="cosine",
            max_length=SETTINGS["max_seq_len"], assistant_only_loss=True, packing=False, seed=SETTINGS["seed"],
            logging_steps=steps, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0, disable_tqdm=True,
        )  # fmt: skip
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        trainer = SFTTrainer(
            model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
            peft_config=peft, data_collator=counting,
        )  # fmt: skip
        t1 = time.perf_counter()
        out = trainer.train()
        loop = time.perf_counter() - t1
        wall = time.perf_counter() - t0
    return {"tokens_per_s": round(counted[0] / loop, 1), "tokens": counted[0], "wall_s": wall,
            "final_loss": out.training_loss}  # fmt: skip


def child(which: str, base: str, data: str, steps: int) -> None:
    sys.path.insert(0, str(REPO))
    result = (ours if which == "ours" else trl)(base, data, steps)
    print("RESULT " + json.dumps(result), flush=True)


def run(which: str, base: str, data: str, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", which, "--base", base, "--data", data, "--steps", str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{which} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--child")
    ap.add_argument("--base")
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.base, a.data, a.steps)
    sys.path.insert(0, str(REPO))
    from mlops.training.offline_base import build_base

    with tempfile.TemporaryDirectory() as tmp:
        rows = conversations(a.conversations)
        data = Path(tmp) / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts = [m["content"] for r in rows for m in r["messages"]]
        base = build_base(Path(tmp) / "base", texts, vocab_size=1024, **SIZES)
        results: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for _ in range(a.reps):
            for which in ("ours", "trl"):
                results[which].append(run(which, str(base), str(data), a.steps))
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
    print(f"chat LoRA fine-tuning, {a.steps} steps x batch {SETTINGS['batch_size']}, best of {a.reps}")
    print(f"{'':8}{'tokens/s':>10}{'tokens':>9}{'wall s':>8}{'loss':>8}   all tokens/s")
    for k, r in best.items():
        runs = ", ".join(f"{x['tokens_per_s']:.0f}" for x in results[k])
        print(f"{k:8}{r['tokens_per_s']:>10.0f}{r['tokens']:>9}{r['wall_s']:>8.1f}{r['final_loss']:>8.3f}   {runs}")
    ratio = best["ours"]["tokens_per_s"] / best["trl"]["tokens_per_s"]
    print(f"ours / TRL SFTTrainer tokens/s: {ratio:.2f} (goal >= 1.0)")
    print(f"TRL wall / ours wall: {best['trl']['wall_s'] / best['ours']['wall_s']:.2f}")


if __name__ == "__main__":
    main()
