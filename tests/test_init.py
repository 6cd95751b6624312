"""`mlops init`: the template added to an existing repository, from the files the package ships."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, mlops

from mlops.scaffold import template_files


def copy_source(s: Path, dest: Path) -> None:
    """Copy a source file or tree without bytecode: another pytest-xdist worker may be writing a
    .pyc there (a temp file that vanishes mid-copy)."""
    if s.is_dir():
        shutil.copytree(s, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    else:
        shutil.copy2(s, dest)


def test_init_adds_the_template_and_it_validates(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("an existing project\n")
    out = mlops("init", str(tmp_path), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    written = json.loads(out.stdout)["files"]
    for must in ("mlops.yaml", "functions/train.py", ".github/workflows/ct.yml", ".github/workflows/pr-eval.yml"):
        assert must in written
    assert any(n.startswith("evals/") for n in written) and any(n.startswith("data/") for n in written)
    for name in written:  # the template's own bytes (the workflows install mlops, not the project)
        if name != ".github/mlops-requirements.txt":
            assert (tmp_path / name).read_bytes() == (REPO / name).read_bytes(), name
    assert "mlops[eval,cloud]" in (tmp_path / ".github/mlops-requirements.txt").read_text()
    assert (tmp_path / "README.md").read_text() == "an existing project\n"
    valid = mlops("validate", cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    (tmp_path / "mlops.yaml").write_text("project: mine\n")
    out = mlops("init", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 1
    assert "mlops.yaml" in out.stderr and "--force" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mlops.yaml").read_text() == "project: mine\n"
    assert not (tmp_path / "functions").exists()  # nothing half-written
    forced = mlops("init", str(tmp_path), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "mlops.yaml").read_bytes() == (REPO / "mlops.yaml").read_bytes()


def test_the_wheel_ships_the_template(tmp_path: Path) -> None:
    """Built from a copy of the sources (offline, no build isolation): the wheel carries the files."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "mlops", *{n.split("/")[0] for n in template_files(REPO)}):
        s = REPO / name
        copy_source(s, src / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("mlops-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n.removeprefix("mlops/_template/") for n in z.namelist() if n.startswith("mlops/_template/")}
        assert shipped == set(template_files(REPO))
        assert z.read("mlops/_template/.github/workflows/ct.yml") == (REPO / ".github/workflows/ct.yml").read_bytes()


def test_an_initialised_project_runs_under_act(tmp_path: Path) -> None:
    """`mlops init` in a fresh repository, then a push to main under act: the release is promoted.
    The runner's Python gets mlops the way a team's would: installed (a wheel built from these
    sources), not from the project, which has none."""
    import actkit
    import yaml

    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "README.md").write_text("a project that existed before mlops\n")
    out = mlops("init", str(repo), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = actkit.deep_merge(yaml.safe_load((repo / "mlops.yaml").read_text()), actkit.FAST)
    cfg["gates"] = actkit.FAST["gates"]
    (repo / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert mlops("validate", cwd=repo).returncode == 0
    actkit.git(repo, "init", "-q", "-b", "main")
    actkit.git(repo, "remote", "add", "origin", f"https://github.com/{actkit.REPO_NAME}.git")
    actkit.git(repo, "add", "-A")
    actkit.git(repo, "commit", "-qm", "mlops init")

    act = actkit.Act(tmp_path / "act")
    py = actkit.tool_python(act.work / "toolcache", actkit.workflow_python(repo / ".github" / "workflows"))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "mlops", *{n.split("/")[0] for n in template_files(REPO)}):
        s = REPO / name
        copy_source(s, src / name)
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", str(src)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]

    registry = tmp_path / "registry"
    res = act.run(repo, "push", actkit.push_event(repo), "ct.yml", vars={"MLOPS_STORAGE": str(registry)})
    assert res.rc == 0, res.log[-4000:]
    assert "Requirement already satisfied: mlops" in res.log
    rel = mlops("releases", "--json", "--set", f"storage={registry}", cwd=repo)
    assert json.loads(rel.stdout)["production"]
