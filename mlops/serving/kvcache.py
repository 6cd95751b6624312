"""Surgery on a running batch's key/value cache: keep some rows, or stack two batches into one.

The cache is mlops.serving.native.Cache or a transformers DynamicCache (per layer [batch, heads, length, dim]) with a [batch,
length] attention mask that is 1 where a row holds a real token; rows are left-padded.
"""

from __future__ import annotations

from typing import Any, TypeVar

S = TypeVar("S")  # a row's bookkeeping (the engine's _Seq), carried along with its cache row


def select(seqs: list[S], keep: list[int], n: int, cache: Any, mask: Any) -> tuple[list[S], Any, Any]:
    """Keep rows `keep` of the batch, and drop leading cache columns no remaining row uses.
    The cache object is reused as long as nothing changes (the common decode step)."""
    import torch

    if not keep:
        return [], None, None
    used = mask.any(0) if len(keep) == n else mask.index_select(0, torch.tensor(keep)).any(0)
    first = int(used.to(torch.int8).argmax())  # the first column a remaining row uses
    if len(keep) == n and first == 0:
        return seqs, cache, mask
    idx = torch.tensor(keep, dtype=torch.long)
    tensors = [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:]) for k, v in _kv(cache)]
    return seqs, _cache(tensors, cache), mask.index_select(0, idx)[:, first:]


def join(a: list[S], ca: Any, ma: Any, b: list[S], cb: Any, mb: Any) -> tuple[list[S], Any, Any]:
    """One batch from two: left-pad the shorter cache with masked zeros, then stack rows."""
    import torch

    if not b:
        return a, ca, ma
    if not a:
        return b, cb, mb
    la, lb = ma.shape[1], mb.shape[1]
    length = max(la, lb)

    def pad(t: Any, n: int) -> Any:
        if n == 0:
            return t
        dim = 2 if t.dim() == 4 else 1
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    tensors = [
        (
            torch.cat([pad(k1, length - la), pad(k2, length - lb)]),
            torch.cat([pad(v1, length - la), pad(v2, length - lb)]),
        )
        for (k1, v1), (k2, v2) in zip(_kv(ca), _kv(cb), strict=True)
    ]
    mask = torch.cat([pad(ma, length - la), pad(mb, length - lb)])
    return a + b, _cache(tensors, ca), mask


def _kv(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(tensors: list[tuple[Any, Any]], like: Any) -> Any:
    """A cache of the same kind as `like` (the engine's native one, or transformers')."""
    if hasattr(like, "from_tensors"):
        return like.from_tensors(tensors)
    from transformers import DynamicCache

    return DynamicCache(tensors)
