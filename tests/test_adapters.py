"""LoRA adapters as releases (issue 18.3): with `lora.serve: adapter` a release's artifact is the
peft adapter plus its base's fingerprint; the builtin engine loads the base once and the adapters
into it, serving them in one batch; a mismatched base is refused before anything is routed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import make_project, train_and_publish

from mlops.errors import ConfigError

ADAPTER = {
    "base": "bases/tiny",
    "method": "lora",
    "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"], "serve": "adapter"},
    "train": {"steps": 4, "batch_size": 8, "lr": 5.0e-2, "warmup_steps": 1},
}


@dataclass
class Project:
    root: Path
    base: Path
    releases: list[str]
    registry: Any


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Project:
    from mlops.config import load
    from mlops.pipeline import Session
    from mlops.training.offline_base import build_base

    root = make_project(tmp_path_factory.mktemp("adapters") / "proj", {"models": {"tiny": ADAPTER}})
    texts = [json.loads(line)["input"] for line in (root / "data/train.jsonl").read_text().splitlines()]
    base = build_base(
        root / "bases/tiny",
        texts,
        vocab_size=300,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=64,
    )
    releases = [train_and_publish(root, seed=0), train_and_publish(root, seed=1, promote=False)]
    return Project(root, base, releases, Session.open(load(root / "mlops.yaml")).registry)


def test_an_adapter_release_holds_the_adapter_and_its_base_fingerprint(proj: Project) -> None:
    from mlops.training.adapter import base_fingerprint

    for rid in proj.releases:
        m = proj.registry.manifest(rid)
        assert m["adapter"] == {"base": "bases/tiny", "base_fingerprint": base_fingerprint(proj.base)}
        files = set(m["artifact"]["files"])
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
        assert "config.json" not in files and "model.safetensors" not in files  # not a merged copy
    a, b = (proj.registry.manifest(r)["artifact"]["files"]["adapter_model.safetensors"] for r in proj.releases)
    assert a != b  # two seeds, two adapters


def test_the_fingerprint_covers_weights_config_and_tokenizer_only(proj: Project, tmp_path: Path) -> None:
    import shutil

    from mlops.training.adapter import base_fingerprint

    copy = Path(shutil.copytree(proj.base, tmp_path / "copy"))
    (copy / "README.md").write_text("notes beside the weights do not change the model")
    assert base_fingerprint(copy) == base_fingerprint(proj.base)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg | {"model_max_length": 63}))
    assert base_fingerprint(copy) != base_fingerprint(proj.base)


def test_serving_an_adapter_needs_a_lora_method(tmp_path: Path) -> None:
    from mlops.config import load

    root = make_project(tmp_path / "p", {"models": {"tiny": {"lora": {"serve": "adapter"}}}})
    with pytest.raises(ConfigError, match="lora.serve: adapter needs method: lora or qlora"):
        load(root / "mlops.yaml")
