"""Train one model and save it in Hugging Face format (config, safetensors, tokenizer.json).

`train_model(job)` is a plain function: the local backend calls it in-process and
`functions/train.py` wraps the very same function in a Modal GPU function.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlops.errors import ConfigError
from mlops.training.data import read_jsonl

Progress = Callable[[dict[str, float]], None]


@dataclass
class TrainJob:
    model_name: str
    dataset_path: str
    out_dir: str
    base: str = "scratch"
    method: str = "full"
    prompt: str = "{input}"
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    warmup_steps: int = 50
    weight_decay: float = 0.0
    threads: int | None = None
    arch: dict[str, int] = field(default_factory=lambda: {"n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 64})
    lora: dict[str, Any] = field(
        default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["c_attn"]}
    )
    input_field: str = "input"
    target_field: str = "expected"


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    final_loss: float
    seconds: float
    tokens_per_s: float
    parameters: int
    device: str


def _lr_at(step: int, job: TrainJob) -> float:
    if step < job.warmup_steps:
        return job.lr * (step + 1) / job.warmup_steps
    progress = (step - job.warmup_steps) / max(1, job.steps - job.warmup_steps)
    return job.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _encode(tok: Any, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


def train_model(job: TrainJob, progress: Progress | None = None) -> TrainResult:  # noqa: C901 - one linear recipe
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from mlops.training.lora import apply_lora, merge_lora
    from mlops.training.model import TinyGPT
    from mlops.training.tokenizer import EOS, PAD, build_char_tokenizer, save_tokenizer

    t0 = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = read_jsonl(Path(job.dataset_path), job.input_field, job.target_field)
    pairs = [(job.prompt.format(input=r.input), r.expected or "") for r in rows]
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model: Any
    hf_model: Any
    if job.base == "scratch":
        if job.method == "lora":
            raise ConfigError("method: lora needs a pretrained base, not 'scratch'")
        hf_tok = None
        tok = build_char_tokenizer([p + c for p, c in pairs])
        pad_id, eos_id = tok.token_to_id(PAD), tok.token_to_id(EOS)
        arch: dict[str, Any] = dict(job.arch)
        cfg = GPT2Config(
            vocab_size=tok.get_vocab_size(), bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, **arch
        )
        hf_model = GPT2LMHeadModel(cfg)
        model = TinyGPT(cfg.vocab_size, **job.arch)
        max_len = job.arch["n_positions"]
    else:
        from transformers import AutoTokenizer

        hf_model = None
        hf_tok = AutoTokenizer.from_pretrained(job.base)
        tok = hf_tok.backend_tokenizer
        eos_id = hf_tok.eos_token_id
        pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_id
        model = AutoModelForCausalLM.from_pretrained(job.base, dtype=torch.float32)
        max_len = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)

    encoded = []
    for p, c in pairs:
        pi, ci = _encode(tok, p), [*_encode(tok, c), eos_id]
        if len(pi) + len(ci) > max_len:
            raise ConfigError(
                f"{job.dataset_path}: an example is {len(pi) + len(ci)} tokens, over n_positions={max_len}"
            )
        encoded.append((pi, ci))

    if job.method == "lora":
        params = apply_lora(
            model, **{k: job.lora[k] for k in ("r", "alpha", "dropout")}, targets=job.lora["target_modules"]
        )
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    model.to(device).train()
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay)
    gen = torch.Generator().manual_seed(job.seed)
    n = len(encoded)
    tokens_seen, loss_ema, last = 0, float("nan"), 0.0
    t_train = time.perf_counter()
    for step in range(job.steps):
        idx = torch.randint(0, n, (job.batch_size,), generator=gen).tolist()
        batch = [encoded[i] for i in idx]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, c) in enumerate(batch):
            seq = p + c
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = torch.tensor(c)  # loss on the completion only
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, job)
        if hf_model is not None:  # from scratch: the lean GPT-2 (right padding, so causal attention suffices)
            logits = model(ids)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens_seen += int(mask.sum())
        last = loss.item()
        loss_ema = last if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * last
        if progress is not None:
            elapsed = time.perf_counter() - t_train
            progress({"step": step + 1, "loss": loss_ema, "tokens_per_s": tokens_seen / max(elapsed, 1e-9)})
    if not math.isfinite(last):
        from mlops.errors import InfraError

        raise InfraError(f"training diverged: loss is {last}")
    seconds = time.perf_counter() - t_train

    if job.method == "lora":
        merge_lora(model)
    if hf_model is not None:
        missing, unexpected = hf_model.load_state_dict(model.cpu().hf_state_dict(), strict=False)
        if unexpected or any(not k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
            raise RuntimeError(f"GPT-2 export mismatch: missing {missing}, unexpected {unexpected}")
        model = hf_model
    model.eval().to("cpu")
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.do_sample = False
    model.save_pretrained(str(out), safe_serialization=True)
    if hf_tok is not None:
        hf_tok.save_pretrained(str(out))
    else:
        save_tokenizer(tok, out, max_len)
    result = TrainResult(
        out_dir=str(out),
        steps=job.steps,
        final_loss=loss_ema,
        seconds=round(time.perf_counter() - t0, 3),
        tokens_per_s=round(tokens_seen / max(seconds, 1e-9), 1),
        parameters=sum(p.numel() for p in model.parameters()),
        device=device,
    )
    meta = {
        "job": asdict(job) | {"out_dir": None, "dataset_path": os.path.basename(job.dataset_path)},
        "result": asdict(result) | {"out_dir": None},
    }
    (out / "mlops_train.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return result
