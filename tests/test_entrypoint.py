"""Your own training code (issue 16.7): `train.entrypoint: file.py:function` trains instead of the
recipe, its file is in the plan's fingerprint, and the Modal training image carries it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_project

from mlops.config import load
from mlops.errors import ConfigError
from mlops.training.job import job_from_config
from mlops.training.train import train_model

USER_CODE = '''
from pathlib import Path

from mlops.data import read_source
from mlops.training.offline_base import build_base
from mlops.training.train import train_model


def build(job, out_dir):
    """A team's own step: a base built from the training text, written where mlops asks."""
    texts = [t for ex in read_source(job.dataset_path) for t in (ex.input, ex.expected or "")]
    return build_base(out_dir / "model", texts, vocab_size=300, num_layers=1, num_heads=2, num_kv_heads=1,
                      max_position_embeddings=64, seed=job.seed)


def recipe(job, out_dir):
    """Wraps the built-in recipe (a team adding steps around it): its run record is picked up."""
    return train_model(job.model_copy(update={"entrypoint": None, "steps": 3})).out_dir


def nothing(job, out_dir):
    return str(out_dir)
'''


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "p", {"models": {"tiny": {"train": {"entrypoint": "train/mine.py:build"}}}})
    (root / "train").mkdir()
    (root / "train" / "mine.py").write_text(USER_CODE)
    return root


def test_the_entrypoint_trains_instead_of_the_recipe(proj: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = load(proj / "mlops.yaml")
    job = job_from_config(loaded, "tiny", proj / "out")
    assert job.entrypoint == f"{proj / 'train' / 'mine.py'}:build"  # absolute: runs from any directory
    r = train_model(job)
    assert Path(r.out_dir) == proj / "out" and (proj / "out" / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(proj / "out").config.model_type == "llama"
    assert math.isnan(r.final_loss) and r.parameters > 10_000 and r.data == {"entrypoint": "mine.py:build"}

    wrapped = train_model(job.model_copy(update={"entrypoint": job.entrypoint.replace(":build", ":recipe")}))
    assert wrapped.steps == 3 and math.isfinite(wrapped.final_loss) and wrapped.tokens > 0
    assert json.loads((proj / "out" / "config.json").read_text())["model_type"] == "gpt2"


def test_bad_entrypoints_are_one_clear_error(proj: Path) -> None:
    job = job_from_config(load(proj / "mlops.yaml"), "tiny", proj / "out")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        train_model(job.model_copy(update={"entrypoint": job.entrypoint.replace(":build", ":nope")}))
    with pytest.raises(ConfigError, match="not a directory holding a saved model"):
        train_model(job.model_copy(update={"entrypoint": job.entrypoint.replace(":build", ":nothing")}))
    gone = ["models.tiny.train.entrypoint=train/gone.py:build"]
    with pytest.raises(ConfigError, match="entrypoint: file 'train/gone.py' does not exist"):
        load(proj / "mlops.yaml", gone)  # `mlops validate` says so
    with pytest.raises(ConfigError, match="gone.py does not exist"):  # and a job built without that check
        job_from_config(load(proj / "mlops.yaml", gone, check_files=False), "tiny", proj / "out")
    with pytest.raises(ConfigError, match="entrypoint"):
        load(proj / "mlops.yaml", ["models.tiny.train.entrypoint=train/mine.py"])  # no :function


def test_the_fingerprint_covers_the_file_and_the_image_carries_it(proj: Path) -> None:
    from mlops.backends.modal_settings import ModalSettings, code_digest, entrypoint_in_image
    from mlops.plan import lineage

    loaded = load(proj / "mlops.yaml")
    before = lineage(loaded, "tiny")
    code = proj / "train" / "mine.py"
    settings = ModalSettings.from_config(loaded.cfg, proj)
    assert settings.train_files == (str(code),)
    assert ModalSettings.from_json(settings.to_json()) == settings  # what a container reads back
    digest = code_digest(proj, settings)
    code.write_text(USER_CODE + "\n# tuned\n")
    after = lineage(loaded, "tiny")
    assert after["entrypoint_sha256"] != before["entrypoint_sha256"]
    assert after["fingerprint"] != before["fingerprint"]
    assert code_digest(proj, settings) != digest  # a deployed train app with the old file is stale
    inside = entrypoint_in_image(str(code))
    assert inside.endswith("/mine.py") and inside != entrypoint_in_image(str(proj / "other" / "mine.py"))
