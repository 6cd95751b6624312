"""mlops.yaml: every malformed config gets one line naming file and line, exit 1, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, mlops

from mlops.config import apply_overrides, load
from mlops.errors import ConfigError

GOOD = (REPO / "mlops.yaml").read_text()


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)

# (name, config text, expected fragment of the message, the line the message must name)
CASES = [
    ("broken yaml", edit("project: tiny-reverse", "project: [tiny-reverse"), "invalid YAML", None),
    (
        "tab indentation",
        edit("  train: {path: data/train.jsonl}", "\ttrain: {path: data/train.jsonl}"),
        "invalid YAML",
        None,
    ),
    (
        "unknown top-level key",
        edit("backend: local", "backend: local\nbackedn: local"),
        "unknown key 'backedn'",
        "backedn:",
    ),
    ("unknown nested key", edit("lr: 3.0e-3", "lrr: 3.0e-3"), "did you mean 'lr'", "lrr:"),
    ("unknown deep key", edit("rollout: {steps", "rollout: {stpes: [10], steps"), "unknown key 'stpes'", "stpes"),
    (
        "unknown gate key",
        edit("metric: latency, stat: p95", "metric: latency, stats: p95"),
        "did you mean 'stat'",
        "stats: p95",
    ),
    (
        "wrong type number",
        edit("lr: 3.0e-3", "lr: fast"),
        "models.tiny.train.lr: Input should be a valid number",
        "lr: fast",
    ),
    ("wrong type int", edit("steps: 500", "steps: many"), "models.tiny.train.steps", "steps: many"),
    ("negative steps", edit("steps: 500", "steps: -5"), "greater than or equal to 1", "steps: -5"),
    (
        "train key typo (issue 12)",
        edit("warmup_steps: 30}", "warmup_steps: 30, precison: bf16}"),
        "unknown key 'precison' (did you mean 'precision'?",
        "precison",
    ),
    (
        "bad precision",
        edit("warmup_steps: 30}", "warmup_steps: 30, precision: fp8}"),
        "models.tiny.train.precision: Input should be 'bf16', 'fp16' or 'fp32'",
        "fp8",
    ),
    (
        "bad checkpoint_every",
        edit("warmup_steps: 30}", "warmup_steps: 30, checkpoint_every: 10 minutes}"),
        "expected a number of steps (e.g. 200) or a duration (e.g. 10m, 30s, 1h)",
        "checkpoint_every",
    ),
    (
        "method typo (qlora)",
        edit("method: full", "method: qlor"),
        "models.tiny.method: Input should be 'full', 'lora' or 'qlora'",
        "method: qlor",
    ),
    ("bad enum", edit("method: full", "method: half"), "models.tiny.method", "method: half"),
    (
        "unknown backend",
        edit("backend: local", "backend: modle"),
        "unknown backend 'modle' (did you mean 'modal'?",
        "backend: modle",
    ),
    (
        "unknown metric",
        edit("metrics: [exact_match, ragas.chrf_score, latency]", "metrics: [exact_matsh, ragas.chrf_score, latency]"),
        "did you mean 'exact_match'",
        "exact_matsh",
    ),
    (
        "dangling dataset",
        edit("    dataset: train\n", "    dataset: trian\n"),
        "unknown dataset 'trian' (did you mean 'train'?",
        "dataset: trian",
    ),
    (
        "dangling eval in gate",
        edit("- {eval: heldout, metric: exact_match, min", "- {eval: heldoot, metric: exact_match, min"),
        "unknown eval 'heldoot'",
        "heldoot",
    ),
    (
        "gate metric not in suite",
        edit("metric: exact_match, min: 0.5", "metric: bleu, min: 0.5"),
        "has no metric 'bleu'",
        "bleu",
    ),
    ("dangling deploy model", edit("  model: tiny\n", "  model: tinny\n"), "unknown model 'tinny'", "model: tinny"),
    ("missing dataset file", edit("path: data/train.jsonl", "path: data/nope.jsonl"), "does not exist", "nope.jsonl"),
    ("missing required key", edit("project: tiny-reverse\n", ""), "project: required key is missing", None),
    (
        "python tag",
        edit("project: tiny-reverse", "project: !!python/object/apply:os.system [echo pwned]"),
        "constructor",
        "python/object",
    ),
    ("alias bomb", GOOD + BOMB, "alias bomb", None),
    ("duplicate key", edit("backend: local", "backend: local\nbackend: modal"), "duplicate key", "backend: modal"),
    (
        "unset env var",
        edit("storage: .mlops", "storage: ${MLOPS_TEST_UNSET_VAR}"),
        "MLOPS_TEST_UNSET_VAR is not set",
        "MLOPS_TEST_UNSET_VAR",
    ),
    ("top level not a mapping", "- just\n- a list\n", "must be a mapping", None),
    (
        "rollout steps not ending at 100",
        edit("steps: [10, 50, 100]", "steps: [10, 50]"),
        "end at 100",
        "steps: [10, 50]",
    ),
    (
        "gate without bound",
        edit(
            "- {eval: heldout, metric: latency, stat: p95, max: 2.0}", "- {eval: heldout, metric: latency, stat: p95}"
        ),
        "at least one of",
        "stat: p95}",
    ),
    (
        "judge with both an endpoint and a model to serve",
        GOOD + "judges:\n  ref: {model: r, base_url: 'http://127.0.0.1:9/v1', source: ./judge}\n",
        "exactly one of base_url (an endpoint) or source (a model to serve)",
        "ref: {",
    ),
    (
        "more warm containers than allowed",
        edit("min_containers: 0, max_containers: 4", "min_containers: 5, max_containers: 2"),
        "min_containers (5) cannot be greater than max_containers (2)",
        "resources: {gpu: L4, min_containers: 5",
    ),
    (
        "local base directory missing",
        edit("base: scratch", "base: ./bases/nowhere"),
        "local base directory './bases/nowhere' does not exist",
        "base: ./bases/nowhere",
    ),
    (
        "entrypoint file missing",
        edit("    train: {", "    train: {entrypoint: 'train/mine.py:build', "),
        "file 'train/mine.py' does not exist",
        "entrypoint",
    ),
    ("judge with neither", GOOD + "judges:\n  ref: {model: r}\n", "exactly one of base_url", "ref: {"),
    (
        "self-hosted judge on the local backend",
        GOOD + "judges:\n  ref: {model: r, source: ./judge, gpu: L4}\n",
        "a self-hosted judge is served on backend: modal (backend is 'local')",
        "ref: {",
    ),
]


@pytest.mark.parametrize(("name", "text", "fragment", "line_needle"), CASES, ids=[c[0] for c in CASES])
def test_malformed_config_one_line_error(
    tmp_path: Path, name: str, text: str, fragment: str, line_needle: str | None
) -> None:
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "evals").symlink_to(REPO / "evals")
    (tmp_path / "mlops.yaml").write_text(text)
    r = mlops("validate", cwd=tmp_path, timeout=60)
    assert r.returncode == 1, (name, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "\n" not in err, f"not one line: {err!r}"
    assert "Traceback" not in r.stderr + r.stdout
    assert err.startswith("error: mlops.yaml:"), err
    assert fragment in err, err
    if line_needle is not None:
        assert f"mlops.yaml:{line_of(text, line_needle)}:" in err, err


def test_shipped_config_is_valid_and_schema_matches(tmp_path: Path) -> None:
    r = mlops("validate", "--json", cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["project"] == "tiny-reverse"
    schema = mlops("schema", cwd=REPO, timeout=60)
    assert json.loads(schema.stdout) == json.loads((REPO / "mlops.schema.json").read_text()), (
        "regenerate: mlops schema > mlops.schema.json"
    )
    assert GOOD.splitlines()[0] == "# yaml-language-server: $schema=./mlops.schema.json"


def test_a_shadow_step_is_valid_on_modal_too(tmp_path: Path) -> None:
    """The Modal gateway mirrors a shadow step's share (issue 19): validate no longer refuses it."""
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "evals").symlink_to(REPO / "evals")
    text = edit("backend: local", "backend: modal").replace(
        "requests_per_step: 40,", "requests_per_step: 40, shadow: 0.5,"
    )
    (tmp_path / "mlops.yaml").write_text(text)
    r = mlops("validate", "--json", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "mlops.yaml").cfg.deploy.rollout.shadow == 0.5


def test_overrides_apply_before_validation_and_errors_name_the_flag() -> None:
    loaded = load(REPO / "mlops.yaml", ["models.tiny.train.steps=1", "deploy.rollout.steps=[50, 100]"])
    assert loaded.cfg.models["tiny"].train.steps == 1
    assert loaded.cfg.deploy.rollout.steps == [50, 100]
    with pytest.raises(
        ConfigError, match=r"^--set models.tiny.train.lr: models.tiny.train.lr: Input should be a valid number"
    ):
        load(REPO / "mlops.yaml", ["models.tiny.train.lr=abc"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"])
    # a list item by bracket or by dot, and the errors about one stay one line
    assert load(REPO / "mlops.yaml", ["gates[0].min=0.25"]).cfg.gates[0].min == 0.25
    assert load(REPO / "mlops.yaml", ["gates.0.min=0.3"]).cfg.gates[0].min == 0.3
    with pytest.raises(ConfigError, match=r"^--set gates.0.x: gates.0.x: unknown key 'x'"):
        load(REPO / "mlops.yaml", ["gates[0].x=1"])
    with pytest.raises(ConfigError, match=r"^--set gates.99.min: index 99 is out of range \(the list has \d+ items\)$"):
        load(REPO / "mlops.yaml", ["gates[99].min=1"])


def test_env_vars_expand_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "evals").symlink_to(REPO / "evals")
    monkeypatch.setenv("MLOPS_TEST_STORE", "s3://bucket/prefix")
    (tmp_path / "mlops.yaml").write_text(
        edit("storage: .mlops", "storage: ${MLOPS_TEST_STORE}\nbackend: ${MLOPS_TEST_BACKEND:-local}").replace(
            "backend: local                     # local | modal\n", ""
        )
    )
    loaded = load(tmp_path / "mlops.yaml")
    assert loaded.cfg.storage == "s3://bucket/prefix"
    assert loaded.cfg.backend == "local"


def test_secret_values_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judges name the env var holding a key; the value is read at call time and never stored."""
    cfg = yaml.safe_load(GOOD)
    cfg["judges"] = {
        "local": {"base_url": "http://127.0.0.1:9/v1", "model": "judge", "api_key_env": "MLOPS_TEST_SECRET"}
    }
    monkeypatch.setenv("MLOPS_TEST_SECRET", "sk-planted-secret-value")
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "evals").symlink_to(REPO / "evals")
    (tmp_path / "mlops.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load(tmp_path / "mlops.yaml")
    dumped = json.dumps(loaded.cfg.model_dump(mode="json")) + json.dumps(loaded.raw)
    assert "MLOPS_TEST_SECRET" in dumped and "sk-planted-secret-value" not in dumped


def test_lora_target_modules_accepts_one_name_as_a_string() -> None:
    """peft's own spelling `target_modules: all-linear` (a string) means the one-item list."""
    one = load(REPO / "mlops.yaml", ["models.tiny.lora.target_modules=all-linear"])
    listed = load(REPO / "mlops.yaml", ["models.tiny.lora.target_modules=[all-linear]"])
    assert one.cfg.models["tiny"].lora.target_modules == ["all-linear"]
    assert one.cfg.models["tiny"].model_dump() == listed.cfg.models["tiny"].model_dump()
    with pytest.raises(ConfigError, match="target_modules"):
        load(REPO / "mlops.yaml", ["models.tiny.lora.target_modules=3"])
