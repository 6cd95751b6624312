"""Chat fine-tuning (issue 16.2): the base's chat template renders each conversation, the loss is on
assistant tokens only, long conversations are cut or dropped and counted, packing keeps the math;
full and LoRA (Llama module names) fine-tunes of an offline base give a stock HF chat artifact."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mlops.data import Example, read_source
from mlops.errors import ConfigError
from mlops.training import chat
from mlops.training.offline_base import build_base, fingerprint
from mlops.training.train import TrainJob, loss_sum, train_model

SYSTEM = "Reply with the colour of the fruit."
FRUIT = {"apple": "red", "banana": "yellow", "lime": "green", "plum": "purple", "orange": "orange"}


def conversations(n: int, seed: int = 0) -> list[dict[str, object]]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        fruit = rnd.choice(sorted(FRUIT))
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What colour is a {fruit}?"}]
        if rnd.random() < 0.3:  # some multi-turn: every assistant turn is learnt
            turns += [{"role": "assistant", "content": "Ask me."}, {"role": "user", "content": f"A {fruit}."}]
        rows.append({"messages": [*turns, {"role": "assistant", "content": FRUIT[fruit]}]})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    texts = [str(m["content"]) for r in conversations(50) for m in r["messages"]]  # type: ignore[attr-defined]
    return build_base(
        root / "base", texts, vocab_size=320, num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=128
    )


@pytest.fixture(scope="module")
def data(base: Path) -> Path:
    path = base.parent / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(120)))
    return path


def example(turns: list[dict[str, str]]) -> Example:
    return Example("x", turns[-2]["content"], turns[-1]["content"], messages=tuple(turns[:-1]), format="chat")


def test_loss_is_on_assistant_tokens_only(base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()  # fixed weights
    # " Q" and " Z" are two byte tokens each (no merge learnt for them): swapping one keeps the alignment
    turns = [
        {"role": "system", "content": "Be brief. Q"},
        {"role": "user", "content": "What colour is a lime? Q"},
        {"role": "assistant", "content": "green Q"},
    ]
    a = chat.encode_one(tok, example(turns))
    learnt = [t for t in a["labels"] if t != -100]
    assert tok.decode(learnt) == "green Q<|im_end|>"

    def loss(ids: list[int], labels: list[int]) -> float:
        batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
        with torch.no_grad():
            return float(loss_sum(model, batch))

    def relabel(other: list[dict[str, str]]) -> list[int]:
        """The labels a conversation that differs in one token gets (its tokens line up with `a`'s)."""
        b = chat.encode_one(tok, example(other))
        assert len(b["input_ids"]) == len(a["input_ids"])
        assert sum(x != y for x, y in zip(a["input_ids"], b["input_ids"], strict=True)) >= 1
        return b["labels"]

    l0 = loss(a["input_ids"], a["labels"])
    for role, i in [("user", 1), ("system", 0)]:
        changed = [dict(t) for t in turns]
        changed[i]["content"] = turns[i]["content"][:-1] + "Z"
        assert loss(a["input_ids"], relabel(changed)) == l0, role  # that token's label is not in the loss
        full = chat.encode_one(tok, example(changed))["input_ids"]
        assert loss(a["input_ids"], full) != loss(a["input_ids"], a["input_ids"])  # it would be, unmasked
    changed = [dict(t) for t in turns]
    changed[2]["content"] = "green Z"
    assert loss(a["input_ids"], relabel(changed)) != l0  # an assistant token's label is


def test_over_long_conversations_are_cut_or_dropped_and_counted(base: Path, data: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    rows = read_source(data)
    lengths = [len(chat.encode_one(tok, ex)["input_ids"]) for ex in rows]
    limit = sorted(lengths)[len(lengths) // 2]  # about half are longer
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(rows)
    cut = chat.encode_chats(tok, rows, limit, "truncate", packing=False)
    assert all(len(r["input_ids"]) <= limit for r in cut.rows)
    assert cut.truncated + cut.dropped == over and len(cut.rows) == len(rows) - cut.dropped
    dropped = chat.encode_chats(tok, rows, limit, "drop", packing=False)
    assert (dropped.dropped, dropped.truncated, len(dropped.rows)) == (over, 0, len(rows) - over)
    assert dropped.record == {
        "format": "chat", "conversations": len(rows), "truncated": 0, "dropped": over, "packed": False,
        "sequences": len(rows) - over,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="every conversation is over train.max_seq_len"):
        chat.encode_chats(tok, rows, min(lengths) - 1, "drop", packing=False)


def test_packing_keeps_each_conversation_apart(base: Path, data: Path) -> None:
    """Packed rows give the same summed loss as the conversations one by one (positions restart,
    attention stays inside each conversation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    rows = read_source(data)[:12]
    plain = chat.encode_chats(tok, rows, 128, "truncate", packing=False)
    packed = chat.encode_chats(tok, rows, 128, "truncate", packing=True)
    assert len(packed.rows) < len(plain.rows) and packed.record["packed"] is True
    with torch.no_grad():
        one_by_one = sum(float(loss_sum(model, chat.collator(tok.pad_token_id, False)([r]))) for r in plain.rows)
        together = float(loss_sum(model, chat.collator(tok.pad_token_id, True)(packed.rows)))
        unmasked = chat.collator(tok.pad_token_id, True)(packed.rows)
        unmasked.pop("position_ids")  # one causal sequence per row: conversations see each other
        leaky = float(loss_sum(model, unmasked))
    # a random base attends almost evenly, so a leak moves the sum by ~1e-2; rounding by ~1e-5
    assert together == pytest.approx(one_by_one, abs=1e-3)
    assert leaky != pytest.approx(one_by_one, abs=1e-3)


def job(base: Path, data: Path, out: Path, **kw: object) -> TrainJob:
    settings: dict[str, object] = {"steps": 40, "batch_size": 16, "lr": 1e-2, "warmup_steps": 4, "threads": 1}
    return TrainJob(model_name="c", dataset_path=str(data), out_dir=str(out), base=str(base), **(settings | kw))


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("full", {"packing": True, "max_seq_len": 128}),
        ("lora", {"lr": 3e-2, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]}}),
    ],
)
def test_chat_fine_tune_learns_and_writes_a_chat_artifact(
    base: Path, data: Path, tmp_path: Path, method: str, kw: dict[str, object]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = train_model(job(base, data, tmp_path / "out", method=method, eval_every=40, **kw))
    first = train_model(job(base, data, tmp_path / "one", method=method, steps=1, **kw))
    assert r.final_loss < 0.5 * first.final_loss
    assert r.data is not None and r.data["format"] == "chat" and r.data["packed"] is bool(kw.get("packing"))
    assert r.base_sha256 == fingerprint(base)
    out = Path(r.out_dir)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == (base / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and not any("lora" in n for n, _ in model.named_parameters())
    ends = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert model.generation_config.eos_token_id == ends


def test_lora_takes_llama_module_names_and_checks_them(base: Path, data: Path, tmp_path: Path) -> None:
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": names}
    r = train_model(job(base, data, tmp_path / "ok", method="lora", steps=2, lora=lora))
    assert r.steps == 2
    bad = lora | {"target_modules": ["q_prj"]}
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        train_model(job(base, data, tmp_path / "bad", method="lora", steps=1, lora=bad))


def test_chat_data_needs_a_base_with_a_marked_template(base: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat data needs a base with a chat template, not 'scratch'"):
        train_model(TrainJob(model_name="c", dataset_path=str(data), out_dir=str(tmp_path / "s"), steps=1))
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in base.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    unmarked = (
        (base / "chat_template.jinja").read_text().replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    )
    (plain / "chat_template.jinja").write_text(unmarked)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": unmarked}))
    with pytest.raises(ConfigError, match="does not mark the assistant turns"):
        train_model(job(plain, data, tmp_path / "u", steps=1))


def test_a_local_base_travels_to_modal_through_the_volume(
    base: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Modal container has no copy of the client's disk: the backend copies a local `base:` to the
    Volume once (by fingerprint), and the train function trains from that copy. The client's base
    directory is moved away before training, so reading it from the client's path would fail."""
    import shutil
    from types import SimpleNamespace

    from test_functions import import_functions

    from mlops.backends.modal import ModalBackend
    from mlops.backends.modal_settings import ModalSettings
    from mlops.backends.modal_twin import TwinAPI

    local = tmp_path / "client-base"
    shutil.copytree(base, local)
    twin = TwinAPI(tmp_path / "twin", ModalSettings(app="acme"))
    shipped = ModalBackend._ship_base(SimpleNamespace(api=twin), job(local, data, tmp_path / "out"))  # type: ignore[arg-type]
    assert shipped.base == f"bases/{fingerprint(local)[:32]}"
    assert (twin.volume_dir / shipped.base / "config.json").is_file()
    assert (twin.volume_dir / f"{shipped.base}.complete").is_file()
    again = ModalBackend._ship_base(SimpleNamespace(api=twin), job(local, data, tmp_path / "out"))  # type: ignore[arg-type]
    assert again.base == shipped.base
    local.rename(tmp_path / "moved-away")

    out = import_functions(monkeypatch)["train"].train_body(
        shipped.model_dump() | {"steps": 2}, data.read_bytes(), run_id="r1", root=str(twin.volume_dir)
    )
    assert out["steps"] == 2 and out["base_sha256"] == fingerprint(base)
