"""The builtin engine's native forward pass (mlops/serving/native.py) against transformers'.

Same weights, same left-padded batch, same positions: the logits of a prefill and of cached decode
steps must agree with transformers' model for every architecture run natively, and the engine must
produce the same greedy text either way. Random weights with a larger init than training leaves
make differences show (a wrong rotary layout or a missing bias moves logits by whole units).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

TEXTS = [f"user asks about item {i}; the assistant answers with {i * 7 % 13} words." for i in range(200)]


def _gpt2(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                     eos_token_id=0, bos_token_id=0, initializer_range=0.2)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


def _base(out: Path, arch: str) -> Path:
    from mlops.training.offline_base import build_base

    build_base(out, TEXTS, arch=arch, vocab_size=300, num_layers=2, num_heads=4, num_kv_heads=2, seed=1)
    # bigger random weights than the builder's init, so that every term of the forward pass matters
    from safetensors.torch import load_file, save_file

    f = out / "model.safetensors"
    g = torch.Generator().manual_seed(2)
    w = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in load_file(str(f)).items()}
    save_file(w, str(f), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2", "mistral"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param) / "m"
    return _gpt2(out) if request.param == "gpt2" else _base(out, request.param)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [[5, 17, 9, 33, 2, 40, 41], [7, 8], [11, 12, 13, 14]]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_logits_match_transformers_in_prefill_and_cached_decode(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mlops.serving import native

    arch = json.loads((model_dir / "config.json").read_text())["model_type"]
    if arch != "gpt2":  # the builder's Qwen2 has q/k/v biases: make sure the test sees them
        assert (
            "q_proj.bias"
            in str(list(__import__("safetensors").safe_open(str(model_dir / "model.safetensors"), "pt").keys()))
        ) == (arch == "qwen2")
    nat = native.load(model_dir)
    assert nat is not None, native.why_not(json.loads((model_dir / "config.json").read_text()))
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids, mask, pos = _batch()
    with torch.inference_mode():
        a = nat(input_ids=ids, attention_mask=mask, position_ids=pos)
        b = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        real = mask.bool()
        assert a.logits.abs().max() > 1.0  # the weights are not near zero: a wrong term would show
        torch.testing.assert_close(a.logits[real], b.logits[real], atol=2e-4, rtol=1e-4)
        ca, cb = a.past_key_values, b.past_key_values
        step_pos = pos[:, -1:] + 1
        for step in range(3):
            nxt = a.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
            a = nat(input_ids=nxt, attention_mask=mask, position_ids=step_pos, past_key_values=ca)
            b = ref(input_ids=nxt, attention_mask=mask, position_ids=step_pos, past_key_values=cb, use_cache=True)
            torch.testing.assert_close(a.logits, b.logits, atol=2e-4, rtol=1e-4, msg=f"decode step {step}")
            ca, cb, step_pos = a.past_key_values, b.past_key_values, step_pos + 1


def test_engine_text_is_the_same_natively_and_through_transformers(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops.serving.engine import Engine
    from mlops.serving.genrequest import GenRequest

    prompts = ["user asks about item 3", "the assistant", "item 12; the"]
    texts = {}
    for native_on in ("1", "0"):
        monkeypatch.setenv("MLOPS_NATIVE", native_on)
        eng = Engine(model_dir, max_batch_size=8)
        try:
            assert (type(eng.model).__name__ == "NativeLM") == (native_on == "1")
            reqs = [eng.submit(GenRequest(prompt=p, max_tokens=12, temperature=0.0)) for p in prompts]
            texts[native_on] = ["".join(eng.stream(r, timeout=120)) for r in reqs]  # one batch
        finally:
            eng.close()
    assert texts["1"] == texts["0"]
    assert any(t for t in texts["1"])


def test_what_is_not_run_natively_falls_back_with_a_reason() -> None:
    from mlops.serving import native

    assert native.why_not({"model_type": "gpt_neox"}) == "model_type 'gpt_neox'"
    assert (
        native.why_not({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4}})
        == "rope scaling 'yarn'"
    )
    assert native.why_not({"model_type": "llama", "hidden_act": "silu"}) is None
    assert native.why_not({"model_type": "gpt2"}) is None


def test_serving_a_native_model_never_imports_transformers(model_dir: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from mlops.serving.engine import Engine; from mlops.serving.genrequest import GenRequest\n"
        f"e = Engine({str(model_dir)!r}); print(repr(e.generate(GenRequest(prompt='item 3', max_tokens=4), 60)))\n"
        "e.close(); print(sorted(m for m in ('transformers', 'sklearn', 'scipy', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_lora_adapters_per_row_match_peft_mixed_batches(model_dir: Path, tmp_path: Path) -> None:
    """Two adapters and the bare base in one batch (prefill and a cached decode step): the native
    pass adds each row's own LoRA delta exactly as peft's mixed-batch inference does."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlops.serving import native

    gpt2 = json.loads((model_dir / "config.json").read_text())["model_type"] == "gpt2"
    targets: Any = ["c_attn", "c_proj", "c_fc"] if gpt2 else "all-linear"
    dirs = []
    for k, (r, rslora) in enumerate([(4, False), (8, True)]):
        torch.manual_seed(10 + k)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        cfg = LoraConfig(
            r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False, use_rslora=rslora, fan_in_fan_out=gpt2
        )
        get_peft_model(base, cfg).save_pretrained(tmp_path / f"a{k}")  # random A and B: a delta that shows
        dirs.append(tmp_path / f"a{k}")
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), str(dirs[0]), adapter_name="a0"
    )
    ref.load_adapter(str(dirs[1]), adapter_name="a1")
    ref.eval()
    nat = native.load(model_dir)
    assert nat is not None
    for k, d in enumerate(dirs):
        nat.load_adapter(d, adapter_name=f"a{k}")
    names = ["a0", "a1", "__base__"]
    ids, mask, pos = _batch()
    real = mask.bool()
    with torch.inference_mode():
        a = nat(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names)
        b = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, adapter_names=names)
        torch.testing.assert_close(a.logits[real], b.logits[real], atol=2e-4, rtol=1e-4)
        plain = nat(input_ids=ids, attention_mask=mask, position_ids=pos)
        assert (a.logits[0] - plain.logits[0])[real[0]].abs().max() > 1e-2  # the adapter changes row 0
        torch.testing.assert_close(a.logits[2][real[2]], plain.logits[2][real[2]])  # and not the base's row
        nxt = a.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
        step = pos[:, -1:] + 1
        a2 = nat(
            input_ids=nxt,
            attention_mask=mask2,
            position_ids=step,
            past_key_values=a.past_key_values,
            adapter_names=names,
        )
        b2 = ref(input_ids=nxt, attention_mask=mask2, position_ids=step, past_key_values=b.past_key_values,
                 use_cache=True, adapter_names=names)  # fmt: skip
        torch.testing.assert_close(a2.logits, b2.logits, atol=2e-4, rtol=1e-4)
        one = nat(
            input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=["a1"] * 3
        )  # a batch of one adapter
        ref.set_adapter("a1")
        torch.testing.assert_close(
            one.logits[real],
            ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real],
            atol=2e-4,
            rtol=1e-4,
        )
    nat.delete_adapter("a0")
    assert set(nat.adapters) == {"a1"}
