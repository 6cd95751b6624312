"""The four workflows, executed for real by `act` (host mode, loopback only), event by event.

One shared registry directory plays `vars.MLOPS_STORAGE` for a whole story: pushes to main, pull
requests (same repository and fork), rollbacks and the nightly run against it in order, so one
trained base serves every scenario. The stand-in GitHub API (tests/actkit.py) records the comment
calls; a probe in the runner's Python records which secrets each process could see.

Defects of issue 8 and where each is caught: 1 rollback pipefail -> test_rollback_*;
2 PR candidate from the shared registry -> test_docs_only_pr_*; 3 CT report naming another release
-> test_noop_push_reports_production; 4 PRs writing production -> test_pr_sticky_comment_*;
5 PR credentials -> test_fork_pr_* and test_pr_credentials_are_scoped; 6 fork storage ->
test_fork_pr_*; 7 nightly green on a broken gate -> test_nightly_*; 8 storage from the repository
variable -> test_main_without_shared_registry_*; 9 concurrency -> test_rollback_has_its_own_concurrency;
10 superseded comment -> test_superseded_pr_run_*; 11 missing credentials -> test_missing_cloud_credentials_*.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import actkit  # noqa: E402
from conftest import mlops, mlops_serve  # noqa: E402
from test_monitor import example_inputs, shifted_inputs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
MARKER = "<!-- mlops-eval-report -->"
DRIFT_MARKER = "<!-- mlops-monitor-report -->"
QUIET_OUTPUT_LENGTH = {"monitor": {"thresholds": {"output_length_psi": None}}}
PR_SECRETS = {"MODAL_PR_TOKEN_ID": "pr-token-id-planted", "MODAL_PR_TOKEN_SECRET": "pr-token-secret-planted"}
PROD_SECRETS = {"MODAL_TOKEN_ID": "prod-token-id-planted", "MODAL_TOKEN_SECRET": "prod-token-secret-planted"}


class Story:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = actkit.make_repo(root / "repo")
        self.act = actkit.Act(root / "act")
        self.registry = root / "registry"  # vars.MLOPS_STORAGE: on a self-hosted runner, a persistent dir
        # the roles too: every job that assumes one asks the stand-in for an OIDC token and STS
        # grants it only under the README's trust policy for that role
        self.vars = {"MLOPS_STORAGE": str(self.registry)} | actkit.ROLE_ARNS
        self.results: dict[str, actkit.ActResult] = {}
        self.started = time.monotonic()

    def push(self, name: str, **commit: Any) -> actkit.ActResult:
        actkit.commit(self.repo, name, **commit)
        return self.run(name, "push", actkit.push_event(self.repo), "ct.yml")

    def run(self, name: str, event: str, payload: dict[str, Any], wf: str, **kw: Any) -> actkit.ActResult:
        kw.setdefault("vars", self.vars)
        kw.setdefault("secrets", PROD_SECRETS | PR_SECRETS)
        res = self.act.run(self.repo, event, payload, wf, **kw)
        self.results[name] = res
        return res

    def releases(self, storage: Path | str | None = None) -> dict[str, Any]:
        out = mlops("releases", "--json", "--set", f"storage={storage or self.registry}", cwd=self.repo)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def history(self, release: str) -> list[dict[str, Any]]:
        out = mlops("history", release, "--json", "--set", f"storage={self.registry}", cwd=self.repo)
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout)["history"])


def production_files(registry: Path) -> dict[str, str]:
    """sha256 of every file of the production registry (a PR's own pr-N registry excluded)."""
    return {
        str(p.relative_to(registry)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(registry.rglob("*"))
        if p.is_file() and not p.relative_to(registry).parts[0].startswith("pr-")
    }


def explain(res: actkit.ActResult) -> str:
    return f"exit {res.rc}; errors {res.errors()}\n{res.log[-4000:]}"


def uploaded(res: actkit.ActResult, name: str) -> dict[str, bytes]:
    """The files of artifact `name` as act's artifact server received them from upload-artifact."""
    arts = res.artifacts()
    assert name in arts, f"no artifact {name!r} reached act's artifact server (got {sorted(arts)}); {explain(res)}"
    return arts[name]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    s = Story(tmp_path_factory.mktemp("act"))
    yield s
    total = sum(sec for _, sec in s.act.runs)
    lines = ", ".join(f"{n} {sec:.0f}s" for n, sec in s.act.runs)
    print(f"\nact: {len(s.act.runs)} workflow runs, {total:.0f}s in act ({lines})")


# ---------------------------------------------------------------------------- push to main


def test_first_push_promotes(story: Story) -> None:
    res = story.run("first push", "push", actkit.push_event(story.repo), "ct.yml")
    assert res.rc == 0, explain(res)
    rel = story.releases()
    assert rel["production"] and len(rel["releases"]) == 1
    assert "promoting without a canary" in res.log
    # the job summary names the release this run promoted
    assert f"`{rel['production']}`" in res.summary.splitlines()[1], res.summary[:500]
    # the workflow's install step installed the repo under test (offline), and mlops ran from it
    assert res.step_ok("Install") and res.step_ok("mlops run")
    # the run's JSON (eval summaries, gate verdicts) and the report, kept as the run's artifact
    art = uploaded(res, "mlops-run")
    assert sorted(art) == ["report.md", "run.json"]
    run = json.loads(art["run.json"])
    assert run["release"] == rel["production"] and run["evals"] and run["gates"], run
    assert f"`{rel['production']}`" in art["report.md"].decode()


def test_second_push_canaries_and_promotes(story: Story) -> None:
    first = story.releases()["production"]
    res = story.push("second push", config={"models": {"tiny": {"train": {"seed": 1}}}})
    assert res.rc == 0, explain(res)
    rel = story.releases()
    assert rel["production"] != first and rel["previous"] == first
    events = [e["event"] for e in story.history(rel["production"])]
    assert events.count("canary_step") == 2 and "promoted" in events, events


def test_regressed_push_is_rejected_and_goes_red(story: Story) -> None:
    prod = story.releases()["production"]
    res = story.push("regressed push", config={"models": {"tiny": {"train": {"steps": 1}}}})
    assert res.rc != 0, explain(res)
    # act (like GitHub) keeps the job summary, a file: the verdict lines are asserted there
    assert "**Gate failed** (exit 3)" in res.summary
    rel = story.releases()
    assert rel["production"] == prod
    assert rel["releases"][0]["status"] in ("rejected", "rolled_back")
    # the summary is about the rejected candidate, by name
    assert f"`{rel['releases'][0]['id']}`" in res.summary.splitlines()[1]
    # a red run keeps its evidence too: the failed gates are in the uploaded run JSON
    run = json.loads(uploaded(res, "mlops-run")["run.json"])
    assert run["release"] == rel["releases"][0]["id"] and any(not g["passed"] for g in run["gates"]), run["gates"]


def test_noop_push_reports_production(story: Story) -> None:
    """Defect 3: the report names the release this run is about, not the registry's newest."""
    prod = story.releases()["production"]
    rejected = story.releases()["releases"][0]["id"]
    res = story.push("docs only", config={"models": {"tiny": {"train": {"steps": 40}}}}, files={"NOTES.md": "x\n"})
    assert res.rc == 0, explain(res)
    head = res.summary.splitlines()[1]
    assert f"`{prod}`" in head and rejected not in head, head


def test_main_without_shared_registry_fails_clearly(story: Story) -> None:
    """Defect 8: no vars.MLOPS_STORAGE and a committed `.mlops`: red, saying what to set."""
    res = story.run("push without MLOPS_STORAGE", "push", actkit.push_event(story.repo), "ct.yml", vars={})
    assert res.rc != 0
    assert "**No shared registry**" in res.summary and "set the repository variable MLOPS_STORAGE" in res.summary
    assert res.step_ok("mlops run") is None  # never trained into a throwaway registry


def test_missing_cloud_credentials_are_a_config_error(story: Story) -> None:
    """Defect 11: s3:// storage and no credentials: exit 1 once, not exit 4 and a retry."""
    res = story.run(
        "push, s3 without credentials",
        "push",
        actkit.push_event(story.repo),
        "ct.yml",
        vars={"MLOPS_STORAGE": "s3://mlops-registry/prod"},
    )
    assert res.rc != 0
    assert "retrying" not in res.log
    assert (
        "**mlops run failed** (exit 1, a config or usage error): error: no AWS credentials for s3://mlops-registry/prod"
        in (res.summary)
    ), explain(res)


# ---------------------------------------------------------------------------- pull requests


def pr(story: Story, name: str, number: int, fork: bool = False, **kw: Any) -> actkit.ActResult:
    payload = actkit.pr_event(story.repo, number, fork=fork)
    story.act.set_pull_head(number, payload["pull_request"]["head"]["sha"])
    return story.run(name, "pull_request", payload, "pr-eval.yml", **kw)


def comments(story: Story, number: int) -> list[dict[str, Any]]:
    return [c for c in story.act.state["comments"] if c["issue"] == number]


def test_pr_sticky_comment_created_then_updated(story: Story) -> None:
    """One comment per PR, updated in place; the PR never writes the production registry (4)."""
    actkit.git(story.repo, "checkout", "-qb", "pr-7")
    before = production_files(story.registry)
    prod = story.releases()["production"]
    sha1 = actkit.commit(story.repo, "pr 7: seed 2", config={"models": {"tiny": {"train": {"seed": 2}}}})
    first = pr(story, "pr 7, push 1", 7)
    assert first.rc == 0, explain(first)
    assert production_files(story.registry) == before  # defect 4: checked first, and again after push 2
    [c1] = comments(story, 7)
    assert c1["body"].startswith(MARKER) and f"vs production `{prod}`" in c1["body"]
    assert f"head {sha1}" in c1["body"] and "/actions/runs/" in c1["body"]
    sha2 = actkit.commit(story.repo, "pr 7: seed 3", config={"models": {"tiny": {"train": {"seed": 3}}}})
    second = pr(story, "pr 7, push 2", 7)
    assert second.rc == 0, explain(second)
    [c2] = comments(story, 7)
    assert c2["id"] == c1["id"] and f"head {sha2}" in c2["body"] and c2["body"] != c1["body"]
    methods = [(c["method"], c["path"].rsplit("/", 2)[-2]) for c in second.calls if c["method"] != "GET"]
    assert methods == [("PATCH", "comments")], second.calls
    assert all(c["auth"] for c in first.calls + second.calls)
    # production untouched; both candidates live in the PR's own registry
    assert production_files(story.registry) == before
    own = story.releases(story.registry / "pr-7")
    assert len(own["releases"]) == 2 and own["production"] is None
    assert own["releases"][0]["id"] in c2["body"] and own["releases"][1]["id"] in c1["body"]
    # the candidate, its eval results and the comment's report, as the run's artifact
    art = uploaded(second, "mlops-pr-eval")
    assert sorted(art) == ["eval.json", "report.md", "train.json"]
    assert json.loads(art["train.json"])["release"] == own["releases"][0]["id"]
    assert json.loads(art["eval.json"]) and c2["body"].startswith(art["report.md"].decode().rstrip())
    actkit.git(story.repo, "checkout", "-q", "main")


def test_regressed_pr_goes_red(story: Story) -> None:
    actkit.git(story.repo, "checkout", "-qb", "pr-8")
    actkit.commit(story.repo, "pr 8: one step", config={"models": {"tiny": {"train": {"steps": 1}}}})
    res = pr(story, "pr 8, regressed", 8)
    assert res.rc != 0
    assert "**Gate failed** (exit 3)" in res.summary, explain(res)
    [c] = comments(story, 8)
    assert "**Verdict: FAIL**" in c["body"]
    actkit.git(story.repo, "checkout", "-q", "main")


def test_docs_only_pr_reports_its_own_state(story: Story) -> None:
    """Defect 2: a docs-only PR is about itself, not the candidate another PR left behind."""
    actkit.git(story.repo, "checkout", "-qb", "pr-9")
    actkit.commit(story.repo, "pr 9: docs", files={"docs/usage.md": "How to use it.\n"})
    prod = story.releases()["production"]
    res = pr(story, "pr 9, docs only", 9)
    assert res.rc == 0, explain(res)
    [c] = comments(story, 9)
    assert f"No model change: production `{prod}` stands" in c["body"]
    others = {r["id"] for n in (7, 8) for r in story.releases(story.registry / f"pr-{n}")["releases"]}
    assert not any(o in c["body"] for o in others)
    commands = [p["argv"][1] for p in res.probes if p["argv"][0].endswith("/mlops") and len(p["argv"]) > 1]
    assert "plan" in commands and "train" not in commands and "eval" not in commands, commands


def test_superseded_pr_run_leaves_the_comment_alone(story: Story) -> None:
    """Defect 10: a run whose head is no longer the PR's head writes no comment."""
    before = comments(story, 9)
    payload = actkit.pr_event(story.repo, 9)
    story.act.set_pull_head(9, "f" * 40)  # a newer push landed meanwhile
    res = story.run("pr 9, superseded", "pull_request", payload, "pr-eval.yml")
    assert [c["method"] for c in res.calls] == ["GET"], res.calls  # looked, wrote nothing
    assert res.rc == 0, explain(res)
    assert comments(story, 9) == before
    actkit.git(story.repo, "checkout", "-q", "main")


def test_evals_only_pr_evaluates_production_under_its_gates(story: Story) -> None:
    """A PR that changes only the gates (or eval suites) is not "no model change": production is
    evaluated under the PR's gates, in the PR's own registry (production's only read), and reported."""
    actkit.git(story.repo, "checkout", "-qb", "pr-11", "main")
    before = production_files(story.registry)
    prod = story.releases()["production"]
    gates = yaml.safe_load((story.repo / "mlops.yaml").read_text())["gates"]
    gates[0]["min"] = 0.9  # a stricter bar than production's chrF (~0.18)
    actkit.commit(story.repo, "pr 11: a stricter chrF gate", config={"gates": gates})
    res = pr(story, "pr 11, gates only", 11)
    assert res.rc != 0 and "**Gate failed** (exit 3)" in res.summary, explain(res)
    [c] = comments(story, 11)
    assert "No model change" not in c["body"] and "**Verdict: FAIL**" in c["body"] and f"`{prod}`" in c["body"]
    assert "❌ `heldout.ragas.chrf_score mean` >= 0.9" in c["body"], c["body"][:1500]
    commands = [p["argv"][1] for p in res.probes if p["argv"][0].endswith("/mlops") and len(p["argv"]) > 1]
    assert "eval" in commands and "train" not in commands, commands
    assert production_files(story.registry) == before
    assert [r["id"] for r in story.releases(story.registry / "pr-11")["releases"]] == [prod]
    actkit.git(story.repo, "checkout", "-q", "main")


def test_sticky_comment_found_past_the_first_page(story: Story) -> None:
    """GitHub lists comments a page at a time (the stand-in too): on a PR with 105 comments the
    sticky one is the 106th, on page 2 at 100 a page; the next run updates it, never adds a second."""
    actkit.git(story.repo, "checkout", "-qb", "pr-12", "main")
    story.act.seed_comments(12, 105)
    actkit.commit(story.repo, "pr 12: docs", files={"docs/faq.md": "Questions.\n"})
    first = pr(story, "pr 12, push 1", 12)
    assert first.rc == 0, explain(first)
    sha2 = actkit.commit(story.repo, "pr 12: more docs", files={"docs/faq.md": "Questions, answers.\n"})
    second = pr(story, "pr 12, push 2", 12)
    assert second.rc == 0, explain(second)
    mine = [c for c in comments(story, 12) if c["body"].startswith(MARKER)]
    assert len(mine) == 1 and f"head {sha2}" in mine[0]["body"] and len(comments(story, 12)) == 106
    listed = [c["query"] for c in second.calls if c["method"] == "GET" and c["path"].endswith("/comments")]
    assert any("page=2" in q for q in listed), listed  # the lookup followed the Link header
    assert [c["method"] for c in second.calls if c["method"] != "GET"] == ["PATCH"], second.calls
    actkit.git(story.repo, "checkout", "-q", "main")


def test_the_stand_in_pages_like_github() -> None:
    """The stand-in's own contract: 30 a page by default, at most 100, a Link header to the next."""
    server = actkit.GitHubStandIn(
        {"comments": [{"id": i, "issue": 1, "body": str(i)} for i in range(75)], "pulls": {}, "issues": []}
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"{server.url}/repos/acme/tiny/issues/1/comments"
        r = httpx.get(url, timeout=10)
        assert [c["id"] for c in r.json()] == list(range(30)) and 'rel="next"' in r.headers["link"]
        nxt = r.headers["link"].split(">;")[0].lstrip("<")
        assert [c["id"] for c in httpx.get(nxt, timeout=10).json()] == list(range(30, 60))
        last = httpx.get(url, params={"per_page": 1000, "page": 1}, timeout=10)
        assert len(last.json()) == 75 and "link" not in last.headers  # 100 a page at most: one page
    finally:
        server.shutdown()
        server.server_close()


def test_fork_pr_gets_no_secrets_and_a_clear_verdict(story: Story) -> None:
    """Defects 5 and 6: a fork's code sees no secret, uses a local registry, and ends green or red
    for a reason (here: red, its model fails the absolute gate), never exit 4."""
    actkit.git(story.repo, "checkout", "-qb", "pr-10")
    actkit.commit(story.repo, "pr 10: fork, one step", config={"models": {"tiny": {"train": {"steps": 1}}}})
    before = production_files(story.registry)
    res = pr(story, "pr 10, fork", 10, fork=True, vars={"MLOPS_STORAGE": "s3://mlops-registry/prod"})
    assert res.rc != 0
    assert "**Gate failed** (exit 3)" in res.summary, explain(res)
    assert "`heldout.ragas.chrf_score mean` >= 0.05: mean" in res.summary and "Infrastructure" not in res.log
    assert "No production to compare with: a fork PR gets no credentials" in res.summary
    mlops_procs = [p for p in res.probes if p["argv"][0].endswith("/mlops")]
    assert mlops_procs and all(p["secrets"] == {} for p in res.probes), res.probes
    assert comments(story, 10) == [] and res.calls == []  # no write token, no comment job
    assert production_files(story.registry) == before
    actkit.git(story.repo, "checkout", "-q", "main")


def test_pr_credentials_are_scoped(story: Story) -> None:
    """Defect 5, the other half: a same-repository PR's code got the PR-scoped token, not production's."""
    res = story.results["pr 7, push 1"]
    tokens = {p["secrets"]["MODAL_TOKEN_ID"] for p in res.probes if "MODAL_TOKEN_ID" in p["secrets"]}
    assert tokens == {actkit.probe_hash(PR_SECRETS["MODAL_PR_TOKEN_ID"])}, tokens  # the PR's own, never production's
    wf = yaml.safe_load((actkit.ROOT / ".github/workflows/pr-eval.yml").read_text())
    text = (actkit.ROOT / ".github/workflows/pr-eval.yml").read_text()
    assert "secrets.MODAL_TOKEN_ID" not in text and "vars.AWS_ROLE_ARN" not in text
    assert wf["jobs"]["eval"]["environment"] == "mlops-pr"
    assert "pull-requests" not in wf["jobs"]["eval"]["permissions"]
    assert not any("checkout" in s.get("uses", "") for s in wf["jobs"]["comment"]["steps"])


def test_closed_pr_removes_its_registry(story: Story) -> None:
    """Issue 17, workflows 1: the cleanup job's token is the `mlops-pr` environment's, the subject the
    PR role trusts (without `environment:` it was repo:O/R:pull_request: refused, pr-N kept, red)."""
    assert (story.registry / "pr-7").is_dir()
    payload = actkit.pr_event(story.repo, 7, action="closed")
    res = story.run("pr 7, closed", "pull_request", payload, "pr-eval.yml")
    asked = [(x["job"], x["environment"], x["aud"]) for x in res.tokens if x["kind"] == "token"]
    assert asked == [("cleanup", "mlops-pr", "sts.amazonaws.com")], res.tokens
    [sts] = [x for x in res.tokens if x["kind"] == "sts"]
    assert sts["role"] == actkit.ROLE_ARNS["AWS_PR_ROLE_ARN"] and sts["allowed"], res.tokens
    assert res.rc == 0, explain(res)
    assert not (story.registry / "pr-7").exists() and story.releases()["production"]


def test_dependabot_pr_gets_a_read_only_report(story: Story) -> None:
    """Issue 17, workflows 3: Dependabot's same-repository PR (no secrets, a read-only token) runs as a
    fork's: the local backend even with MLOPS_BACKEND=modal, the job summary saying why, no comment
    job (its write would be a 403), no AWS role, no exit 1."""
    actkit.git(story.repo, "checkout", "-qb", "pr-13", "main")
    actkit.commit(story.repo, "pr 13: bump a docs dependency", files={"docs/deps.md": "bumped\n"})
    before = production_files(story.registry)
    res = pr(story, "pr 13, dependabot", 13, actor="dependabot[bot]", vars=story.vars | {"MLOPS_BACKEND": "modal"})
    assert res.rc == 0, explain(res)
    assert "a Dependabot PR gets a read-only token and no secrets" in res.summary, res.summary[:1000]
    assert res.calls == [] and comments(story, 13) == [] and res.tokens == [], (res.calls, res.tokens)
    assert all(p["secrets"] == {} for p in res.probes), res.probes
    assert production_files(story.registry) == before
    actkit.git(story.repo, "checkout", "-q", "main")


# ---------------------------------------------------------------------------- rollback and nightly


def test_rollback_to_an_unknown_release_goes_red(story: Story) -> None:
    """Defect 1: `mlops rollback | tee` under pipefail."""
    prod = story.releases()["production"]
    payload = actkit.dispatch_event({"release": "tiny-no-such-release", "reason": "drill"})
    res = story.run("rollback, unknown release", "workflow_dispatch", payload, "rollback.yml")
    assert res.rc != 0 and res.step_ok("mlops rollback") is False, explain(res)
    assert story.releases()["production"] == prod


def test_rollback_with_no_previous_release_goes_red(story: Story, tmp_path: Path) -> None:
    empty = tmp_path / "empty-registry"
    payload = actkit.dispatch_event({"release": "", "reason": "drill"})
    res = story.run(
        "rollback, nothing to go back to",
        "workflow_dispatch",
        payload,
        "rollback.yml",
        vars={"MLOPS_STORAGE": str(empty)},
    )
    assert res.rc != 0 and res.step_ok("mlops rollback") is False, explain(res)


def test_rollback_records_actor_and_reason(story: Story) -> None:
    """A re-run (issue 17, workflows 6): GITHUB_ACTOR stays the first run's, the triggering actor
    (who re-ran it) is recorded."""
    rel = story.releases()
    prod, previous = rel["production"], rel["previous"]
    payload = actkit.dispatch_event({"release": "", "reason": "p95 regression seen by on-call"})
    rerun = {"GITHUB_TRIGGERING_ACTOR": "oncall-bo"}
    res = story.run("rollback", "workflow_dispatch", payload, "rollback.yml", actor="oncall-ana", env=rerun)
    assert res.rc == 0, explain(res)
    assert story.releases()["production"] == previous != prod
    [ev] = [e for e in story.history(previous) if e["event"] == "rolled_back_to"]
    assert ev["by"] == "github:oncall-bo" and "p95 regression seen by on-call" in json.dumps(ev["detail"])
    assert "Rollback by @oncall-bo" in res.summary


def test_rollback_has_its_own_concurrency() -> None:
    """Defect 9: a rollback neither waits behind training nor is cancelled by a push; issue 17: nor
    by another rollback (GitHub keeps one pending run per group, a newer one cancels it): one group
    per run."""
    groups = {}
    for name in ("ct.yml", "rollback.yml", "nightly.yml"):
        wf = yaml.safe_load((actkit.ROOT / ".github/workflows" / name).read_text())
        groups[name] = wf["concurrency"]
    assert groups["rollback.yml"]["group"] != groups["ct.yml"]["group"]
    assert "${{ github.run_id }}" in groups["rollback.yml"]["group"], groups["rollback.yml"]
    assert groups["rollback.yml"]["cancel-in-progress"] is False
    assert groups["ct.yml"]["cancel-in-progress"] is False


def serve_traffic(story: Story, inputs: list[str]) -> None:
    """Production traffic: `mlops serve` on the shared registry (capture on, as shipped) answers each
    input as the example's prompt; stopped with SIGTERM, so its capture is flushed to the registry."""
    before = captured(story)
    with mlops_serve(story.repo, "--set", f"storage={story.registry}") as url, httpx.Client(timeout=60) as c:
        for x in inputs:
            r = c.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": f"{x}=", "max_tokens": 16})
            assert r.status_code == 200, r.text
    assert captured(story) == before + len(inputs)  # all flushed to the shared registry at SIGTERM


def captured(story: Story) -> int:
    """Requests captured in the shared registry (what `mlops monitor` reads)."""
    files = (story.registry / "monitor" / "capture").rglob("*.jsonl")
    return sum(len(f.read_text().splitlines()) for f in files)


def drift_writes(res: actkit.ActResult) -> list[tuple[str, str]]:
    return [(c["method"], c["path"]) for c in res.calls if c["method"] != "GET"]


def test_nightly_goes_red_when_production_breaks_an_absolute_gate(story: Story) -> None:
    """Defect 7: production re-evaluated below an absolute gate: red, not a green job with FAIL inside.
    Issue 10, the quiet half: production answered the example's kind of inputs, nothing is opened."""
    # This 40-step model answers 1-2 characters; against its 20 eval outputs the output-length PSI
    # reads ~0.4 even for the example's own inputs: reported, not judged, here (input drift is the story)
    actkit.commit(story.repo, "monitor: output length reported only", config=QUIET_OUTPUT_LENGTH)
    serve_traffic(story, example_inputs(120, seed=1))
    ok = story.run("nightly", "workflow_dispatch", actkit.dispatch_event({}), "nightly.yml")
    assert ok.rc == 0, explain(ok)
    assert ok.step_ok("Monitor traffic") and "no drift in the last 24 h" in ok.log, explain(ok)
    assert drift_writes(ok) == [] and ok.state["issues"] == [] and ok.state["dispatches"] == []
    gates = yaml.safe_load((story.repo / "mlops.yaml").read_text())["gates"]
    gates[0]["min"] = 0.9  # the bar moves above what production scores (~0.18)
    actkit.commit(story.repo, "raise the bar", config={"gates": gates})
    res = story.run("nightly, gate broken", "workflow_dispatch", actkit.dispatch_event({}), "nightly.yml")
    assert res.rc != 0
    assert "**Production fails a gate** (exit 3)" in res.summary, explain(res)
    assert "❌ `heldout.ragas.chrf_score mean` >= 0.9" in res.summary
    # production's eval results and report, and the monitor's (no drift) report, as artifacts
    art = uploaded(res, "mlops-nightly")
    assert sorted(art) == ["drift.json", "drift.md", "nightly.json", "report.md"], sorted(art)
    assert "❌ `heldout.ragas.chrf_score mean` >= 0.9" in art["report.md"].decode()
    assert json.loads(art["drift.json"])["drifted"] == [] and json.loads(art["nightly.json"])


def test_nightly_on_drift_opens_one_issue_and_dispatches_ct(story: Story) -> None:
    """Issue 10, the loop: production answered longer, differently distributed strings; the nightly
    run opens one issue with the monitor's markdown report and dispatches ct.yml with the drift
    report (`monitor.on_drift: retrain`); the next nightly updates that issue, opens no second one;
    ct.yml run with the dispatched input records the report in the new release's lineage."""
    actkit.commit(story.repo, "gates back, retrain on drift", config={"gates": actkit.FAST["gates"]})
    actkit.commit(story.repo, "retrain on drift", config={"monitor": {"on_drift": "retrain"}})
    serve_traffic(story, shifted_inputs(120, seed=2))
    prod = story.releases()["production"]
    first = story.run("nightly, drift", "workflow_dispatch", actkit.dispatch_event({}), "nightly.yml")
    assert first.rc == 0, explain(first)
    [issue] = first.state["issues"]
    assert issue["body"].startswith(DRIFT_MARKER) and "prompt_length_psi" in issue["body"], issue
    assert "prompt_length_psi" in issue["title"] and "/actions/runs/" in issue["body"]
    [dispatch] = first.state["dispatches"]
    assert dispatch["workflow"] == "ct.yml" and dispatch["ref"] == "main"
    report = json.loads(dispatch["inputs"]["drift_report"])  # what ct.yml hands `mlops run`
    assert report["release"] == prod and "prompt_length_psi" in report["drifted"] and report["requests"] >= 240
    assert {c["name"] for c in report["checks"] if c["drifted"]} == set(report["drifted"])
    assert sorted(drift_writes(first)) == [  # the issue and retrain jobs may run in either order
        ("POST", "/repos/acme/tiny/actions/workflows/ct.yml/dispatches"),
        ("POST", "/repos/acme/tiny/issues"),
    ]
    assert all(c["auth"] for c in first.calls)
    art = uploaded(first, "mlops-nightly")
    assert json.loads(art["drift.json"])["drifted"] == report["drifted"]
    assert issue["body"].startswith(art["drift.md"].decode().rstrip())  # one monitor run, both reports

    second = story.run("nightly, drift again", "workflow_dispatch", actkit.dispatch_event({}), "nightly.yml")
    assert second.rc == 0, explain(second)
    [again] = second.state["issues"]
    assert again["number"] == issue["number"] and again["body"].startswith(DRIFT_MARKER)
    assert again["body"] != issue["body"]  # this run's report and run link
    assert ("PATCH", f"/repos/acme/tiny/issues/{issue['number']}") in drift_writes(second)
    assert len(second.state["dispatches"]) == 2
    # Issue 17, workflows 2: on GitHub a push queued after the dispatch cancels it while it waits behind
    # a training (one pending run per group). So here the dispatch never runs; the next push, which
    # changes nothing a model is trained from, picks the request up from the registry: it retrains
    # with MLOPS_DRIFT_REPORT, the new release's lineage says why, and the request is done.
    request = story.registry / "monitor" / "retrain-request.json"
    assert (
        json.loads(request.read_text())["drifted"]
        == json.loads(second.state["dispatches"][1]["inputs"]["drift_report"])["drifted"]
    )
    ct = story.push("push after a cancelled drift dispatch", files={"NOTES.md": "drift seen\n"})
    assert ct.rc == 0 and ct.step_ok("Drift report"), explain(ct)
    assert "picked up the retrain request" in ct.log, explain(ct)
    new = story.releases()["releases"][0]["id"]
    assert new != prod
    lineage = json.loads((story.registry / "releases" / new / "manifest.json").read_text())["lineage"]
    trigger = lineage["drift_trigger"]
    assert trigger["release"] == prod and "prompt_length_psi" in {d["name"] for d in trigger["drifted"]}, trigger
    assert not request.exists()  # retrained: the next run does not retrain again


def test_every_role_was_assumed_under_the_readme_trust_policy(story: Story) -> None:
    """Issue 17, workflows 1: each token a job asked for carried the audience STS expects and the
    subject of the environment its role trusts, and STS (the stand-in, applying the README's trust
    policies) granted every one; the role-assuming workflows all asked."""
    tokens = {name: r.tokens for name, r in story.results.items()}
    asked = {name for name, ts in tokens.items() if any(x["kind"] == "sts" for x in ts)}
    assert {"first push", "pr 7, push 1", "pr 7, closed", "rollback", "nightly"} <= asked, sorted(asked)
    refused = [(n, x) for n, ts in tokens.items() for x in ts if x["kind"] == "sts" and not x["allowed"]]
    assert refused == []
    for ts in tokens.values():
        for x in ts:
            assert x["aud"] == "sts.amazonaws.com" and x["sub"].startswith("repo:acme/tiny:environment:mlops"), x


# ---------------------------------------------------------------------------- several deployed models


def two_models_repo(dest: Path) -> Path:
    """The act project with two deployed models, `a` and `b` (the fast tiny model, two seeds)."""
    repo = actkit.make_repo(dest)
    cfg = yaml.safe_load((repo / "mlops.yaml").read_text())
    tiny = cfg["models"].pop("tiny")
    cfg["models"] = {"a": tiny, "b": actkit.deep_merge(tiny, {"train": {"seed": 1}})}
    cfg["deploy"].pop("model")
    cfg["deploy"]["models"] = {"a": {}, "b": {}}
    (repo / "mlops.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    actkit.commit(repo, "two deployed models")
    return repo


def test_a_drift_of_one_model_retrains_and_rolls_out_that_model_only(story: Story) -> None:
    """Issue 18.1, several models under act: the nightly found `a`'s traffic drifted and left its
    retrain request (naming `a`) in the registry; the next push, which changes nothing a model is
    trained from, runs ct.yml: `mlops run --force-model a` retrains `a` and rolls it out through a
    canary, `b` is unchanged (its releases, stages and routing as they were), the report has a
    section per model, only `a`'s lineage records the drift, and the request is done."""
    from test_retrain_request import two_models_report

    from mlops.monitor import retrain
    from mlops.registry.releases import STATE_KEY, Registry
    from mlops.registry.store import LocalStore

    repo, registry = two_models_repo(story.root / "two"), story.root / "two-registry"
    first = mlops("run", "--json", "--set", f"storage={registry}", cwd=repo)  # both to production
    assert first.returncode == 0, first.stderr[-3000:]
    a1, b1 = (json.loads(first.stdout)["models"][m]["release"] for m in ("a", "b"))
    keys = ("stages", "routing", "shadow", "rollout")

    def model_state(m: str) -> dict[str, Any]:
        return {k: json.loads((registry / STATE_KEY).read_text())["models"][m][k] for k in keys}

    b_before = model_state("b")
    assert b_before["stages"]["production"] == b1 and b_before["routing"] == {b1: 100}
    b_releases = sorted(p.name for p in (registry / "releases").iterdir() if p.name.startswith("b-"))
    # what the nightly's monitor step writes for two models, `a` drifted (the cut of a real two-model
    # report is checked in tests/test_models_ops.py)
    retrain.put(LocalStore(registry), json.dumps(two_models_report("a", a1, "prompt_length_psi")).encode())

    actkit.commit(repo, "notes", files={"NOTES.md": "drift seen on a\n"})
    vars = {"MLOPS_STORAGE": str(registry)} | actkit.ROLE_ARNS
    res = story.act.run(repo, "push", actkit.push_event(repo), "ct.yml", vars=vars, secrets=PROD_SECRETS)
    story.results["two models, a drifted"] = res
    assert res.rc == 0, explain(res)
    assert "picked up the retrain request" in res.log and "mlops run --force-model a" in res.log, explain(res)
    run = json.loads(uploaded(res, "mlops-run")["run.json"])["models"]
    assert (run["a"]["status"], run["b"]["status"], run["b"]["release"]) == ("promoted", "unchanged", b1), run
    a2 = run["a"]["release"]
    state = json.loads((registry / STATE_KEY).read_text())["models"]
    assert a2 != a1 and state["a"]["stages"]["production"] == a2 and state["a"]["stages"]["previous"] == a1
    events = [e["event"] for e in Registry(LocalStore(registry)).history(a2)]
    assert events.count("canary_step") == 2 and "promoted" in events, events  # [50, 100], a real canary
    lineage = json.loads((registry / "releases" / a2 / "manifest.json").read_text())["lineage"]
    assert lineage["drift_trigger"]["release"] == a1, lineage["drift_trigger"]
    assert [d["name"] for d in lineage["drift_trigger"]["drifted"]] == ["prompt_length_psi"]
    # b: untouched
    assert model_state("b") == b_before
    assert sorted(p.name for p in (registry / "releases").iterdir() if p.name.startswith("b-")) == b_releases
    assert not (registry / "monitor" / "retrain-request.json").exists()  # retrained: done
    report = uploaded(res, "mlops-run")["report.md"].decode()
    assert "## Model `a`" in report and f"`{a2}`" in report and "## Model `b`" in report and f"`{b1}`" in report
