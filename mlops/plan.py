"""What a push needs: a model is retrained only when its data, its config or the training code changed.

The fingerprint of a model is the sha256 of (dataset content hash, model config hash, training code
hash). A release with the same fingerprint already in the registry means nothing changed.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from mlops.config import Loaded, config_hash
from mlops.contracts import ModelPlan, Plan
from mlops.datasources import dataset_hash
from mlops.registry.releases import Registry

TRAINING_CODE = Path(__file__).parent / "training"
# keys of a model's config that change the trained weights (resources, max_tokens do not)
TRAIN_KEYS = ("base", "method", "dataset", "prompt", "train", "arch", "lora")


def code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(TRAINING_CODE.rglob("*.py")):
        h.update(p.relative_to(TRAINING_CODE).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def git_sha(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    sha = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def lineage(loaded: Loaded, model: str) -> dict[str, Any]:
    m = loaded.cfg.models[model]
    dataset_hashes = {m.dataset: dataset_hash(loaded, m.dataset)}
    section = {k: v for k, v in m.model_dump(mode="json").items() if k in TRAIN_KEYS}
    cfg_hash = config_hash(section)
    c_hash = code_hash()
    inputs = f"{sorted(dataset_hashes.items())}|{cfg_hash}|{c_hash}"
    extra = _files_hashes(loaded, model)
    if extra:  # only when there is one: the fingerprints of models without them stay what they were
        inputs += "|" + "|".join(f"{k}={v}" for k, v in sorted(extra.items()))
    fp = hashlib.sha256(inputs.encode()).hexdigest()
    return {
        "git_sha": git_sha(loaded.root),
        "dataset_hashes": dataset_hashes,
        "config_hash": cfg_hash,
        "code_hash": c_hash,
        **extra,
        "fingerprint": fp,
    }


def _files_hashes(loaded: Loaded, model: str) -> dict[str, str]:
    """What a model trains from beyond its data and config: a local base directory's files
    (`base_sha256`) and its own training code (`entrypoint_sha256`, train.entrypoint's file)."""
    from mlops.datasources import sha256_path
    from mlops.training.job import resolve_entrypoint, split_entrypoint
    from mlops.training.offline_base import fingerprint

    m = loaded.cfg.models[model]
    out: dict[str, str] = {}
    base = loaded.root / m.base
    if m.base != "scratch" and base.is_dir():
        out["base_sha256"] = fingerprint(base)
    if m.train.entrypoint:
        path, _ = split_entrypoint(resolve_entrypoint(loaded.root, m.train.entrypoint))
        out["entrypoint_sha256"] = sha256_path(path)
    return out


def make_plan(loaded: Loaded, registry: Registry, models: list[str] | None = None, force: bool = False) -> Plan:
    plan = Plan()
    for name in models or [loaded.cfg.deploy.model]:
        lin = lineage(loaded, name)
        existing = registry.find_by_fingerprint(name, lin["fingerprint"])
        ids = {"model": name, "fingerprint": lin["fingerprint"], "lineage": lin}
        if force:
            plan.models.append(ModelPlan(**ids, train=True, reason="forced (--force)"))
        elif existing is None:
            plan.models.append(ModelPlan(**ids, train=True, reason="data, config or training code changed"))
        else:
            reason = f"unchanged since release {existing['id']}"
            plan.models.append(ModelPlan(**ids, train=False, reason=reason, existing=existing["id"]))
    return plan
