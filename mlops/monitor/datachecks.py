"""Data checks declared per dataset (`datasets.<name>.checks`), and a dataset's profile for drift.

Checks: JSON rows, required fields and their types, input length range (`min_length: 1` refuses
empty inputs), duplicate inputs, and leakage (a training row whose input is also in an eval set).
`mlops validate --data` runs them all; training runs those of its dataset and refuses to start on
an error, naming the rows by line number. Findings at `warn` are reported and do not block.

The profile (row count, input length histogram, character counts) is stored in a release's lineage;
the next release of the model records its dataset drift against it (PSI of length, JS of chars).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlops.config import Loaded
from mlops.data import Example, detect_format, read_dataset_numbered
from mlops.datasources import EmptyDataset, RowError
from mlops.errors import ConfigError, InfraError
from mlops.monitor.model import DataChecks, DatasetChecks, FindingRow

TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "list": list,
    "dict": dict,
}
SHOW_ROWS = 10  # line numbers named per finding
DRIFT_ENV = "MLOPS_DRIFT_REPORT"


class DataCheckFailed(ConfigError):
    """A dataset failed an error-level check: training does not start (exit 1)."""


@dataclass
class Finding:
    dataset: str
    check: str
    severity: str  # "error" | "warn"
    message: str
    rows: list[int] = field(default_factory=list)  # 1-based line numbers

    def line(self, path: str) -> str:
        shown = ", ".join(str(r) for r in self.rows[:SHOW_ROWS])
        more = f" and {len(self.rows) - SHOW_ROWS} more" if len(self.rows) > SHOW_ROWS else ""
        where = f" (lines {shown}{more})" if self.rows else ""
        return f"{path}: {self.check}: {self.message}{where}"


def _read(path: Path) -> tuple[list[tuple[int, Any]], list[int]]:
    """(line number, parsed row) for every non-blank line, and the lines that are not JSON."""
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise InfraError(f"cannot read {path}: {e.strerror}") from e
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except ValueError:
            bad.append(i)
    return rows, bad


def _raw_pairs(loaded: Loaded, name: str) -> tuple[list[tuple[int, Any]], list[int]] | None:
    """A local JSONL of pairs as raw rows (checked field by field, every bad line named); None for
    the other formats and sources, which are checked through the reader (mlops.data)."""
    ds = loaded.cfg.datasets[name]
    if ds.format not in (None, "pairs") or not ds.path.endswith(".jsonl") or ds.path.startswith(("hf:", "s3://")):
        return None
    rows, bad = _read(loaded.dataset_path(name))
    if ds.format is None and rows and detect_format(rows[0][1]) != "pairs":
        return None
    return rows, bad


def _norm(text: Any) -> Any:
    return " ".join(text.split()) if isinstance(text, str) else text


def identity(turns: Iterable[dict[str, Any]]) -> str:
    """A conversation's identity for duplicates and leakage: its turns, whitespace normalised."""
    keep = ("role", "content", "name", "tool_calls", "tool_call_id")
    norm = [{k: _norm(t[k]) for k in keep if t.get(k) is not None} for t in turns]
    return json.dumps(norm, sort_keys=True, ensure_ascii=False)


def prompt_key(ex: Example) -> str:
    """What an eval case asks (a chat case: its prompt turns), compared with a training row's."""
    return identity(ex.messages) if ex.format == "chat" else ex.input


def _row_key(ex: Example) -> str:
    """What makes two rows of one dataset duplicates (a chat row: its whole conversation)."""
    return identity(ex.conversation()) if ex.format == "chat" else ex.input


def _prompts(loaded: Loaded, name: str) -> set[str]:
    raw = _raw_pairs(loaded, name)
    if raw is not None:
        field = loaded.cfg.datasets[name].input_field
        return {r[field] for _, r in raw[0] if isinstance(r, dict) and isinstance(r.get(field), str)}
    try:
        return {prompt_key(ex) for _, ex in read_dataset_numbered(loaded, name)}
    except ConfigError:
        return set()  # a bad eval set is named by its own checks


def measure(loaded: Loaded, name: str) -> tuple[Callable[[str], int], str]:
    """How a row's length is counted: in the base tokenizer's tokens when the model that trains on
    (or else serves) this dataset has a local base with a tokenizer.json, else in characters."""
    cfg = loaded.cfg
    models = [m for m in cfg.models.values() if m.dataset == name] or [cfg.models[cfg.deploy.names[0]]]
    for m in models:
        tok_file = loaded.root / m.base / "tokenizer.json"
        if m.base != "scratch" and tok_file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))

            def tokens(text: str, tok: Tokenizer = tok) -> int:
                return len(tok.encode(text, add_special_tokens=False).ids)

            return tokens, "tokens"
    return len, "characters"


def check_dataset(loaded: Loaded, name: str) -> tuple[int, list[Finding]]:
    """(rows, findings) of one dataset's declared checks, leakage included."""
    raw = _raw_pairs(loaded, name)
    if raw is None:
        return _check_rows(loaded, name)
    ds = loaded.cfg.datasets[name]
    ck = ds.checks
    rows, bad = raw
    found: list[Finding] = []
    if bad:
        found.append(Finding(name, "json", "error", f"{len(bad)} line(s) are not JSON", bad))
    if not rows and not bad:
        found.append(Finding(name, "empty", "error", "the dataset has no rows"))
    required = ck.required or {ds.input_field: "str", ds.target_field: "str"}
    not_obj = [i for i, r in rows if not isinstance(r, dict)]
    if not_obj:
        found.append(Finding(name, "json", "error", f"{len(not_obj)} row(s) are not JSON objects", not_obj))
    objs = [(i, r) for i, r in rows if isinstance(r, dict)]
    for key, tname in required.items():
        missing = [i for i, r in objs if r.get(key) is None]
        wrong = [i for i, r in objs if r.get(key) is not None and not _is(r[key], tname)]
        if missing:
            found.append(Finding(name, "required", "error", f"{len(missing)} row(s) lack {key!r}", missing))
        if wrong:
            found.append(Finding(name, "types", "error", f"{len(wrong)} row(s) have {key!r} not a {tname}", wrong))
    inputs = [(i, r[ds.input_field]) for i, r in objs if isinstance(r.get(ds.input_field), str)]
    found += _common_checks(loaded, name, inputs, inputs, inputs, "input(s)")
    return len(rows), found


def _check_rows(loaded: Loaded, name: str) -> tuple[int, list[Finding]]:
    """The checks of a chat or completion dataset, or of any non-JSONL source, on the reader's rows."""
    try:
        rows = read_dataset_numbered(loaded, name)
    except RowError as e:  # the reader stops at the first bad row
        return 0, [Finding(name, "rows", "error", e.detail, [e.row])]
    except EmptyDataset:
        return 0, [Finding(name, "empty", "error", "the dataset has no rows")]
    chat = any(ex.format == "chat" for _, ex in rows)
    texts = [
        (i, "\n".join(str(t.get("content") or "") for t in ex.conversation()) if chat else ex.input) for i, ex in rows
    ]
    keys = [(i, _row_key(ex)) for i, ex in rows]
    prompts = [(i, prompt_key(ex)) for i, ex in rows]
    return len(rows), _common_checks(loaded, name, texts, keys, prompts, "conversation(s)" if chat else "input(s)")


def _common_checks(
    loaded: Loaded,
    name: str,
    texts: list[tuple[int, str]],
    keys: list[tuple[int, str]],
    prompts: list[tuple[int, str]],
    what: str,
) -> list[Finding]:
    """Lengths of `texts`, duplicate `keys`, and leakage of `prompts` into the eval sets."""
    ck = loaded.cfg.datasets[name].checks
    found: list[Finding] = []
    length, unit = measure(loaded, name) if (ck.min_length > 1 or ck.max_length is not None) else (len, "characters")
    lengths = [(i, length(x.strip())) for i, x in texts]
    short = [i for i, n in lengths if n < ck.min_length]
    if short:
        shorter = "empty" if ck.min_length <= 1 else f"shorter than {ck.min_length} {unit}"
        found.append(Finding(name, "length", "error", f"{len(short)} {what} {shorter}", short))
    if ck.max_length is not None:
        long = [i for i, x in texts if length(x) > ck.max_length]
        if long:
            msg = f"{len(long)} {what} longer than {ck.max_length} {unit}"
            found.append(Finding(name, "length", "error", msg, long))
    if ck.duplicates != "allow":
        seen: set[str] = set()
        dups = []
        for i, x in keys:
            if x in seen:
                dups.append(i)
            seen.add(x)
        if dups:
            repeat = "a conversation" if what.startswith("conversation") else "an input"
            found.append(Finding(name, "duplicates", ck.duplicates, f"{len(dups)} row(s) repeat {repeat}", dups))
    if ck.leakage != "allow" and name in {m.dataset for m in loaded.cfg.models.values()}:
        for suite, ev in sorted(loaded.cfg.evals.items()):
            if ev.dataset == name:
                continue
            held = _prompts(loaded, ev.dataset)
            train_rows = [i for i, x in prompts if x in held]
            if train_rows:
                has = "an input that is" if not what.startswith("conversation") else "prompt turns that are"
                msg = f"{len(train_rows)} training row(s) have {has} in eval set {suite!r}"
                found.append(Finding(name, "leakage", ck.leakage, msg, train_rows))
    return found


def _is(value: Any, tname: str) -> bool:
    if tname in ("int", "float") and isinstance(value, bool):
        return False
    return isinstance(value, TYPES[tname])


def run_checks(loaded: Loaded, names: list[str] | None = None) -> DataChecks:
    """Every dataset's checks (or `names`'): what `mlops validate --data` prints."""
    datasets: dict[str, DatasetChecks] = {}
    for name in names or list(loaded.cfg.datasets):
        n, found = check_dataset(loaded, name)
        path = loaded.cfg.datasets[name].path
        datasets[name] = DatasetChecks(
            path=path, rows=n, findings=[FindingRow(**asdict(f), line=f.line(path)) for f in found]
        )
    ok = all(f.severity != "error" for d in datasets.values() for f in d.findings)
    return DataChecks(ok=ok, datasets=datasets)


def require_clean(loaded: Loaded, model: str) -> DataChecks:
    """Training's gate: the model's dataset passes its checks, or DataCheckFailed names the rows."""
    name = loaded.cfg.models[model].dataset
    res = run_checks(loaded, [name])
    errors = [f.line for f in res.datasets[name].findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more failed check(s); `mlops validate --data`)" if len(errors) > 1 else ""
        raise DataCheckFailed(f"training refused: {errors[0]}{more}")
    return res


def profile(loaded: Loaded, name: str) -> dict[str, Any]:
    """What the next release compares its data with: rows, input lengths, characters."""
    ds = loaded.cfg.datasets[name]
    raw = _raw_pairs(loaded, name)
    if raw is not None:
        f = ds.input_field
        xs = [r[f] for _, r in raw[0] if isinstance(r, dict) and isinstance(r.get(f), str)]
    else:  # a chat row's input is its last user turn: what a request to the endpoint ends with
        xs = [ex.input for _, ex in read_dataset_numbered(loaded, name)]
    lengths = Counter(len(x) for x in xs)
    chars = Counter("".join(xs)).most_common(200)
    return {
        "dataset": name,
        "rows": len(xs),
        "lengths": {str(k): v for k, v in sorted(lengths.items())},
        "chars": dict(chars),
    }


def profile_drift(prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
    """Dataset drift between two profiles: PSI of input length, Jensen-Shannon of characters."""
    from mlops.monitor import stats

    def expand(lengths: dict[str, int]) -> list[int]:
        return [int(k) for k, v in lengths.items() for _ in range(int(v))]

    cd = stats.char_drift(Counter(prev.get("chars", {})), Counter(cur.get("chars", {})))
    return {
        "rows": [prev.get("rows"), cur.get("rows")],
        "input_length_psi": round(stats.psi(expand(prev.get("lengths", {})), expand(cur.get("lengths", {}))), 6),
        "char_js": round(cd["js"], 6),
    }


def before_training(loaded: Loaded, registry: Any, model: str) -> dict[str, Any]:
    """Training's hook: refuse on a failed check (DataCheckFailed names the rows); otherwise the
    lineage entries: this data's profile, and its drift against the previous release's data."""
    require_clean(loaded, model)
    prof = profile(loaded, loaded.cfg.models[model].dataset)
    prev_id = registry.read_state()[0].stages.get("production")
    prev = registry.manifest(prev_id) if prev_id else None
    prev_prof = (prev or {}).get("lineage", {}).get("data_profile") if (prev or {}).get("model") == model else None
    drift = profile_drift(prev_prof, prof) | {"against": prev_id} if prev_prof else None
    return {"data_profile": prof, "dataset_drift": drift, "drift_trigger": drift_trigger(model)}


def drift_trigger(model: str | None = None) -> dict[str, Any] | None:
    """The monitor report that started this training, when the nightly workflow passes one:
    `mlops monitor --json --out drift.json` exits 3, then `MLOPS_DRIFT_REPORT=drift.json mlops run`.
    A report of several models is `model`'s part of it: None when `model` did not drift (a model
    that trained in the same run because its data changed was not retrained for a drift)."""
    path = os.environ.get(DRIFT_ENV)
    if not path:
        return None
    try:
        rep = json.loads(Path(path).read_text(encoding="utf-8"))
        crossed = [c for c in rep["checks"] if c.get("drifted")]
        release, requests = rep.get("release"), rep.get("requests")
        models = rep.get("models")
        if isinstance(models, dict) and model is not None:
            mine = models.get(model)
            if not isinstance(mine, dict) or not mine.get("drifted"):
                return None
            release, requests, prefix = mine.get("release"), mine.get("requests", requests), f"{model}."
            crossed = [c | {"name": c["name"][len(prefix) :]} for c in crossed if c["name"].startswith(prefix)]
        return {
            "release": release,
            "window": [rep.get("since"), rep.get("until")],
            "requests": requests,
            "drifted": [{k: c.get(k) for k in ("name", "value", "threshold")} for c in crossed],
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{DRIFT_ENV}={path}: not a readable `mlops monitor --json` report ({e})") from e
