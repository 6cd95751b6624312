"""A lean GPT-2 for training from scratch, with weights laid out exactly as Hugging Face's GPT-2.

Training a 0.6 M-parameter model is dominated by per-op overhead on CPU; this module is
GPT-2 (pre-LN blocks, tanh-GELU, learned positions, tied head) in ~60 lines with fused SDPA
attention, ~2-3x faster per step here than `GPT2LMHeadModel`. `hf_state_dict()` converts to
GPT-2's names and Conv1D layout, so the saved artifact is a stock `GPT2LMHeadModel` that
transformers and vLLM load unchanged (a test checks the logits match).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, n_positions: int, n_embd: int, n_layer: int, n_head: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.gradient_checkpointing = False  # recompute each block in backward: memory for compute
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by depth
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for blk in self.h:
            if self.gradient_checkpointing and self.training:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head, as GPT-2

    def hf_state_dict(self) -> dict[str, Any]:
        """GPT2LMHeadModel's names; its Conv1D stores (in, out), so Linear weights are transposed."""
        sd: dict[str, Any] = {
            "transformer.wte.weight": self.wte.weight,
            "transformer.wpe.weight": self.wpe.weight,
            "transformer.ln_f.weight": self.ln_f.weight,
            "transformer.ln_f.bias": self.ln_f.bias,
            "lm_head.weight": self.wte.weight,
        }
        for i, b in enumerate(self.h):
            p = f"transformer.h.{i}."
            for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
                sd[p + theirs + ".weight"] = getattr(b, ours).weight
                sd[p + theirs + ".bias"] = getattr(b, ours).bias
            for ours, theirs in (
                ("c_attn", "attn.c_attn"),
                ("attn_proj", "attn.c_proj"),
                ("c_fc", "mlp.c_fc"),
                ("mlp_proj", "mlp.c_proj"),
            ):
                sd[p + theirs + ".weight"] = getattr(b, ours).weight.T.contiguous()
                sd[p + theirs + ".bias"] = getattr(b, ours).bias
        return {k: v.detach().clone() for k, v in sd.items()}
