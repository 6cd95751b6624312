"""`mlops init`: add the template to an existing repository, so the template is not only a fork.

The files are the template repository's own (mlops.yaml, functions/, .github/workflows/, the
example eval and its data). A built wheel carries them as package data under `mlops/_template`
(setup.py copies them at build time); a source checkout (an editable install) reads them from
the checkout itself. Either way they are the same bytes the template runs and tests.
"""

from __future__ import annotations

from pathlib import Path

from mlops.errors import UsageError

PACKAGED = Path(__file__).parent / "_template"
CHECKOUT = Path(__file__).parent.parent
# What a project needs, relative to its root: globs, so a new function or workflow is picked up.
PATTERNS = (
    "mlops.yaml",
    "mlops.schema.json",
    "functions/*.py",
    ".github/workflows/*.yml",
    ".github/mlops-requirements.txt",
    "evals/*.jsonl",
    "data/*.jsonl",
    # `mlops init --example NAME`: examples/NAME/ replaces mlops.yaml, data/ and evals/
    "examples/*/*.yaml",
    "examples/*/*.py",
    "examples/*/data/*.jsonl",
    "examples/*/evals/*.jsonl",
)
EXAMPLES = ("chat",)
# In a project that is not the template, the workflows install mlops itself, not the project.
REQUIREMENTS = (
    "# What the workflows install: mlops itself (pin a version or a git URL of mlops here).\nmlops[eval,cloud]\n"
)


def template_root() -> Path:
    if PACKAGED.is_dir():
        return PACKAGED
    if (CHECKOUT / "mlops.yaml").is_file() and (CHECKOUT / ".github" / "workflows").is_dir():
        return CHECKOUT
    raise UsageError("the mlops template files are not installed with this package (reinstall mlops)")


def template_files(root: Path | None = None) -> list[str]:
    root = root or template_root()
    found = {p.relative_to(root).as_posix() for pat in PATTERNS for p in root.glob(pat) if p.is_file()}
    return sorted(found)


def files_for(root: Path, example: str | None) -> list[tuple[str, str]]:
    """(name in the project, name in the template): the template's project, or with `example` its
    mlops.yaml, data/ and evals/ replaced by examples/<example>/'s files."""
    names = template_files(root)
    common = [n for n in names if not n.startswith("examples/")]
    if example is None:
        return [(n, n) for n in common]
    if example not in EXAMPLES:
        raise UsageError(f"unknown example {example!r} (valid: {', '.join(EXAMPLES)})")
    prefix = f"examples/{example}/"
    own = [(n[len(prefix) :], n) for n in names if n.startswith(prefix)]
    keep = [(n, n) for n in common if n != "mlops.yaml" and not n.startswith(("data/", "evals/"))]
    return sorted(keep + own)


def init(dest: Path, force: bool = False, example: str | None = None) -> list[str]:
    """Copy the template (or one of its examples) into `dest`; refuse to overwrite any file unless
    `force`. Returns what was written."""
    root = template_root()
    if not dest.is_dir():
        raise UsageError(f"{dest} is not a directory")
    files = files_for(root, example)
    existing = [n for n, _ in files if (dest / n).exists()]
    if existing and not force:
        raise UsageError(f"would overwrite {', '.join(existing)} in {dest} (use --force)")
    for name, source in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = (root / source).read_bytes()
        if name == ".github/mlops-requirements.txt":
            data = REQUIREMENTS.encode()
        target.write_bytes(data)
    return [n for n, _ in files]
