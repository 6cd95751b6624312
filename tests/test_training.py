"""The training recipe: deterministic, a stock GPT-2 artifact, LoRA fine-tunes of a local base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, train_job

from mlops.registry.releases import sha256_file
from mlops.training.train import TrainJob, train_model

ARCH = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}


def job(out: Path, **kw: object) -> TrainJob:
    return train_job(out, **kw)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a = train_model(job(tmp_path / "a", seed=3))
    b = train_model(job(tmp_path / "b", seed=3))
    c = train_model(job(tmp_path / "c", seed=4))
    sha = [sha256_file(Path(r.out_dir) / "model.safetensors") for r in (a, b, c)]
    assert sha[0] == sha[1] != sha[2]
    assert a.final_loss == b.final_loss


def test_artifact_is_stock_hf_gpt2_with_matching_logits(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: list[dict[str, float]] = []
    r = train_model(job(tmp_path / "m", steps=5), progress=seen.append)
    out = Path(r.out_dir)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "tokenizer_config.json",
    } <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")), "weights must be safetensors only"
    assert [int(d["step"]) for d in seen] == [1, 2, 3, 4, 5] and all(d["tokens_per_s"] > 0 for d in seen)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("abc=", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "abc="
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("abc=").ids == ids[0].tolist()

    # the lean training model and the exported GPT-2 compute the same function
    from mlops.training.model import TinyGPT

    tiny = TinyGPT(cfg["vocab_size"], **ARCH)
    state = {k: v for k, v in hf.state_dict().items()}
    with torch.no_grad():
        tiny.wte.weight.copy_(state["transformer.wte.weight"])
        tiny.wpe.weight.copy_(state["transformer.wpe.weight"])
        tiny.ln_f.load_state_dict({"weight": state["transformer.ln_f.weight"], "bias": state["transformer.ln_f.bias"]})
        b, p = tiny.h[0], "transformer.h.0."
        b.ln_1.load_state_dict({"weight": state[p + "ln_1.weight"], "bias": state[p + "ln_1.bias"]})
        b.ln_2.load_state_dict({"weight": state[p + "ln_2.weight"], "bias": state[p + "ln_2.bias"]})
        for ours, theirs in (
            ("c_attn", "attn.c_attn"),
            ("attn_proj", "attn.c_proj"),
            ("c_fc", "mlp.c_fc"),
            ("mlp_proj", "mlp.c_proj"),
        ):
            getattr(b, ours).weight.copy_(state[p + theirs + ".weight"].T)
            getattr(b, ours).bias.copy_(state[p + theirs + ".bias"])
        torch.testing.assert_close(tiny(ids), hf(ids).logits, atol=1e-5, rtol=1e-4)


def test_lora_fine_tune_of_a_local_base_trains_only_adapters_and_merges(tmp_path: Path) -> None:
    base = train_model(job(tmp_path / "base", steps=3))
    before = sha256_file(Path(base.out_dir) / "model.safetensors")
    r = train_model(job(tmp_path / "lora", base=base.out_dir, method="lora", steps=3, lr=5e-2))
    assert r.parameters == train_model(job(tmp_path / "base2", steps=1)).parameters  # merged: same shape as the base
    assert sha256_file(Path(r.out_dir) / "model.safetensors") != before
    assert sha256_file(Path(base.out_dir) / "model.safetensors") == before  # the base is not modified


def test_lora_needs_a_pretrained_base(tmp_path: Path) -> None:
    from mlops.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a pretrained base"):
        train_model(job(tmp_path / "x", method="lora"))


def test_bf16_autocast_runs_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 code path on CPU: the forward runs under autocast and its matmuls come out bf16."""
    from mlops.training.model import TinyGPT

    seen: list[tuple[bool, torch.dtype]] = []
    forward = TinyGPT.forward

    def spy(self: TinyGPT, ids: torch.Tensor) -> torch.Tensor:
        out = forward(self, ids)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(TinyGPT, "forward", spy)
    r = train_model(job(tmp_path / "bf16", steps=3, precision="bf16"))
    assert r.precision == "bf16" and seen == [(True, torch.bfloat16)] * 3
    assert r.final_loss == r.final_loss and r.final_loss < 10  # finite
    seen.clear()
    r32 = train_model(job(tmp_path / "fp32", steps=3))
    assert r32.precision == "fp32" and seen == [(False, torch.float32)] * 3


def test_gpu_only_options_are_refused_on_cpu_with_a_clear_message(tmp_path: Path) -> None:
    from mlops.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train_model(job(tmp_path / "x", precision="fp16"))
    base = train_model(job(tmp_path / "base", steps=1))
    with pytest.raises(ConfigError, match="qlora .*needs a CUDA GPU"):
        train_model(job(tmp_path / "q", base=base.out_dir, method="qlora"))


def test_lora_target_modules_are_checked_against_the_base(tmp_path: Path) -> None:
    from mlops.errors import ConfigError

    base = train_model(job(tmp_path / "base", steps=1))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_atn"]}
    with pytest.raises(
        ConfigError, match=r"'c_atn' is not a module .*did you mean 'c_attn'\? valid: c_attn, c_fc, c_proj"
    ):
        train_model(job(tmp_path / "x", base=base.out_dir, method="lora", lora=lora))


def test_grad_accum_and_checkpointing_keep_the_math(tmp_path: Path) -> None:
    """Gradient checkpointing recomputes the same numbers; accumulation is exact up to float sums."""
    plain = train_model(job(tmp_path / "p", steps=3))
    train_model(job(tmp_path / "c", steps=3, gradient_checkpointing=True))
    assert sha256_file(tmp_path / "p" / "model.safetensors") == sha256_file(tmp_path / "c" / "model.safetensors")
    # 2 micro-batches of 8 draw the same rows as one batch of 16 and weigh every token the same
    accum = train_model(job(tmp_path / "a", steps=3, batch_size=8, grad_accum=2))
    assert accum.tokens == plain.tokens
    assert abs(accum.final_loss - plain.final_loss) < 1e-4, (accum.final_loss, plain.final_loss)
    from safetensors.torch import load_file

    wa, wp = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "p" / "model.safetensors"))
    for k in wp:
        torch.testing.assert_close(wa[k], wp[k], atol=1e-5, rtol=1e-4)


def test_long_examples_error_or_truncate_with_max_seq_len(tmp_path: Path) -> None:
    from mlops.errors import ConfigError

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"input": "x" * 40, "expected": "yz"}) + "\n")
    with pytest.raises(ConfigError, match="set train.max_seq_len to truncate"):
        train_model(job(tmp_path / "e", dataset_path=str(long), steps=1))
    r = train_model(job(tmp_path / "t", dataset_path=str(long), steps=2, max_seq_len=16, eval_every=1))
    assert r.steps == 2 and r.eval_loss is not None
    with pytest.raises(ConfigError, match="over the model's context length 32"):
        train_model(job(tmp_path / "o", dataset_path=str(long), steps=1, max_seq_len=64))


def test_run_record_has_precision_memory_and_cost(tmp_path: Path) -> None:
    from mlops.training.runtime import cost_usd

    seen: list[dict[str, float]] = []
    r = train_model(job(tmp_path / "m", steps=4, eval_every=2), progress=seen.append)
    assert (r.precision, r.gpu_type, r.gpu_seconds, r.cost_usd) == ("fp32", None, 0.0, 0.0)
    assert r.peak_memory_mb > 10 and r.tokens > 0 and r.tokens_per_s > 0
    assert [("eval_loss" in d) for d in seen] == [False, True, False, True]
    assert cost_usd("H100", 7200, {"H100": 3.95}) == 7.9 and cost_usd("X9", 1, {}) is None


def test_peft_lora_merged_artifact_serves_like_the_merged_model(tmp_path: Path) -> None:
    """LoRA via peft on a locally trained base, merged: the builtin engine serving the artifact
    answers what the merged model in this process answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlops.serving.engine import Engine, GenRequest

    base = train_model(job(tmp_path / "base", steps=30, lr=1e-2))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}
    r = train_model(
        job(
            tmp_path / "m",
            base=base.out_dir,
            method="lora",
            lora=lora,
            steps=5,
            lr=5e-2,
            save_adapter=str(tmp_path / "ad"),
        )
    )
    assert not (tmp_path / "m" / "adapter_config.json").exists()  # the artifact is a plain model
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.out_dir), str(tmp_path / "ad"))
    merged = merged.merge_and_unload().eval()
    served = AutoModelForCausalLM.from_pretrained(r.out_dir).eval()
    tok = AutoTokenizer.from_pretrained(r.out_dir)
    prompts = ["abc=", "hello=", "xyzzy="]
    engine = Engine(r.out_dir, max_batch_size=4, threads=1)
    try:
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            with torch.no_grad():
                torch.testing.assert_close(served(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-4)
                want = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            expect = tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)
            got = engine.generate(GenRequest(prompt=p, max_tokens=8), timeout=60)
            assert got == expect, (p, got, expect)
    finally:
        engine.close()


def test_the_job_carries_every_train_key_and_round_trips_as_json(tmp_path: Path) -> None:
    """TrainJob is derived from the config's TrainCfg: every `train:` key reaches it without a
    line in job.py, and what crosses into Modal (`model_dump()` as JSON) builds the same job."""
    import yaml

    from mlops.config import load
    from mlops.configtrain import TrainCfg
    from mlops.training.job import job_from_config

    cfg = yaml.safe_load((REPO / "mlops.yaml").read_text())
    name = cfg["deploy"]["model"]
    cfg["models"][name]["train"] |= {"steps": 7, "warmup_steps": 50, "grad_accum": 3, "checkpoint_every": 4}
    (tmp_path / "mlops.yaml").write_text(yaml.safe_dump(cfg))
    for d in ("data", "evals"):
        (tmp_path / d).symlink_to(REPO / d)
    loaded = load(tmp_path / "mlops.yaml")
    j = job_from_config(loaded, name, tmp_path / "out", gpu="H100")
    t = loaded.cfg.models[name].train
    for key in set(TrainCfg.model_fields) - {"checkpoint_every", "warmup_steps"}:
        assert getattr(j, key) == getattr(t, key), key
    assert (j.warmup_steps, j.checkpoint_every_steps, j.checkpoint_every_s) == (7, 4, None)  # warmup <= steps
    assert (j.model_name, j.gpu, j.arch) == (name, "H100", loaded.cfg.models[name].arch.model_dump())
    sent = json.loads(j.model_dump_json())
    assert "checkpoint_every" not in sent  # resolved into the two fields above
    assert TrainJob(**sent) == j
