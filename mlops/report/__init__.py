"""The eval report: a release against production, from stored results only (no model is called).

numbers.py    build_report: the numbers (what `mlops report --json` prints)
markdown.py   to_markdown: the PR comment / job summary, under MAX_CHARS whatever the suite size
"""

from mlops.report.markdown import MARKER, MAX_CHARS, to_markdown, write_step_summary
from mlops.report.numbers import build_report

__all__ = ["MARKER", "MAX_CHARS", "build_report", "to_markdown", "write_step_summary"]
