"""The one reader (mlops.data): every format from every source becomes typed rows; a bad row is one
line naming where and which field; the plan's fingerprint covers every source; data checks see chat."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from mlops.data import Example, read_dataset, read_numbered, read_source
from mlops.errors import ConfigError

CHAT = [
    {
        "id": "c1",
        "messages": [
            {"role": "system", "content": "You answer billing questions."},
            {"role": "user", "content": "What is my balance?"},
            {"role": "assistant", "content": "Which account?"},
            {"role": "user", "content": "Checking."},
            {"role": "assistant", "content": "It is 10 EUR."},
        ],
        "tags": ["billing"],
        "retrieval_context": ["Checking: 10 EUR"],
    },
    {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t", "type": "function"}]},
            {"role": "tool", "content": "sunny", "name": "weather"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "tags": ["weather"],
    },
]
COMPLETION = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6", "id": 7}]
PAIRS = [{"input": "abc", "expected": "cba", "context": "ctx"}, {"input": "xy", "expected": "yx", "tags": "short"}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def filled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (Arrow's from_pylist, and datasets', keep only the first row's keys)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pylist(filled(rows))


def check_chat(rows: list[Example]) -> None:
    a, b = rows
    assert a.format == "chat" and a.id == "c1"
    assert a.input == "Checking." and a.expected == "It is 10 EUR."
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "user"]
    assert a.conversation()[-1] == {"role": "assistant", "content": "It is 10 EUR."}
    assert a.tags == ("billing",) and a.context == ("Checking: 10 EUR",)
    assert b.input == "Weather?" and b.expected == "Sunny." and b.tags == ("weather",)
    assert [m["role"] for m in b.messages] == ["user", "assistant", "tool"]
    assert b.tools[0]["function"]["name"] == "weather"


def test_jsonl_formats_are_detected(tmp_path: Path) -> None:
    check_chat(read_source(write_jsonl(tmp_path / "chat.jsonl", CHAT)))
    comp = read_source(write_jsonl(tmp_path / "comp.jsonl", COMPLETION))
    assert [(e.format, e.id, e.input, e.expected) for e in comp] == [
        ("completion", "comp-1", "2+2=", "4"),
        ("completion", "7", "3+3=", "6"),
    ]
    pairs = read_source(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert pairs[0] == Example("p-1", "abc", "cba", ("ctx",))
    assert pairs[1].tags == ("short",)  # one tag may be a string
    # a declared format wins over detection, and pairs keep their configurable fields
    q = read_source(write_jsonl(tmp_path / "q.jsonl", [{"q": "a", "a": "b"}]), "pairs", "q", "a")
    assert (q[0].input, q[0].expected) == ("a", "b")


def test_an_eval_conversation_may_end_on_a_user_turn(tmp_path: Path) -> None:
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    (ex,) = read_source(write_jsonl(tmp_path / "e.jsonl", [row]))
    assert ex.expected is None and ex.input == "hi" and len(ex.messages) == 2
    with pytest.raises(ConfigError) as e:
        read_source(tmp_path / "e.jsonl", training="training set 'train'")
    assert str(e.value) == (
        "e.jsonl:1: messages: no assistant turn to learn from (training set 'train'; "
        "the conversation ends on a 'user' turn)"
    ).replace("e.jsonl", str(tmp_path / "e.jsonl"))


def U(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


A = {"role": "assistant", "content": "ok"}

BAD_ROWS = [
    ({"messages": [{"role": "bot", "content": "x"}, A]}, "chat", "messages[0].role: unknown role 'bot'"),
    ({"messages": [U("   "), A]}, "chat", "messages[0].content: empty user turn"),
    ({"messages": [U(["x"]), A]}, "chat", "messages[0].content: must be a string, not list"),
    ({"messages": "hi"}, "chat", "messages: must be a non-empty list"),
    ({"messages": [A]}, "chat", "messages: no user turn before the answer"),
    ({"messages": [U("x"), A], "tags": [1]}, "chat", "tags: must be a list of strings, not list"),
    ({"messages": [U("x"), A], "tools": {"a": 1}}, "chat", "tools: must be a list of objects, not dict"),
    ({"messages": [U("x"), A], "context": [None]}, "chat", "context: must be a list of strings"),
    ({"messages": [U("x"), "hi"]}, "chat", "messages[1]: must be an object"),
    ([1, 2], "chat", "a row must be a JSON object, not list"),
    ({"prompt": 3, "completion": "x"}, "completion", "prompt: must be a string, not int"),
    ({"prompt": "p", "completion": 3}, "completion", "completion: field 'completion' must be a string"),
    ({"input": 3, "expected": "x"}, "pairs", "each line needs a string field 'input'"),
    ({"input": "x", "expected": "y", "id": [1]}, "pairs", "id: must be a string or an integer"),
]


@pytest.mark.parametrize(("row", "fmt", "msg"), BAD_ROWS, ids=[m for _, _, m in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_line_and_field(tmp_path: Path, row: Any, fmt: str, msg: str) -> None:
    good = {"chat": CHAT[0], "completion": COMPLETION[0], "pairs": PAIRS[0]}[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", row])
    with pytest.raises(ConfigError) as e:
        read_source(path, fmt if fmt != "chat" else None)
    text = str(e.value)
    assert text.startswith(f"{path}:3: {msg}") and "\n" not in text


def test_invalid_json_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x.jsonl:2: invalid JSON"):
        read_source(write_jsonl(tmp_path / "x.jsonl", [PAIRS[0], "{nope"]))
    with pytest.raises(ConfigError, match="dataset is empty"):
        read_source(write_jsonl(tmp_path / "y.jsonl", [""]))
    numbered = read_numbered(write_jsonl(tmp_path / "z.jsonl", ["", PAIRS[0], "", PAIRS[1]]))
    assert [n for n, _ in numbered] == [2, 4]


# ---------------------------------------------------------------------------- sources


def test_parquet_and_csv_files(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table(CHAT), tmp_path / "chat.parquet")
    check_chat(read_source(tmp_path / "chat.parquet"))
    pq.write_table(table(COMPLETION), tmp_path / "comp.parquet")
    assert [e.expected for e in read_source(tmp_path / "comp.parquet")] == ["4", "6"]
    # a bad row is named by its 0-based index
    bad = [CHAT[0], {**CHAT[0], "messages": [{"role": "robot", "content": "x"}]}]
    pq.write_table(table(bad), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError) as e:
        read_source(tmp_path / "bad.parquet")
    assert str(e.value).startswith(f"{tmp_path / 'bad.parquet'}: row 1: messages[0].role: unknown role 'robot'")

    with (tmp_path / "chat.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["id", "messages", "tools", "tags", "retrieval_context"])
        w.writeheader()
        for r in CHAT:
            w.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    check_chat(read_source(tmp_path / "chat.csv"))
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["input", "expected", "tags"])
        w.writeheader()
        w.writerows([{"input": "abc", "expected": "cba", "tags": ""}, {"input": "x", "expected": "", "tags": "a"}])
    rows = read_source(tmp_path / "pairs.csv")
    assert [(e.id, e.input, e.expected, e.tags) for e in rows] == [
        ("pairs-0", "abc", "cba", ()),
        ("pairs-1", "x", "", ("a",)),
    ]


@pytest.fixture(scope="module")
def hf() -> Any:
    """`datasets`, imported once for the module (seconds)."""
    return pytest.importorskip("datasets")


def test_save_to_disk_directory(tmp_path: Path, hf: Any) -> None:
    hf.Dataset.from_list(filled(CHAT)).save_to_disk(str(tmp_path / "chat_ds"))
    check_chat(read_source(tmp_path / "chat_ds"))
    hf.DatasetDict({"train": hf.Dataset.from_list(PAIRS), "test": hf.Dataset.from_list(PAIRS[:1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(read_source(tmp_path / "dd")) == 2  # the train split of a DatasetDict


def hf_cached(hf: Any, cache: Path, repo: str, rows: list[Any]) -> None:
    """Lay out `repo` in the datasets cache as a download from the Hub leaves it
    (<org>___<name>/default/0.0.0/<hash>/<name>-train.arrow): what offline mode reads back."""
    from datasets.packaged_modules.json.json import Json

    org, name = repo.split("/")
    src = write_jsonl(cache.parent / f"{name}-src.jsonl", rows)
    b = Json(cache_dir=str(cache), dataset_name=f"{org}___{name}", hash="0123abcd", data_files={"train": str(src)})
    b.download_and_prepare()
    d = Path(b.cache_dir)
    (d / f"{org}___{name}-train.arrow").rename(d / f"{name}-train.arrow")
    d.parent.parent.rename(d.parent.parent.with_name("default"))


@pytest.fixture
def hf_offline(hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache under tmp_path, offline (datasets reads both at import: patch its config)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hf_id_absent_is_one_line_naming_it(hf_offline: Path) -> None:
    with pytest.raises(ConfigError) as e:
        read_source("hf:acme/absent-set:train")
    text = str(e.value)
    assert text.startswith("hf:acme/absent-set:train: dataset 'acme/absent-set' split 'train' is not in the local")
    assert "\n" not in text


def test_hf_id_from_the_offline_cache(hf: Any, hf_offline: Path) -> None:
    hf_cached(hf, hf_offline, "acme/chat", CHAT)
    check_chat(read_source("hf:acme/chat"))
    with pytest.raises(ConfigError, match="split 'test'"):
        read_source("hf:acme/chat:test")


# ---------------------------------------------------------------------------- projects: lineage, checks, validate


def project(root: Path, train: str, heldout: str | None = None, fmt: str | None = None, **extra: Any) -> Path:
    cfg: dict[str, Any] = {
        "project": "chatp",
        "datasets": {"train": {"path": train} | ({"format": fmt} if fmt else {})},
        "models": {"m": {"dataset": "train"}},
        "deploy": {"model": "m"},
    }
    if heldout:
        cfg["datasets"]["heldout"] = {"path": heldout}
        cfg["evals"] = {"heldout": {"dataset": "heldout", "metrics": ["exact_match"]}}
    for k, v in extra.items():
        cfg["datasets"]["train"][k] = v
    (root / "mlops.yaml").write_text(json.dumps(cfg))
    return root / "mlops.yaml"


def fingerprint(cfg: Path) -> tuple[str, str]:
    from mlops.config import load
    from mlops.plan import lineage

    lin = lineage(load(cfg), "m")
    return lin["fingerprint"], lin["dataset_hashes"]["train"]


def test_the_fingerprint_covers_every_local_source(tmp_path: Path, hf: Any, hf_offline: Path) -> None:
    import pyarrow.parquet as pq

    changed = [CHAT[0], {**CHAT[1], "tags": ["other"]}]
    seen: set[str] = set()

    def both(cfg: Path, write: Any) -> None:
        write(CHAT)
        a = fingerprint(cfg)
        assert a == fingerprint(cfg)  # stable while nothing changes
        write(changed)
        b = fingerprint(cfg)
        assert a[0] != b[0] and a[1] != b[1]
        seen.update((a[0], b[0]))

    both(project(tmp_path, "d.jsonl"), lambda rows: write_jsonl(tmp_path / "d.jsonl", rows))
    both(project(tmp_path, "d.parquet"), lambda rows: pq.write_table(table(rows), tmp_path / "d.parquet"))
    both(project(tmp_path, "ds"), lambda rows: hf.Dataset.from_list(filled(rows)).save_to_disk(str(tmp_path / "ds")))
    caches = iter(range(2))

    def cached(rows: list[Any]) -> None:  # a new snapshot of the dataset in a fresh cache
        cache = hf_offline.with_name(f"hf-cache-{next(caches)}")
        hf.config.HF_DATASETS_CACHE = cache
        hf_cached(hf, cache, "acme/chat", rows)

    both(project(tmp_path, "hf:acme/chat"), cached)
    assert len(seen) == 8


def test_s3_object_is_cached_with_its_sha256_in_the_lineage(tmp_path: Path, moto_endpoint: str) -> None:
    import boto3
    from conftest import S3_BUCKET

    from mlops.config import load
    from mlops.plan import lineage

    s3 = boto3.session.Session().client("s3", endpoint_url=moto_endpoint)
    key = "data-formats/chat.jsonl"
    body = write_jsonl(tmp_path / "up.jsonl", CHAT).read_bytes()
    s3.put_object(Bucket=S3_BUCKET, Key=key, Body=body)
    cfg = project(tmp_path, f"s3://{S3_BUCKET}/{key}")
    loaded = load(cfg)
    check_chat(read_dataset(loaded, "train"))
    cached = tmp_path / ".mlops" / "cache" / "datasets" / "s3" / S3_BUCKET / key
    assert cached.read_bytes() == body  # the copy under the storage's cache
    lin = lineage(loaded, "m")
    assert lin["dataset_hashes"]["train"] == hashlib.sha256(body).hexdigest()
    # a changed object is fetched again: another hash, another fingerprint
    s3.put_object(Bucket=S3_BUCKET, Key=key, Body=body.replace(b"10 EUR", b"11 EUR"))
    lin2 = lineage(loaded, "m")
    assert lin2["dataset_hashes"]["train"] != lin["dataset_hashes"]["train"]
    assert lin2["fingerprint"] != lin["fingerprint"]
    with pytest.raises(ConfigError, match=f"s3://{S3_BUCKET}/data-formats/absent.jsonl: cannot read the object"):
        read_source(f"s3://{S3_BUCKET}/data-formats/absent.jsonl", cache=tmp_path)


def chat(user: str, answer: str | None = "ok", system: str | None = None) -> dict[str, Any]:
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"messages": turns + ([{"role": "assistant", "content": answer}] if answer else [])}


def word_tokenizer(base: Path, words: list[str]) -> None:
    """A base directory with only a tokenizer.json: one token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    base.mkdir()
    tok.save(str(base / "tokenizer.json"))


def test_data_checks_on_chat_rows(tmp_path: Path) -> None:
    from mlops.config import load
    from mlops.monitor.datachecks import run_checks

    (tmp_path / "evals").mkdir()
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            chat("What is my balance?", system="Be brief."),
            chat("what is  my balance?", "no"),  # another conversation (another answer, another case)
            chat(" What is my   balance? ", system="Be brief."),  # the first one again, spaced out
            chat("Leaked question", "yes"),
            chat("word " * 12, "x"),  # 62 characters, 13 words
        ],
    )
    # the eval case ends on its user turn: its prompt turns equal training row 4's
    write_jsonl(tmp_path / "evals" / "chat.jsonl", [chat("Leaked  question", None), chat("fresh", None)])
    cfg = project(tmp_path, "chat.jsonl", "evals/chat.jsonl", checks={"max_length": 40})
    res = run_checks(load(cfg))
    found = {f.check: f for f in res.datasets["train"].findings}
    assert not res.ok
    assert found["duplicates"].rows == [3] and "repeat a conversation" in found["duplicates"].message
    assert found["leakage"].rows == [4] and "prompt turns that are in eval set 'heldout'" in found["leakage"].message
    assert found["length"].rows == [5] and "longer than 40 characters" in found["length"].message
    assert res.datasets["heldout"].findings == [] and res.datasets["heldout"].rows == 2
    # with a base that has a tokenizer.json, lengths are its tokens: 9 at most in rows 1-4, 13 in row 5
    word_tokenizer(tmp_path / "base", ["a", "b"])
    cfg = project(tmp_path, "chat.jsonl", "evals/chat.jsonl", checks={"max_length": 9, "leakage": "allow"})
    raw = json.loads(cfg.read_text())
    raw["models"]["m"]["base"] = "base"
    cfg.write_text(json.dumps(raw))
    res = run_checks(load(cfg))
    found = {f.check: f for f in res.datasets["train"].findings}
    assert found["length"].rows == [5] and "longer than 9 tokens" in found["length"].message
    assert "leakage" not in found and found["duplicates"].severity == "warn"


def test_validate_data_on_a_chat_project(tmp_path: Path) -> None:
    from conftest import mlops

    (tmp_path / "evals").mkdir()
    write_jsonl(tmp_path / "chat.jsonl", CHAT)
    write_jsonl(tmp_path / "evals" / "chat.jsonl", [chat("fresh", None)])
    project(tmp_path, "chat.jsonl", "evals/chat.jsonl", fmt="chat")
    r = mlops("validate", "--data", "--json", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["datasets"]["train"]["rows"] == 2
    write_jsonl(tmp_path / "chat.jsonl", [*CHAT, chat("no answer", None)])  # a training row with no answer
    r = mlops("validate", "--data", cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert (
        "chat.jsonl: rows: messages: no assistant turn to learn from (training set 'train'; the conversation "
        "ends on a 'user' turn) (lines 3)"
    ) in r.stdout + r.stderr


def test_rows_travel_as_jsonl_of_their_own_format(tmp_path: Path) -> None:
    """What the Modal backend sends a trainer when the source is not a JSONL file reads back equal."""
    import pyarrow.parquet as pq

    from mlops.data import to_jsonl

    for name, rows in {"chat": CHAT, "comp": COMPLETION, "pairs": PAIRS}.items():
        pq.write_table(table(rows), tmp_path / f"{name}.parquet")
        before = read_source(tmp_path / f"{name}.parquet")
        (tmp_path / f"{name}.jsonl").write_bytes(to_jsonl(before))
        assert read_source(tmp_path / f"{name}.jsonl") == before
