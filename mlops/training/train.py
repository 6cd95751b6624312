"""Train one model and save it in Hugging Face format (config, safetensors, tokenizer.json).

`train_model(job)` is a plain function: the local backend calls it in-process and
`functions/train.py` wraps the very same function in a Modal GPU function. With `runs_dir` set it
checkpoints (see checkpoint.py) and a call with the same fingerprint resumes where the last one
stopped, ending with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlops.errors import ConfigError
from mlops.training.data import Example, read_source
from mlops.training.job import NOT_WEIGHTS, TrainJob, TrainResult, job_from_config
from mlops.training.setup import Setup, build

# What the model's forward takes from a collated batch (the labels stay ours: the loss is summed per token).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")

__all__ = ["Progress", "TrainJob", "TrainResult", "job_from_config", "train_model"]

Progress = Callable[[dict[str, float]], None]
EVAL_SAMPLE = 64  # examples in the fixed eval sample (eval_every)


def _lr_factor(step: int, job: TrainJob) -> float:
    """Linear warmup, then cosine down to 10% of the peak."""
    if step < job.warmup_steps:
        return (step + 1) / job.warmup_steps
    progress = (step - job.warmup_steps) / max(1, job.steps - job.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _encode(tok: Any, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


def _limit(job: TrainJob, s: Setup) -> int:
    if job.max_seq_len is not None and job.max_seq_len > s.max_len:
        raise ConfigError(f"train.max_seq_len {job.max_seq_len} is over the model's context length {s.max_len}")
    return job.max_seq_len or s.max_len


def encode_pairs(job: TrainJob, s: Setup, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (prompt, completion + eos); over the limit: an error, or cut with max_seq_len
    (`truncation: drop` leaves the example out instead)."""
    limit = _limit(job, s)
    out = []
    for p, c in pairs:
        pi, ci = _encode(s.tok, p), [*_encode(s.tok, c), s.eos_id]
        if len(pi) + len(ci) > limit:
            if job.max_seq_len is None:
                raise ConfigError(
                    f"{job.dataset_path}: an example is {len(pi) + len(ci)} tokens, over n_positions={limit} "
                    "(set train.max_seq_len to truncate)"
                )
            if job.truncation == "drop":
                continue
            # keep the completion (what is learnt) and the end of the prompt, nearest to it
            ci = ci[: limit - 1]
            pi = pi[len(pi) - (limit - len(ci)) :] if limit > len(ci) else []
        out.append((pi, ci))
    if not out:
        raise ConfigError(f"every example is over train.max_seq_len ({limit} tokens) and was dropped")
    return out


@dataclass
class Batches:
    """A recipe's training rows and how a list of them becomes a batch of tensors (with `labels`)."""

    rows: list[Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    tokens: Callable[[Any], int]  # real (unpadded) tokens of one row
    record: dict[str, Any]


def prepare(job: TrainJob, s: Setup, examples: list[Example]) -> Batches:
    """Pairs and completions: prompt + completion, loss on the completion. Chat: the base's template."""
    if examples[0].format == "chat":
        from mlops.training import chat

        chat.check_template(s.hf_tok, job.base)
        data = chat.encode_chats(s.hf_tok, examples, _limit(job, s), job.truncation, job.packing)
        return Batches(data.rows, chat.collator(s.pad_id, job.packing), lambda r: len(r["input_ids"]), data.record)
    pairs = [(job.prompt.format(input=r.input), r.expected or "") for r in examples]
    encoded = encode_pairs(job, s, pairs)
    record = {"format": examples[0].format, "conversations": 0, "dropped": len(pairs) - len(encoded)}

    def collate(b: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        return dict(zip(("input_ids", "labels", "attention_mask"), _collate(b, s.pad_id), strict=True))

    return Batches(encoded, collate, lambda r: len(r[0]) + len(r[1]), record)


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (p, c) in enumerate(batch):
        seq = p + c
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(p) : len(seq)] = torch.tensor(c)  # loss on the completion only
    return ids, labels, mask


def loss_sum(model: Any, batch: dict[str, Any], lean: bool = False) -> Any:
    """Summed token loss over the labelled tokens (the caller divides by the step's count of them,
    so gradient accumulation is exact); a -100 label adds nothing."""
    import torch.nn.functional as F  # noqa: N812

    if lean:  # the lean GPT-2 (right padding, so causal attention suffices)
        logits = model(batch["input_ids"])
    else:
        # no KV cache: training never reuses one, and with one transformers skips the packed-sequence mask
        logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}, use_cache=False).logits
    logits = logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")


def _to(batch: dict[str, Any], dev: str) -> dict[str, Any]:
    return {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.items()}


def _targets(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _eval_loss(s: Setup, data: Batches, dev: str, prec: str) -> float:
    import torch

    from mlops.training.runtime import autocast

    s.model.eval()
    total, n = 0.0, 0
    sample = data.rows[:EVAL_SAMPLE]
    with torch.no_grad(), autocast(prec, dev):
        for i in range(0, len(sample), 16):
            batch = _to(data.collate(sample[i : i + 16]), dev)
            total += float(loss_sum(s.model, batch, s.lean))
            n += _targets(batch)
    s.model.train()
    return total / max(n, 1)


def _eos_ids(configured: Any, eos: int) -> int | list[int]:
    """The tokenizer's eos first, then any the base's generation config names (a chat base ends a
    turn with one token and a document with another: generation stops at either)."""
    ids = configured if isinstance(configured, list) else [] if configured is None else [configured]
    merged = [eos, *(i for i in ids if i != eos)]
    return merged if len(merged) > 1 else eos


def base_fingerprint(base: str) -> str | None:
    """sha256 of a local base directory's files (None for scratch or a hub id)."""
    from mlops.training.offline_base import fingerprint

    return fingerprint(base) if base != "scratch" and Path(base).is_dir() else None


def _adapter_base_fingerprint(base: str) -> str:
    from mlops.training.adapter import base_fingerprint as fingerprint
    from mlops.training.adapter import resolve_base

    local = resolve_base(base)
    if local is None:
        raise ConfigError(f"lora.serve: adapter: cannot find the base {base!r} on this machine to fingerprint it")
    return fingerprint(local)


def train_model(  # noqa: C901 - one linear recipe; the pieces live in setup/checkpoint/runtime
    job: TrainJob, progress: Progress | None = None, on_checkpoint: Callable[[Path], None] | None = None
) -> TrainResult:
    import torch

    from mlops.training import runtime
    from mlops.training.checkpoint import Checkpointer, fingerprint, rng_state, set_rng_state

    if job.entrypoint:  # your own training code (train.entrypoint) instead of this recipe
        from mlops.training.entrypoint import run

        return run(job)
    t0 = time.perf_counter()
    if job.threads:
        torch.set_num_threads(job.threads)
    dev = runtime.device()
    prec = runtime.resolve_precision(job.precision, dev, job.method)
    runtime.reset_peak(dev)
    torch.manual_seed(job.seed)
    rows = read_source(
        job.dataset_path,
        job.dataset_format,
        job.input_field,
        job.target_field,
        training=f"model {job.model_name!r}'s training set",
    )
    if rows[0].format == "chat" and job.base == "scratch":
        raise ConfigError(
            f"model {job.model_name!r}: chat data needs a base with a chat template, not 'scratch' "
            "(build one offline: mlops base build --arch llama --data <chat.jsonl> --out bases/tiny-llama)"
        )
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    s = build(job, [(job.prompt.format(input=r.input), r.expected or "") for r in rows], dev, prec)
    data = prepare(job, s, rows)
    params = [p for p in s.model.parameters() if p.requires_grad]
    trainable = {n: p for n, p in s.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, job))
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None
    gen = torch.Generator().manual_seed(job.seed)

    fp = fingerprint(job.model_dump(exclude=NOT_WEIGHTS), job.dataset_path)
    ck: Checkpointer | None = None
    start, tokens_seen, loss_ema, prior_s, eval_loss = 0, 0, float("nan"), 0.0, None
    if job.runs_dir:
        ck = Checkpointer(Path(job.runs_dir) / f"{job.model_name}-{fp[:16]}", fp, job.keep_checkpoints, on_checkpoint)
        resumed = ck.latest(trainable)
        if resumed is not None:
            st = resumed.state
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            if scaler is not None and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            set_rng_state(st["rng"], gen)
            start, tokens_seen, loss_ema = resumed.step, int(st["tokens"]), float(st["loss_ema"])
            prior_s, eval_loss = float(st["train_seconds"]), st.get("eval_loss")
    resumed_from = start
    s.model.train()
    n, last = len(data.rows), loss_ema
    session_tokens = 0
    t_train = last_ck = time.perf_counter()
    for step in range(start, job.steps):
        micro = [
            [data.rows[i] for i in torch.randint(0, n, (job.batch_size,), generator=gen).tolist()]
            for _ in range(job.grad_accum)
        ]
        batches = [data.collate(b) for b in micro]
        n_tok = sum(_targets(b) for b in batches)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for rows_b, b in zip(micro, batches, strict=True):
            with runtime.autocast(prec, dev):
                loss = loss_sum(s.model, _to(b, dev), s.lean) / n_tok
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.item()
            session_tokens += sum(data.tokens(r) for r in rows_b)
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        last = step_loss
        loss_ema = last if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * last
        done = step + 1
        evaluated = bool(job.eval_every and done % job.eval_every == 0)
        if evaluated:
            eval_loss = _eval_loss(s, data, dev, prec)
        now = time.perf_counter()
        due = (job.checkpoint_every_steps and done % job.checkpoint_every_steps == 0) or (
            job.checkpoint_every_s is not None and now - last_ck >= job.checkpoint_every_s
        )
        if ck is not None and due and done < job.steps:
            state = {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": rng_state(gen),
                "tokens": tokens_seen + session_tokens,
                "loss_ema": loss_ema,
                "train_seconds": prior_s + now - t_train,
                "eval_loss": eval_loss,
            }
            ck.save(done, trainable, state, {"loss_ema": loss_ema})
            last_ck = time.perf_counter()
        if progress is not None:
            elapsed = time.perf_counter() - t_train
            tick = {"step": done, "loss": loss_ema, "tokens_per_s": session_tokens / max(elapsed, 1e-9)}
            progress(tick | ({"eval_loss": eval_loss} if evaluated and eval_loss is not None else {}))
    if start < job.steps and not math.isfinite(last):
        from mlops.errors import InfraError

        raise InfraError(f"training diverged: loss is {last}")
    seconds = time.perf_counter() - t_train

    adapter: dict[str, str] | None = None
    if job.serves_adapter:  # the release is the adapter alone; engines load it into the shared base
        s.model.save_pretrained(str(out), safe_serialization=True)
        (out / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing in it is ours
        parameters = sum(p.numel() for p in trainable.values())
        adapter = {"base_fingerprint": _adapter_base_fingerprint(job.base)}
    else:
        export = s.export(job)
        export.eval().to("cpu")
        export.generation_config.pad_token_id = s.pad_id
        export.generation_config.eos_token_id = _eos_ids(export.generation_config.eos_token_id, s.eos_id)
        export.generation_config.do_sample = False
        export.save_pretrained(str(out), safe_serialization=True)
        parameters = sum(p.numel() for p in export.parameters())
    s.save_tokenizer(out)
    gpu, count = runtime.gpu_type(job.gpu, dev)
    gpu_seconds = round((prior_s + seconds) * count, 3)
    result = TrainResult(
        out_dir=str(out),
        steps=job.steps,
        final_loss=loss_ema,
        seconds=round(time.perf_counter() - t0, 3),
        tokens_per_s=round(session_tokens / max(seconds, 1e-9), 1),
        parameters=parameters,
        device=dev,
        precision=prec,
        tokens=tokens_seen + session_tokens,
        gpu_type=gpu,
        gpu_count=count,
        gpu_seconds=gpu_seconds,
        peak_memory_mb=runtime.peak_memory_mb(dev),
        cost_usd=runtime.cost_usd(gpu, gpu_seconds, job.gpu_prices),
        resumed_from_step=resumed_from,
        checkpoints_written=ck.written if ck is not None else 0,
        eval_loss=eval_loss,
        data=data.record,
        base_sha256=base_fingerprint(job.base),
        adapter=adapter,
        fingerprint=fp,
    )
    meta = {
        "job": job.model_dump()
        | {"out_dir": None, "dataset_path": os.path.basename(job.dataset_path), "runs_dir": None},
        "result": asdict(result) | {"out_dir": None},
    }
    (out / "mlops_train.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if ck is not None:
        ck.clear()  # the artifact is written: this run is done and its checkpoints are spent
    return result
