"""`mlops --help` and `mlops validate` must not import the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

HEAVY = (
    "torch",
    "transformers",
    "deepeval",
    "ragas",
    "wandb",
    "modal",
    "boto3",
    "sentence_transformers",
    "datasets",
    "pyarrow",
    "trl",
)

PROBE = """
import sys
sys.argv = ["mlops", *{args!r}]
from mlops.cli.main import main
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--help"], ["validate"], ["validate", "--json"], ["schema"]])
def test_light_commands_import_no_heavy_library(args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    heavy = r.stderr.strip().splitlines()[-1]
    assert heavy == "HEAVY=", f"{args} imported {heavy}"


def test_probe_can_fail() -> None:
    """The probe does see a heavy import when one happens (so the test above can fail)."""
    code = PROBE.format(args=["--help"], heavy=HEAVY).replace(
        "from mlops.cli.main import main", "import torch\nfrom mlops.cli.main import main"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "HEAVY=torch"


@pytest.mark.parametrize("args", [["validate"], ["validate", "--json", "--set", "project=x", "-c", "mlops.yaml"]])
def test_validate_starts_without_the_cli_framework(args: list[str]) -> None:
    """`validate` is the command editors and hooks run on every save: no Typer, no rich (start-up)."""
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args, heavy=("typer", "rich", "click"))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "HEAVY=", f"{args}: {r.stderr}"
