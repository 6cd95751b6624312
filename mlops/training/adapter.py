"""LoRA adapters as releases: what an adapter artifact holds, and the fingerprint of its base.

With `lora.serve: adapter` a release's artifact is the peft adapter directory

    adapter_config.json  adapter_model.safetensors  tokenizer.json  tokenizer_config.json  ...

and its manifest says which base it belongs to:

    "adapter": {"base": "bases/tiny-llama", "base_fingerprint": "<sha256>"}

`base` is the model's `base:` as mlops.yaml names it (a directory relative to mlops.yaml, an
absolute path, or a Hugging Face id); `base_fingerprint` is `base_fingerprint(<that base>)`. An
engine loads the base once and the adapters into it, and refuses an adapter whose fingerprint is
not the one of the base it would serve it on: a LoRA delta on another base's weights is noise.

The fingerprint covers what makes a base the same model for an adapter (weights, configuration,
tokenizer) and nothing else: a README or a `.cache` folder beside the weights does not count, so
copying a base (to a Modal Volume, a Hugging Face cache) keeps it. The tokenizer counts because an
adapter learnt token ids.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# what makes up a base for the fingerprint (names at the top of the directory, as Hugging Face saves them)
BASE_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".tiktoken")
BASE_NAMES = ("merges.txt", "vocab.txt")
NOT_BASE = ("mlops_train.json",)  # the run record a trained release carries: not the model

_cache: dict[tuple[str, int, int, int], str] = {}


def is_adapter_dir(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_files(base_dir: Path | str) -> list[Path]:
    root = Path(base_dir)
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in NOT_BASE
        and (p.name.endswith(BASE_SUFFIXES) or p.name in BASE_NAMES)
    )


def base_fingerprint(base_dir: Path | str) -> str:
    """sha256 over a base directory's weight, config and tokenizer files (names and contents).

    Remembered per process by (path, newest mtime, total size, count), and on disk by each file's
    name, size, mtime and inode ($MLOPS_CACHE_HOME, else $XDG_CACHE_HOME/mlops): a real base is gigabytes, and a server and
    every deploy command check each adapter release against it."""
    from mlops.datasources import sha256_path  # chunked: a real base's weights are gigabytes

    root = Path(base_dir).resolve()
    files = base_files(root)
    if not any(p.suffix == ".safetensors" for p in files):
        from mlops.errors import ConfigError

        raise ConfigError(f"{root} holds no safetensors weights: not a base model directory")
    stats = [os.stat(p) for p in files]
    key = (str(root), max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats), len(files))
    if key not in _cache:
        # and per machine: every `mlops deploy`/`rollback` of an adapter release is a new process
        # that checks the base; hashing gigabytes each time would cost what the adapter saves
        files_key = "\n".join(
            f"{p.name} {st.st_size} {st.st_mtime_ns} {st.st_ino}" for p, st in zip(files, stats, strict=True)
        )
        disk_key = hashlib.sha256(f"{root}\n{files_key}".encode()).hexdigest()
        known = _disk_cache().get(disk_key)
        if isinstance(known, str):
            _cache[key] = known
        else:
            h = hashlib.sha256()
            for p in files:
                h.update(f"{p.name}\0{sha256_path(p)}\0".encode())
            _cache[key] = h.hexdigest()
            _remember(disk_key, _cache[key])
    return _cache[key]


def _cache_file() -> Path:
    home = os.environ.get("MLOPS_CACHE_HOME")
    if home:
        return Path(home) / "base-fingerprints.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlops" / "base-fingerprints.json"


def _disk_cache() -> dict[str, object]:
    import json

    try:
        doc = json.loads(_cache_file().read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(disk_key: str, digest: str) -> None:
    """Best effort: a cache that cannot be written is only slower."""
    import json
    import tempfile

    doc = _disk_cache()
    doc[disk_key] = digest
    if len(doc) > 256:  # bases come and go: keep the newest entries
        doc = dict(list(doc.items())[-256:])
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=_cache_file().parent, prefix=".fingerprints-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, _cache_file())  # whole or not at all, as two deploys may write at once
    except OSError:
        pass


def resolve_base(base: str, root: Path | str | None = None) -> Path | None:
    """The local directory of a base as `models.<m>.base` names it: a directory (relative to
    `root`, mlops.yaml's folder, or absolute), or a Hugging Face id already in the local cache.
    None when it is neither (scratch, or a hub id never downloaded here)."""
    if base == "scratch":
        return None
    for cand in ((Path(root) / base) if root is not None else None, Path(base)):
        if cand is not None and cand.is_dir():
            return cand.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache: the caller says what is missing
        return None


def served_base(release_id: str, adapter: dict[str, object], root: Path | str | None) -> Path:
    """The base directory an adapter release is served on, once its fingerprint matches the one
    recorded when the adapter was trained; else a one-line UsageError (exit 1): nothing is routed."""
    from mlops.errors import UsageError

    ref, want = str(adapter.get("base") or ""), str(adapter.get("base_fingerprint") or "")
    local = resolve_base(ref, root) if ref else None
    if local is None:
        raise UsageError(f"release {release_id} is a LoRA adapter on base {ref!r}, which is not on this machine")
    got = base_fingerprint(local)
    if got != want:
        raise UsageError(
            f"release {release_id} is a LoRA adapter for base {ref!r} with fingerprint {want[:12]}…, but that "
            f"base is now {got[:12]}…: refusing to serve it (retrain it on this base, or use lora.serve: merged)"
        )
    return local


def check_adapter_files(path: Path | str) -> None:
    """The adapter's config parses and its weights' header reads, with every tensor inside the file.

    Read by hand (8 bytes of header length, the JSON header; the format's own layout), not with
    safetensors' `safe_open(..., "pt")`, which imports torch: 2.4 s of a `mlops deploy` of an adapter
    release that otherwise takes well under one (measured), and the server loads the tensors anyway."""
    import json
    import struct

    root = Path(path)
    cfg = json.loads((root / ADAPTER_CONFIG).read_text())
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise ValueError(f"{ADAPTER_CONFIG} is not a peft adapter config")
    weights = root / ADAPTER_WEIGHTS
    size = weights.stat().st_size
    with weights.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{ADAPTER_WEIGHTS} is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):  # the format caps the header at 100 MB
            raise ValueError(f"{ADAPTER_WEIGHTS}: header length {n} does not fit the file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{ADAPTER_WEIGHTS}: the header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise ValueError(f"{ADAPTER_WEIGHTS} holds no tensors")
    for name, t in tensors.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise ValueError(f"{ADAPTER_WEIGHTS}: tensor {name} lies outside the file")
