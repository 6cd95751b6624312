"""The eval report: a release against production, from stored results only (no model is called).

model.py      Report: the document, as pydantic contracts (its dump is what `mlops report --json` prints)
numbers.py    build_report: the numbers, as a Report
markdown.py   to_markdown: the PR comment / job summary, under MAX_CHARS whatever the suite size
"""

from mlops.report.markdown import MARKER, MAX_CHARS, to_markdown, write_step_summary
from mlops.report.model import Report
from mlops.report.numbers import build_report

__all__ = ["MARKER", "MAX_CHARS", "Report", "build_report", "to_markdown", "write_step_summary"]
