"""Where a dataset's rows come from: a local JSONL, Parquet or CSV file, a directory written by Hugging
Face `datasets.save_to_disk`, `hf:org/name[:split]` through `datasets` (offline flags honoured), or
`s3://bucket/key` copied into the local cache. Each source yields raw rows with their line (JSONL) or
0-based row index, and has a content hash that covers everything its rows are read from.

pyarrow, datasets and boto3 are imported only when a source needs them (`mlops validate` needs none).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops.errors import ConfigError, InfraError

if TYPE_CHECKING:
    from mlops.config import Loaded

SUFFIXES = (".jsonl", ".parquet", ".csv")
CONTEXT_KEYS = ("context", "contexts", "retrieval_context")  # RAG: a row's retrieved contexts
# CSV cells are text: these columns hold JSON lists when they hold anything
JSON_COLUMNS = ("messages", "tools", "tags", *CONTEXT_KEYS)
CHUNK = 1 << 20


class RowError(ConfigError):
    """One bad row: the headline names where; `row` (its line or index) and `detail` (field: what)
    let the data checks report it as a finding."""

    def __init__(self, headline: str, row: int, detail: str) -> None:
        super().__init__(headline)
        self.row, self.detail = row, detail


class EmptyDataset(ConfigError):
    """A source with no rows."""


class Rows:
    """How a source's rows are named in errors: `path:LINE`, or `path: row N` (0-based index)."""

    def __init__(self, label: str, by_line: bool) -> None:
        self.label, self.by_line = label, by_line

    def where(self, n: int) -> str:
        return f"{self.label}:{n}" if self.by_line else f"{self.label}: row {n}"


@dataclass(frozen=True)
class Source:
    """A parsed `datasets.<name>.path`: kind is file | dir | hf | s3."""

    kind: str
    text: str  # as written in the config
    path: Path | None = None  # file and dir: the local path
    hf_id: str = ""
    split: str = "train"

    @property
    def stem(self) -> str:
        if self.kind == "hf":
            return self.hf_id.rsplit("/", 1)[-1]
        return Path(self.text.rstrip("/")).stem


def parse(source: str, root: Path) -> Source:
    if source.startswith("hf:"):
        ident, _, split = source.removeprefix("hf:").partition(":")
        if not ident or ident.count("/") > 1:
            raise ConfigError(f"{source}: expected hf:org/name[:split]")
        return Source("hf", source, hf_id=ident, split=split or "train")
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ConfigError(f"{source}: expected s3://bucket/key of one .jsonl, .parquet or .csv object")
        return Source("s3", source)
    p = (root / source).resolve()
    return Source("dir" if p.is_dir() else "file", source, p)


def cache_dir(loaded: Loaded) -> Path:
    """Where s3:// datasets are copied: under the registry's directory, or `.cache/datasets/` when the
    registry is itself remote."""
    storage = loaded.cfg.storage
    if "://" in storage:
        return loaded.root / ".cache" / "datasets"
    return (loaded.root / storage / "cache" / "datasets").resolve()


# ---------------------------------------------------------------------------- rows


def open_rows(source: str, root: Path, cache: Path | None) -> tuple[Iterable[tuple[int, Any]], Rows, str]:
    """(raw rows with their numbers, how to name a row, default-id stem) of one source."""
    src = parse(source, root)
    if src.kind == "hf":
        return _hf_rows(_load_hf(src), src.text), Rows(src.text, False), src.stem
    if src.kind == "s3":
        path = fetch_s3(src.text, cache or root / ".cache" / "datasets")
        return _file_rows(path, src.text), _rows_of(path, src.text), src.stem
    assert src.path is not None
    if src.kind == "dir":
        return _hf_rows(_load_disk(src.path, src.text), src.text), Rows(src.text, False), src.stem
    return _file_rows(src.path, source), _rows_of(src.path, source), src.stem


def _rows_of(path: Path, label: str) -> Rows:
    return Rows(label, path.suffix.lower() not in (".parquet", ".csv"))


def _file_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, label)
    if suffix == ".csv":
        return _csv_rows(path, label)
    return _jsonl_rows(path, label)


def _jsonl_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    try:
        fh = path.open(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{label}: cannot read: {e.strerror}") from e
    with fh:
        try:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise RowError(f"{label}:{n}: invalid JSON: {e.msg}", n, f"invalid JSON: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{label}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parquet_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{label}: not a readable Parquet file: {_first_line(e)}") from None
    yield from enumerate(table.to_pylist())


def _csv_rows(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    try:
        fh = path.open(encoding="utf-8", newline="")
    except OSError as e:
        raise ConfigError(f"{label}: cannot read: {e.strerror}") from e
    with fh:
        for i, rec in enumerate(csv.DictReader(fh)):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                if k in JSON_COLUMNS or k == "id":
                    if not v:
                        continue  # an empty optional cell is an absent value
                    if k != "id" and v.lstrip().startswith("["):
                        try:
                            v = json.loads(v)
                        except ValueError:
                            raise RowError(
                                f"{label}: row {i}: {k}: not a JSON list", i, f"{k}: not a JSON list"
                            ) from None
                row[k] = v
            yield i, row


def _hf_rows(ds: Any, label: str) -> Iterator[tuple[int, Any]]:
    yield from enumerate(ds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _load_disk(path: Path, label: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{label}: not a directory written by datasets' save_to_disk ({_first_line(e)})") from None
    return _one_split(ds, "train", label)


def _one_split(ds: Any, split: str, label: str) -> Any:
    if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict: pick the split
        names = list(ds.keys())
        if split in ds:
            return ds[split]
        if len(names) == 1:
            return ds[names[0]]
        raise ConfigError(f"{label}: no split {split!r} (splits: {', '.join(names)})")
    return ds


def offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _load_hf(src: Source) -> Any:
    import datasets

    try:
        return datasets.load_dataset(src.hf_id, split=src.split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each means "not here"
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline() else "available"
        raise ConfigError(
            f"{src.text}: dataset {src.hf_id!r} split {src.split!r} is not {where}: {_first_line(e)}"
        ) from None


# ---------------------------------------------------------------------------- s3


def fetch_s3(uri: str, cache: Path) -> Path:
    """The object copied under `cache` (kept while its ETag is unchanged); written whole or not at all."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    dest = cache / "s3" / bucket / key
    if ".." in Path(key).parts:
        raise ConfigError(f"{uri}: invalid key")
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=os.environ.get("MLOPS_S3_ENDPOINT_URL") or None,
        region_name=session.region_name or "us-east-1",
        config=Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 3}),
    )
    tag = dest.with_name(dest.name + ".etag")
    try:
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"]
        if dest.is_file() and tag.is_file() and tag.read_text() == etag:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        client.download_file(bucket, key, str(part))
        os.replace(part, dest)
        tag.write_text(etag)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
            raise ConfigError(f"{uri}: cannot read the object ({code})") from None
        raise InfraError(f"{uri}: S3 failed: {_first_line(e)}") from None
    except (BotoCoreError, OSError) as e:
        raise InfraError(f"{uri}: S3 failed: {_first_line(e)}") from None
    return dest


# ---------------------------------------------------------------------------- content hashes


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_files(files: Iterable[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(files):
        h.update(f"{name}\0{sha256_path(p)}\0".encode())
    return h.hexdigest()


def content_hash(source: str, root: Path, cache: Path | None = None) -> str:
    """sha256 of everything the rows are read from: a file's bytes (a JSONL's hash is what it always
    was), a save_to_disk directory's files, an hf: dataset's cached files (its id and fingerprint when
    it has none), an s3 object's downloaded bytes (an ETag is not a sha256)."""
    src = parse(source, root)
    if src.kind == "s3":
        return sha256_path(fetch_s3(src.text, cache or root / ".cache" / "datasets"))
    if src.kind == "hf":
        ds = _load_hf(src)
        files = [Path(f["filename"]) for f in getattr(ds, "cache_files", None) or []]
        if not files:
            return hashlib.sha256(f"{src.hf_id}\0{src.split}\0{getattr(ds, '_fingerprint', '')}".encode()).hexdigest()
        return _sha256_files((p.name, p) for p in files)
    assert src.path is not None
    if src.kind == "dir":
        return _sha256_files((p.relative_to(src.path).as_posix(), p) for p in src.path.rglob("*") if p.is_file())
    try:
        return sha256_path(src.path)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from e


def dataset_hash(loaded: Loaded, name: str) -> str:
    return content_hash(loaded.cfg.datasets[name].path, loaded.root, cache_dir(loaded))


def localize(loaded: Loaded, name: str) -> str:
    """The dataset as a trainer on this machine opens it: a local path (an s3 object copied into the
    cache first), or the hf: id as written."""
    src = parse(loaded.cfg.datasets[name].path, loaded.root)
    if src.kind == "s3":
        return str(fetch_s3(src.text, cache_dir(loaded)))
    if src.kind == "hf":
        return src.text
    return str(src.path)
