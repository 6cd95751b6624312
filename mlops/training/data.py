"""Datasets are read by `mlops.data` (a bottom layer: evals read the same files)."""

from mlops.data import Example, read_jsonl, read_source

__all__ = ["Example", "read_jsonl", "read_source"]
