"""The builtin engine's own forward pass for GPT-2 and the Llama family, straight from safetensors.

Importing transformers' model code costs more CPU than everything else `mlops serve` does before
its first answer (on the example: ~4 s of a ~4.5 s start-up; transformers pulls in torch._dynamo,
torch.distributed.tensor and sympy to define a GPT-2). The engine needs one thing from a model: a
forward pass over left-padded rows with a key/value cache. For the architectures the template
trains and serves (`gpt2`: the example; `llama`, `qwen2`, `mistral`: `mlops base build` and the
usual chat bases) that pass is a few dozen lines of torch over the very same safetensors, so the
engine runs it here and transformers is never imported. Anything else (another architecture, rope
scaling, a feature below that is not implemented) is refused by `load`, and the engine falls back
to transformers; `MLOPS_NATIVE=0` forces that fallback.

Parity with transformers is tested logit for logit on every architecture (tests/test_native.py):
same weights, same left padding, same positions, prefill and cached decode steps.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("gpt2", "llama", "qwen2", "mistral")
ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")


class Config:
    """config.json as attributes (None for a key it lacks, as the engine reads optional keys)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    def __getattr__(self, name: str) -> Any:  # only called for keys config.json lacks
        return None


@dataclass
class _Layer:
    keys: Any  # [batch, kv heads, length, head dim]
    values: Any


class Cache:
    """Per layer keys and values: the shape `kvcache.py` operates on (as a transformers DynamicCache)."""

    def __init__(self, tensors: list[tuple[Any, Any]]) -> None:
        self.layers = [_Layer(k, v) for k, v in tensors]

    @classmethod
    def from_tensors(cls, tensors: list[tuple[Any, Any]]) -> Cache:
        return cls(tensors)


@dataclass
class Output:
    logits: Any
    past_key_values: Cache


def why_not(cfg: dict[str, Any]) -> str | None:
    """Why this config is not run natively (None: it is)."""
    arch = cfg.get("model_type")
    if arch not in ARCHS:
        return f"model_type {arch!r}"
    act = cfg.get("activation_function" if arch == "gpt2" else "hidden_act") or (
        "gelu_new" if arch == "gpt2" else "silu"
    )
    if act not in ACTS:
        return f"activation {act!r}"
    if arch == "gpt2":
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            return "GPT-2 attention variants"
        if cfg.get("scale_attn_weights") is False or cfg.get("add_cross_attention"):
            return "GPT-2 attention variants"
        return None
    scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "?"
    if kind not in (None, "default"):
        return f"rope scaling {kind!r}"
    if cfg.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embeddings"
    if cfg.get("mlp_bias"):
        return "MLP biases"
    return None


def load(model_dir: Path) -> NativeLM | None:
    """The model in `model_dir` run natively, or None when it is not one this module runs."""
    if os.environ.get("MLOPS_NATIVE", "1") == "0":
        return None
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # transformers' loader gives the error its usual wording
    files = sorted(model_dir.glob("*.safetensors"))
    if why_not(cfg) is not None or not files or (model_dir / "adapter_config.json").exists():
        return None
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return NativeLM(Config(cfg), weights)


class NativeLM:
    """Callable as the engine calls a transformers causal LM: (input_ids, attention_mask,
    position_ids, past_key_values) -> Output(logits, past_key_values)."""

    def __init__(self, config: Config, w: dict[str, Any]) -> None:
        import torch

        self.config = config
        self.gpt2 = config.model_type == "gpt2"
        # LoRA adapters by name: (layer, module) -> (A [r, in], B [out, r], scaling)
        self.adapters: dict[str, dict[tuple[int, str], tuple[Any, Any, float]]] = {}
        c = config
        if self.gpt2:
            self.n_layer, self.n_head, self.dim = c.n_layer, c.n_head, c.n_embd
            self.n_kv = self.n_head
            self.eps = c.layer_norm_epsilon or 1e-5
            self.act = c.activation_function or "gelu_new"
            pre = "transformer." if "transformer.wte.weight" in w else ""
            self.embed, self.wpe = w[f"{pre}wte.weight"].float(), w[f"{pre}wpe.weight"].float()
            self.norm = (w[f"{pre}ln_f.weight"].float(), w[f"{pre}ln_f.bias"].float())
            self.head = w.get("lm_head.weight", self.embed).float()
            self.layers = [self._gpt2_layer(w, f"{pre}h.{i}.") for i in range(self.n_layer)]
        else:
            self.n_layer, self.n_head, self.dim = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
            self.n_kv = c.num_key_value_heads or self.n_head
            self.eps = c.rms_norm_eps or 1e-6
            self.act = c.hidden_act or "silu"
            self.head_dim = c.head_dim or self.dim // self.n_head
            self.embed = w["model.embed_tokens.weight"].float()
            self.norm = (w["model.norm.weight"].float(), None)
            tied = c.tie_word_embeddings if c.tie_word_embeddings is not None else False
            self.head = (self.embed if tied or "lm_head.weight" not in w else w["lm_head.weight"]).float()
            self.layers = [self._llama_layer(w, f"model.layers.{i}.") for i in range(self.n_layer)]
            params = c.rope_parameters if isinstance(c.rope_parameters, dict) else {}
            theta = float(params.get("rope_theta") or c.rope_theta or 10000.0)
            self.inv_freq = 1.0 / (
                theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim)
            )
        if self.gpt2:
            self.head_dim = self.dim // self.n_head

    # ------------------------------------------------------------------ weights

    @staticmethod
    def _gpt2_layer(w: dict[str, Any], p: str) -> dict[str, Any]:
        # GPT-2's Conv1D stores [in, out]: transposed once here so every step is a plain linear
        return {
            "ln1": (w[p + "ln_1.weight"].float(), w[p + "ln_1.bias"].float()),
            "qkv": (w[p + "attn.c_attn.weight"].float().t().contiguous(), w[p + "attn.c_attn.bias"].float()),
            "o": (w[p + "attn.c_proj.weight"].float().t().contiguous(), w[p + "attn.c_proj.bias"].float()),
            "ln2": (w[p + "ln_2.weight"].float(), w[p + "ln_2.bias"].float()),
            "fc": (w[p + "mlp.c_fc.weight"].float().t().contiguous(), w[p + "mlp.c_fc.bias"].float()),
            "proj": (w[p + "mlp.c_proj.weight"].float().t().contiguous(), w[p + "mlp.c_proj.bias"].float()),
        }

    @staticmethod
    def _llama_layer(w: dict[str, Any], p: str) -> dict[str, Any]:
        import torch

        a = p + "self_attn."

        def lin(name: str) -> tuple[Any, Any]:
            b = w.get(name + ".bias")
            return w[name + ".weight"].float(), None if b is None else b.float()

        q, k, v = lin(a + "q_proj"), lin(a + "k_proj"), lin(a + "v_proj")
        bias = None if q[1] is None else torch.cat([q[1], k[1], v[1]])  # Qwen2: q/k/v biases
        gate, up = w[p + "mlp.gate_proj.weight"].float(), w[p + "mlp.up_proj.weight"].float()
        return {
            "ln1": w[p + "input_layernorm.weight"].float(),
            "qkv": (torch.cat([q[0], k[0], v[0]]), bias),
            "o": lin(a + "o_proj"),
            "ln2": w[p + "post_attention_layernorm.weight"].float(),
            "gate_up": torch.cat([gate, up]),
            "down": w[p + "mlp.down_proj.weight"].float(),
        }

    # ------------------------------------------------------------------ LoRA adapters

    def _slots(self) -> dict[str, list[tuple[str, int, int]]]:
        """Each fused projection's LoRA targets: (module, first, last output column)."""
        d, hd = self.dim, self.head_dim
        if self.gpt2:
            inner = self.layers[0]["fc"][0].shape[0]
            return {
                "qkv": [("attn.c_attn", 0, 3 * d)],
                "o": [("attn.c_proj", 0, d)],
                "fc": [("mlp.c_fc", 0, inner)],
                "proj": [("mlp.c_proj", 0, d)],
            }
        nq, nk = self.n_head * hd, self.n_kv * hd
        inter = self.layers[0]["down"].shape[1]
        return {
            "qkv": [
                ("self_attn.q_proj", 0, nq),
                ("self_attn.k_proj", nq, nq + nk),
                ("self_attn.v_proj", nq + nk, nq + 2 * nk),
            ],
            "o": [("self_attn.o_proj", 0, d)],
            "gate_up": [("mlp.gate_proj", 0, inter), ("mlp.up_proj", inter, 2 * inter)],
            "down": [("mlp.down_proj", 0, d)],
        }

    def load_adapter(self, path: str | Path, adapter_name: str, **_: Any) -> None:
        """Load a peft LoRA adapter directory under `adapter_name` (ValueError: not one this runs)."""
        import re

        from safetensors.torch import load_file

        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        unsupported = [
            k
            for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
            if cfg.get(k)
        ]
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
            raise ValueError(
                f"a LoRA variant the native forward pass does not run ({', '.join(unsupported) or 'bias'})"
            )
        r = int(cfg["r"])
        scaling = float(cfg.get("lora_alpha", r)) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        known = {m: (lo, hi) for slots in self._slots().values() for m, lo, hi in slots}
        pat = re.compile(r"\.(?:h|layers)\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
        parts: dict[tuple[int, str], dict[str, Any]] = {}
        for key, t in load_file(str(path / "adapter_model.safetensors")).items():
            m = pat.search(key)
            if m is None or m.group(2) not in known:
                raise ValueError(f"adapter weight {key} is not on a projection the native forward pass adapts")
            parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t.float()
        weights = {}
        for (i, mod), ab in parts.items():
            lo, hi = known[mod]
            if set(ab) != {"A", "B"} or ab["B"].shape[0] != hi - lo or i >= self.n_layer:
                raise ValueError(f"adapter weights for layer {i} {mod} do not fit this base")
            weights[(i, mod)] = (ab["A"], ab["B"], scaling)
        self.adapters[adapter_name] = weights

    def delete_adapter(self, adapter_name: str) -> None:
        self.adapters.pop(adapter_name, None)

    def _groups(self, names: list[str] | None) -> list[tuple[dict[tuple[int, str], Any], Any]]:
        """(adapter weights, rows or None for all) for each adapter in the batch; base rows: none."""
        import torch

        if not names:
            return []
        if len(set(names)) == 1:
            w = self.adapters.get(names[0])
            return [(w, None)] if w else []
        rows: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if n in self.adapters:
                rows.setdefault(n, []).append(i)
        return [(self.adapters[n], torch.tensor(r)) for n, r in rows.items()]

    @staticmethod
    def _lora(x: Any, y: Any, i: int, slots: list[tuple[str, int, int]], groups: list[Any]) -> Any:
        """`y` (the projection of `x`) plus each row's adapter delta, B(A(x)) * scaling, in place."""
        import torch.nn.functional as F

        for w, rows in groups:
            for mod, lo, hi in slots:
                ab = w.get((i, mod))
                if ab is None:
                    continue
                a, b, scaling = ab
                if rows is None:
                    y[..., lo:hi] += F.linear(F.linear(x, a), b) * scaling
                else:
                    y[rows, :, lo:hi] += F.linear(F.linear(x[rows], a), b) * scaling
        return y

    # ------------------------------------------------------------------ forward

    def _act(self, x: Any) -> Any:
        import torch.nn.functional as F

        if self.act in ("gelu_new", "gelu_pytorch_tanh"):
            return F.gelu(x, approximate="tanh")
        if self.act == "gelu":
            return F.gelu(x)
        if self.act == "relu":
            return F.relu(x)
        return F.silu(x)

    def _ln(self, x: Any, wb: tuple[Any, Any]) -> Any:
        import torch.nn.functional as F

        return F.layer_norm(x, (self.dim,), wb[0], wb[1], self.eps)

    def _rms(self, x: Any, weight: Any) -> Any:
        import torch

        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + self.eps))

    def _rotary(self, pos: Any) -> tuple[Any, Any]:
        import torch

        freqs = pos[..., None].float() * self.inv_freq  # [batch, length, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [batch, 1, length, dim]
        return emb.cos(), emb.sin()

    @staticmethod
    def _rotate(x: Any, cos: Any, sin: Any) -> Any:
        import torch

        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any,
        position_ids: Any,
        past_key_values: Cache | None = None,
        use_cache: bool = True,
        adapter_names: list[str] | None = None,  # per row: a loaded adapter's name, or any other for the base
    ) -> Output:
        import torch
        import torch.nn.functional as F

        b, t = input_ids.shape
        past = past_key_values.layers if past_key_values is not None else None
        keep = attention_mask.bool()  # [batch, total length]: the keys a row may see
        total = keep.shape[1]
        # causal over the new tokens, and never a padding key; a padding query sees itself only,
        # so its (unused) output stays finite and no NaN reaches the cache
        cols = torch.arange(total - t, total)
        allowed = (torch.arange(total)[None, :] <= cols[:, None])[None] & keep[:, None, :]  # [batch, t, total]
        allowed[:, torch.arange(t), cols] = True
        allowed = allowed[:, None]  # [batch, 1, t, total]
        if self.gpt2:
            x = self.embed[input_ids] + self.wpe[position_ids]
        else:
            x = self.embed[input_ids]
            cos, sin = self._rotary(position_ids)
        new: list[tuple[Any, Any]] = []
        hd = self.head_dim
        groups = self._groups(adapter_names)
        slots = self._slots() if groups else {}

        def proj(h: Any, wb: Any, i: int, slot: str) -> Any:
            w, b = wb if isinstance(wb, tuple) else (wb, None)
            y = F.linear(h, w, b)
            return self._lora(h, y, i, slots[slot], groups) if groups else y

        for i, L in enumerate(self.layers):
            h = self._ln(x, L["ln1"]) if self.gpt2 else self._rms(x, L["ln1"])
            qkv = proj(h, L["qkv"], i, "qkv")
            q, k, v = qkv.split([self.n_head * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
            q = q.view(b, t, self.n_head, hd).transpose(1, 2)
            k = k.view(b, t, self.n_kv, hd).transpose(1, 2)
            v = v.view(b, t, self.n_kv, hd).transpose(1, 2)
            if not self.gpt2:
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            if past is not None:
                k = torch.cat([past[i].keys, k], dim=2)
                v = torch.cat([past[i].values, v], dim=2)
            new.append((k, v))
            if self.n_kv != self.n_head:  # grouped-query attention: each kv head serves a group of q heads
                rep = self.n_head // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            att = att.transpose(1, 2).reshape(b, t, self.n_head * hd)
            x = x + proj(att, L["o"], i, "o")
            if self.gpt2:
                h = self._ln(x, L["ln2"])
                x = x + proj(self._act(proj(h, L["fc"], i, "fc")), L["proj"], i, "proj")
            else:
                h = self._rms(x, L["ln2"])
                gate, up = proj(h, L["gate_up"], i, "gate_up").chunk(2, dim=-1)
                x = x + proj(self._act(gate) * up, L["down"], i, "down")
        if self.gpt2:
            x = self._ln(x, self.norm)
        else:
            x = self._rms(x, self.norm[0])
        return Output(F.linear(x, self.head), Cache(new))

    def eval(self) -> NativeLM:
        return self
