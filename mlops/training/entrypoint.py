"""Your own training code: `models.<name>.train.entrypoint: path/to/file.py:function`.

The function is called instead of the built-in recipe, on both backends:

    def train(job: mlops.training.job.TrainJob, out_dir: pathlib.Path) -> pathlib.Path | str:
        ...

- `job` is the resolved TrainJob: every `train:` key (steps, seed, lr, max_seq_len, ...), `base`
  (a local base directory as an absolute path), `method`, `lora`, `dataset_path` (a local file;
  read it with `mlops.data.read_source(job.dataset_path, job.dataset_format)`), `dataset_format`.
- `out_dir` is the directory the artifact belongs in (it exists, and is empty).
- It returns the directory holding the saved model, in Hugging Face format (config.json, safetensors
  weights, tokenizer files): `out_dir` itself, or another directory whose files are then copied in.
- Optionally it leaves `mlops_train.json` there (the built-in recipe writes one; so a function that
  calls `train_model` reports its loss, tokens and timing); otherwise the loss is recorded as NaN.

The file lives outside the package (in your repository); the plan's fingerprint covers its bytes, so
editing it retrains, and functions/images.py puts it in the Modal training image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops.errors import ConfigError
from mlops.training.job import split_entrypoint as split

if TYPE_CHECKING:
    from mlops.training.job import TrainJob, TrainResult


def load(entrypoint: str) -> Callable[..., Any]:
    """Import the file (under a name of its own, so two projects' `train.py` never collide)."""
    path, func = split(entrypoint)
    if not path.is_file():
        raise ConfigError(f"train.entrypoint: {path} does not exist")
    name = "mlops_user_train_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"train.entrypoint: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"train.entrypoint: {path} has no function {func!r}")
    return fn


def run(job: TrainJob) -> TrainResult:
    """Call the job's entrypoint and turn what it saved into the artifact and the run record."""
    from mlops.training.job import TrainResult

    assert job.entrypoint is not None
    fn = load(job.entrypoint)
    out = Path(job.out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    returned = fn(job, out)
    seconds = round(time.perf_counter() - t0, 3)
    if not isinstance(returned, str | Path) or not (Path(returned) / "config.json").is_file():
        raise ConfigError(
            f"train.entrypoint {job.entrypoint}: returned {returned!r}, not a directory holding a saved model "
            "(config.json, weights, tokenizer)"
        )
    saved = Path(returned).resolve()
    if saved != out.resolve():
        shutil.copytree(saved, out, dirs_exist_ok=True)
    reported: dict[str, Any] = {}
    record = out / "mlops_train.json"
    if record.is_file():
        reported = json.loads(record.read_text()).get("result") or {}
    known = {f.name for f in fields(TrainResult)}
    from mlops.training.runtime import device

    base: dict[str, Any] = {
        "steps": job.steps,
        "seconds": seconds,
        "final_loss": math.nan,
        "tokens_per_s": 0.0,
        "parameters": _parameters(out),
        "device": device(),
    }
    result = TrainResult(**(base | {k: v for k, v in reported.items() if k in known} | {"out_dir": str(out)}))
    result.seconds = seconds
    result.data = (result.data or {}) | {"entrypoint": job.entrypoint.rpartition("/")[2]}
    return result


def _parameters(out: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
