"""Resumable training: atomic checkpoints in a run directory keyed by the run's fingerprint.

    <runs_dir>/<model>-<fingerprint[:16]>/ckpt-00000120/{weights.safetensors, state.pt, meta.json}

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into place
(rename is atomic on one filesystem), so a reader sees a whole checkpoint or none. The fingerprint
covers the job's config, the dataset's content and the training code running now: a run started
again with the same three resumes; one with new code starts over, so a run never spans two code
versions. Loading reads safetensors and `torch.load(weights_only=True)` only: no pickle from storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlops.util import fsync

TRAINING_CODE = Path(__file__).parent
PREFIX = "ckpt-"
log = logging.getLogger("mlops.training")


def code_hash() -> str:
    """sha256 over the training package's sources (the same recipe as mlops.plan.code_hash)."""
    h = hashlib.sha256()
    for p in sorted(TRAINING_CODE.rglob("*.py")):
        h.update(p.relative_to(TRAINING_CODE).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(job_fields: dict[str, Any], dataset: Path | str) -> str:
    """config (the fields that change the weights) + data content (any source) + running code."""
    from mlops.datasources import content_hash

    data = content_hash(str(dataset), Path.cwd())
    cfg = json.dumps(job_fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{cfg}|{data}|{code_hash()}".encode()).hexdigest()


# ---------------------------------------------------------------------------- RNG states


def rng_state(gen: Any) -> dict[str, Any]:
    """Every random stream a step may draw from, as tensors and plain values (weights_only-safe)."""
    import numpy as np
    import torch

    np_state: Any = np.random.get_state()  # a tuple (kind, keys, pos, has_gauss, gauss) for MT19937
    kind, keys, pos, has_gauss, gauss = np_state
    version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": gen.get_state(),  # the data position: batches are drawn from this generator
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any], gen: Any) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], *state["numpy_gauss"]))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- files


@dataclass
class Resumed:
    step: int
    state: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class Checkpointer:
    """Write, prune, find and load one run's checkpoints; `on_write` runs after each (Modal: commit)."""

    run_dir: Path
    fingerprint: str
    keep: int = 2
    on_write: Callable[[Path], None] | None = None
    written: int = 0
    skipped: list[str] = field(default_factory=list)

    def checkpoints(self) -> list[Path]:
        if not self.run_dir.is_dir():
            return []
        found = [p for p in self.run_dir.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def save(self, step: int, weights: dict[str, Any], state: dict[str, Any], meta: dict[str, Any]) -> Path:
        import torch
        from safetensors.torch import save_file

        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / f"{PREFIX}{step:08d}"
        tmp = self.run_dir / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        meta = meta | {"step": step, "fingerprint": self.fingerprint, "code_hash": code_hash()}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        for name in ("weights.safetensors", "state.pt", "meta.json"):
            fsync(tmp / name)
        fsync(tmp)
        if final.exists():  # the same step from an earlier attempt: identical content, keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync(self.run_dir)
        self.written += 1
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        if self.on_write is not None:
            self.on_write(final)
        return final

    def latest(self, weights_into: dict[str, Any]) -> Resumed | None:
        """Load the newest usable checkpoint into `weights_into` (name -> parameter); None if none.

        Leftover temporary directories (a crash mid-write) are removed; a checkpoint of another
        fingerprint or code version is never loaded."""
        import torch
        from safetensors.torch import load_file

        if self.run_dir.is_dir():
            for p in self.run_dir.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)
        code = code_hash()
        for ck in reversed(self.checkpoints()):
            try:
                meta = json.loads((ck / "meta.json").read_text())
            except (OSError, ValueError):
                self.skipped.append(f"{ck.name}: unreadable meta.json")
                continue
            if meta.get("fingerprint") != self.fingerprint or meta.get("code_hash") != code:
                self.skipped.append(f"{ck.name}: another fingerprint or code version")
                continue
            tensors = load_file(str(ck / "weights.safetensors"))
            if set(tensors) != set(weights_into):
                self.skipped.append(f"{ck.name}: parameters do not match the model")
                continue
            try:
                state = torch.load(ck / "state.pt", weights_only=True, map_location="cpu")
            except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # not plain tensors: never run it
                self.skipped.append(f"{ck.name}: state.pt refused by the weights-only loader ({type(e).__name__})")
                log.warning("checkpoint %s refused: %s", ck, self.skipped[-1])
                continue
            with torch.no_grad():
                for name, t in tensors.items():
                    weights_into[name].copy_(t)
            return Resumed(int(meta["step"]), state, meta)
        return None

    def clear(self) -> None:
        """The run finished and its artifact is written: its checkpoints are no longer needed."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
