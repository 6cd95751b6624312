"""JudgeClient against a real judge server: a Starlette app served by uvicorn on 127.0.0.1.

The server speaks OpenAI chat completions. It answers deepeval's judge prompts (G-Eval steps and
scores, answer-relevancy statements, verdicts and reasons) with the JSON deepeval expects, scoring
by comparing the texts in the prompt, and anything else with an echo. Tests switch on faults:
prompts containing HANG never get an answer (until teardown), `throttle` answers 429/503 with a
Retry-After the first time each prompt is seen, `status` answers every request with that status.
"""

from __future__ import annotations

from mlops.env import set_offline

set_offline()

import ast  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from email.utils import formatdate  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
from conftest import InThreadServer  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402
from starlette.routing import Route  # noqa: E402

from mlops.evals.judges import JudgeClient, JudgeError, JudgeSpec, _retry_after_s, run_sync  # noqa: E402

try:
    from rag_judge import rag_answer  # noqa: E402
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.rag_judge import rag_answer  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the judge server


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    if i < 0:
        return ""
    i += len(start)
    j = text.find(end, i)
    return text[i : j if j >= 0 else len(text)].strip()


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


def judge_answer(prompt: str, nth: int) -> str:
    """What a sensible judge would answer to one of deepeval's prompts (nth: how often seen)."""
    rag = rag_answer(prompt)  # RAG, safety and relevancy prompts of deepeval and ragas
    if rag is not None:
        return rag
    if "concise evaluation steps" in prompt:  # G-Eval: steps from the criteria
        return json.dumps({"steps": ["Compare the actual output with the expected output."]})
    if prompt.startswith("You are an evaluator"):  # G-Eval: score a test case, 0..10
        actual = _between(prompt, "Actual Output:\n", "\n\n")
        expected = _between(prompt, "Expected Output:\n", "\n\n")
        if "NOISY" in actual:  # a noisy judge: 2, 9, 8, 2, 9, 8, ... for the same prompt
            score = (2, 9, 8)[nth % 3]
        else:
            score = 10 if actual and actual == expected else 0
        if "BADJSON" in actual:
            return "I refuse to answer in JSON."
        return json.dumps({"reason": f"actual {'matches' if score else 'differs from'} expected", "score": score})
    if "generate a list of statements" in prompt:  # answer relevancy: split the output
        text = _between(prompt, "Text:\n", "\n\nJSON:")
        return json.dumps({"statements": [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]})
    if "whether each statement is relevant" in prompt:  # answer relevancy: one verdict per statement
        question = _words(_between(prompt, "Input:\n", "\n\nStatements:"))
        statements = ast.literal_eval(_between(prompt, "Statements:\n", "\n\nJSON:") or "[]")
        verdicts = [
            {"verdict": "yes"} if _words(s) & question else {"verdict": "no", "reason": "off topic"} for s in statements
        ]
        return json.dumps({"verdicts": verdicts})
    if "answer relevancy score" in prompt:
        return json.dumps({"reason": "The score is what it is."})
    return f"echo: {prompt}"


class JudgeServer(InThreadServer):
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # prompt -> requests seen
        self.auth: list[str | None] = []
        self.proxy: list[tuple[str | None, str | None]] = []  # Modal-Key / Modal-Secret seen
        self.throttle: tuple[int, str] | None = None  # (status, Retry-After) for each prompt's first request
        self.status: int | None = None  # answer everything with this status
        self.echo_auth = False  # error bodies quote the Authorization header (as some APIs do)
        self.lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/health", lambda r: JSONResponse({"ok": True})),
            ]
        )
        super().__init__(app)
        self.base_url = f"{self.url}/v1"

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.auth.clear()
            self.proxy.clear()
        self.throttle = None
        self.status = None
        self.echo_auth = False

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        auth = request.headers.get("authorization")
        with self.lock:
            nth = self.requests[prompt]
            self.requests[prompt] += 1
            self.auth.append(auth)
            self.proxy.append((request.headers.get("modal-key"), request.headers.get("modal-secret")))
        if self.status is not None:
            detail = f"rejected; header was {auth}" if self.echo_auth else "rejected"
            return JSONResponse({"error": {"message": detail}}, status_code=self.status)
        if self.throttle is not None and nth == 0:
            status, retry_after = self.throttle
            return JSONResponse(
                {"error": {"message": "slow down"}}, status_code=status, headers={"Retry-After": retry_after}
            )
        if "HANG" in prompt:
            deadline = time.monotonic() + 60
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return JSONResponse({"error": "released"}, status_code=500)
        if "NOTJSON" in prompt:
            return Response("<html>proxy error</html>", media_type="text/html")
        content = judge_answer(prompt, nth)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())},
            }
        )

    def start(self) -> None:
        super().start()
        assert httpx.get(f"{self.url}/health", timeout=5).json() == {"ok": True}


@pytest.fixture(scope="module")
def judge_server() -> Iterator[JudgeServer]:
    yield from JudgeServer().running()


@pytest.fixture
def server(judge_server: JudgeServer) -> JudgeServer:
    judge_server.reset()
    return judge_server


def spec(srv: JudgeServer, **kw: Any) -> JudgeSpec:
    return JudgeSpec(base_url=srv.base_url, model="judge-1", **kw)


def msgs(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def _gather(client: JudgeClient, prompts: list[str]) -> list[str | BaseException]:
    try:
        return list(await asyncio.gather(*(client.complete(msgs(p)) for p in prompts), return_exceptions=True))
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------
# the spec


def test_spec_defaults_and_forbids_unknown_keys() -> None:
    s = JudgeSpec(base_url="http://127.0.0.1:9/v1/", model="m")
    assert (
        s.base_url,
        s.api_key_env,
        s.timeout_s,
        s.max_retries,
        s.concurrency,
        s.repeat,
        s.temperature,
    ) == (
        "http://127.0.0.1:9/v1",
        None,
        30,
        3,
        4,
        1,
        0.0,
    )
    with pytest.raises(ValidationError, match="api_key"):
        JudgeSpec(base_url="http://127.0.0.1:9/v1", model="m", api_key="sk-nope")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        JudgeSpec(base_url="http://127.0.0.1:9/v1", model="m", concurrency=0)
    with pytest.raises(ValidationError):
        JudgeSpec(base_url="127.0.0.1:8000", model="m")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1.0),
        ("0.2", 0.2),
        (" 3 ", 3.0),
        ("-5", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_retry_after_parsing(value: str | None, expected: float | None) -> None:
    assert _retry_after_s(value) == expected


def test_retry_after_http_date() -> None:
    secs = _retry_after_s(formatdate(time.time() + 30, usegmt=True))
    assert secs is not None and 25 < secs <= 30


# ---------------------------------------------------------------------------------------------
# (a) a hanging call ends at the timeout and fails only its own case


def test_one_hanging_case_fails_alone_within_the_timeout(server: JudgeServer) -> None:
    client = JudgeClient(spec(server, timeout_s=1, max_retries=0))
    prompts = [f"case {i}" + (" HANG" if i == 17 else "") for i in range(50)]
    t0 = time.monotonic()
    results = asyncio.run(_gather(client, prompts))
    elapsed = time.monotonic() - t0
    assert elapsed < 1 + 1, f"batch took {elapsed:.2f}s"
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [17]
    err = results[17]
    assert isinstance(err, JudgeError) and err.kind == "timeout" and "timeout" in err.reason
    assert all(results[i] == f"echo: case {i}" for i in range(50) if i != 17)
    assert (client.calls, client.failures, client.cache_hits) == (50, 1, 0)


# ---------------------------------------------------------------------------------------------
# (b) 429 / 503 with Retry-After: retried after really waiting, nothing lost


@pytest.mark.parametrize("status", [429, 503])
def test_throttled_requests_are_retried_after_retry_after(server: JudgeServer, status: int) -> None:
    server.throttle = (status, "0.2")
    client = JudgeClient(spec(server, max_retries=2, timeout_s=5, concurrency=8))
    prompts = [f"case {i}" for i in range(20)]
    t0 = time.monotonic()
    results = asyncio.run(_gather(client, prompts))
    elapsed = time.monotonic() - t0
    assert results == [f"echo: {p}" for p in prompts]
    assert all(server.requests[p] == 2 for p in prompts)  # the server saw each case twice
    assert elapsed >= 0.2  # the client waited as told before retrying
    assert (client.calls, client.retries, client.failures) == (40, 20, 0)


def test_integer_retry_after_is_honoured(server: JudgeServer) -> None:
    server.throttle = (429, "1")
    client = JudgeClient(spec(server, max_retries=1, timeout_s=5))
    t0 = time.monotonic()
    assert asyncio.run(_gather(client, ["only"])) == ["echo: only"]
    assert time.monotonic() - t0 >= 0.95
    assert server.requests["only"] == 2


def test_retry_after_wait_is_capped_at_the_timeout(server: JudgeServer) -> None:
    server.throttle = (429, "3600")
    client = JudgeClient(spec(server, max_retries=1, timeout_s=0.3))
    t0 = time.monotonic()
    assert asyncio.run(_gather(client, ["capped"])) == ["echo: capped"]
    assert time.monotonic() - t0 < 2


def test_retries_are_bounded_and_errors_are_reasons(server: JudgeServer) -> None:
    server.status = 500
    client = JudgeClient(spec(server, max_retries=2, timeout_s=5))
    (err,) = asyncio.run(_gather(client, ["boom"]))
    assert isinstance(err, JudgeError) and err.kind == "http"
    assert err.reason.startswith("http 500") and "after 3 attempts" in err.reason
    assert server.requests["boom"] == 3 and client.failures == 1

    server.reset()
    server.status = 400  # not transient: no retry
    (err,) = asyncio.run(_gather(client, ["bad request"]))
    assert isinstance(err, JudgeError) and err.reason.startswith("http 400")
    assert server.requests["bad request"] == 1

    server.reset()
    (err,) = asyncio.run(_gather(client, ["NOTJSON"]))
    assert isinstance(err, JudgeError) and err.kind == "bad_response"


def test_connection_refused_is_a_judge_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = JudgeClient(JudgeSpec(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0))
    (err,) = asyncio.run(_gather(client, ["x"]))
    assert isinstance(err, JudgeError) and err.kind == "connection"


# ---------------------------------------------------------------------------------------------
# (c) the disk cache: an unchanged rerun makes no calls


def test_rerun_with_the_same_cache_makes_no_calls(server: JudgeServer, tmp_path: Path) -> None:
    prompts = [f"case {i}" for i in range(20)]
    first = JudgeClient(spec(server), cache_dir=tmp_path)
    assert asyncio.run(_gather(first, prompts)) == [f"echo: {p}" for p in prompts]
    assert server.total == 20 and first.calls == 20
    assert len(list(tmp_path.rglob("*.json"))) == 20

    rerun = JudgeClient(spec(server), cache_dir=tmp_path)
    assert asyncio.run(_gather(rerun, prompts)) == [f"echo: {p}" for p in prompts]
    assert server.total == 20  # the server saw nothing new
    assert (rerun.calls, rerun.cache_hits) == (0, 20)

    other_model = JudgeClient(JudgeSpec(base_url=server.base_url, model="judge-2"), cache_dir=tmp_path)
    asyncio.run(_gather(other_model, prompts[:1]))
    assert server.total == 21  # the key covers the judge model


def test_identical_requests_in_flight_are_sent_once(server: JudgeServer) -> None:
    client = JudgeClient(spec(server))
    assert asyncio.run(_gather(client, ["same"] * 10)) == ["echo: same"] * 10
    assert server.requests["same"] == 1 and client.cache_hits == 9


def test_repeats_are_separate_calls_and_separate_cache_entries(server: JudgeServer, tmp_path: Path) -> None:
    client = JudgeClient(spec(server, repeat=3), cache_dir=tmp_path)

    async def three() -> list[str]:
        try:
            return [await client.complete(msgs("q"), sample=i) for i in range(3)]
        finally:
            await client.aclose()

    asyncio.run(three())
    asyncio.run(three())
    assert server.requests["q"] == 3 and client.cache_hits == 3


# ---------------------------------------------------------------------------------------------
# (d) the API key: sent to the judge, never shown anywhere


def test_api_key_never_leaks(
    server: JudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"sk-planted-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLOPS_TEST_JUDGE_KEY", key)
    caplog.set_level(logging.DEBUG)
    client = JudgeClient(spec(server, api_key_env="MLOPS_TEST_JUDGE_KEY", max_retries=1), cache_dir=tmp_path)

    assert asyncio.run(_gather(client, ["hello"])) == ["echo: hello"]
    assert server.auth == [f"Bearer {key}"]  # the judge did get it

    errors: list[BaseException] = []
    server.echo_auth = True
    for status in (401, 500):  # a server that quotes the header back, once final, once retried
        server.status = status
        (err,) = asyncio.run(_gather(client, [f"fail {status}"]))
        assert isinstance(err, JudgeError)
        errors.append(err)
    server.status = None
    server.throttle = (429, "0.1")
    asyncio.run(_gather(client, ["throttled"]))  # logs a retry line
    assert client.retries >= 1

    monkeypatch.delenv("MLOPS_TEST_JUDGE_KEY")
    (missing,) = asyncio.run(_gather(client, ["no key"]))
    assert isinstance(missing, JudgeError) and "MLOPS_TEST_JUDGE_KEY" in missing.reason
    errors.append(missing)

    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [getattr(e, "reason", "") for e in errors]
    texts.append(caplog.text)
    texts.extend(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    texts.append(repr(client.stats()) + repr(client.spec) + client.spec.model_dump_json())
    assert "***" in str(errors[0])  # the quoted header was scrubbed, not dropped silently
    assert any("retry" in r.message for r in caplog.records)
    for text in texts:
        assert key not in text


# ---------------------------------------------------------------------------------------------
# sync wrapper


def test_complete_sync_inside_and_outside_an_event_loop(server: JudgeServer) -> None:
    client = JudgeClient(spec(server))
    assert client.complete_sync(msgs("plain")) == "echo: plain"

    async def inside() -> str:
        return client.complete_sync(msgs("nested"))  # a running loop in this thread: uses a worker

    assert asyncio.run(inside()) == "echo: nested"
    assert run_sync(lambda: asyncio.sleep(0, result=5)) == 5


# ---------------------------------------------------------------------------------------------
# through deepeval: G-Eval scored by the judge server


def _geval(server: JudgeServer, tmp_path: Path | None = None, **judge: Any) -> Any:
    from mlops.evals.metrics import build_metric

    judges = {"local": spec(server, **judge)}
    params: dict[str, Any] = {
        "name": "deepeval.geval",
        "criteria": "The actual output equals the expected output.",
    }
    if tmp_path is not None:
        params["cache_dir"] = str(tmp_path)
    return build_metric(params, Path("."), judges)


def test_geval_judge_failure_fails_only_that_case(server: JudgeServer, tmp_path: Path) -> None:
    from mlops.evals.types import Case, Output

    metric = _geval(server, tmp_path, timeout_s=1, max_retries=0)
    cases = [Case(id=str(i), input=f"q{i}", expected=f"a{i}") for i in range(50)]
    outputs = [Output(text=f"a{i}") for i in range(50)]
    outputs[17] = Output(text="a17 HANG")
    outputs[23] = Output(text="a23 BADJSON")
    outputs[31] = Output(text="", error="endpoint returned 502")
    t0 = time.monotonic()
    scores = metric.score_batch(cases, outputs)
    elapsed = time.monotonic() - t0
    assert elapsed < 1 + 1 + 1, f"{elapsed:.2f}s"  # steps call, then the scoring calls; one times out
    assert [i for i, s in enumerate(scores) if s.failed] == [17, 23, 31]
    assert scores[17].value == 0.0 and "timeout" in (scores[17].reason or "")
    assert scores[23].value == 0.0 and "JSON" in (scores[23].reason or "")
    assert scores[31].reason == "endpoint returned 502"
    assert all(s.value == 1.0 for i, s in enumerate(scores) if i not in (17, 23, 31))

    before = server.total
    rerun = _geval(server, tmp_path, timeout_s=1, max_retries=0)
    ok = [i for i in range(50) if i not in (17, 23, 31)]
    again = rerun.score_batch([cases[i] for i in ok], [outputs[i] for i in ok])
    assert [s.value for s in again] == [1.0] * len(ok)
    assert server.total == before and rerun.judge.calls == 0  # (c) for a metric: all from cache


def test_geval_repeat_takes_the_median(server: JudgeServer) -> None:
    from mlops.evals.types import Case, Output

    metric = _geval(server, repeat=3)
    (score,) = metric.score_batch([Case(id="n", input="q", expected="x")], [Output(text="NOISY")])
    assert not score.failed
    assert score.value == pytest.approx(0.8)  # judge said 2, 9, 8 out of 10: median 8
    assert "median of 3" in (score.reason or "")
    # each repeat is kept: the spread the report shows, and a verdict that flips at 0.5 is flaky
    assert sorted(score.samples) == pytest.approx([0.2, 0.8, 0.9])
    from mlops.contracts import EvalResult
    from mlops.evals.harness import score as score_all
    from mlops.evals.noise import flaky_cases

    cases, outputs = [Case(id="n", input="q", expected="x")], [Output(text="NOISY")]
    summary, rows = score_all([metric], cases, outputs)
    assert sorted(rows[0].samples["deepeval.geval"]) == pytest.approx([0.2, 0.8, 0.9])
    res = EvalResult(suite="s", release="r", n=1, metrics=summary, metric_names=list(summary), cases=rows)
    assert [(f.id, f.metric) for f in flaky_cases(res, {})] == [("n", "deepeval.geval")]


# ---------------------------------------------------------------------------------------------
# self-hosted judges and the eval function's batch (mlops/evals/fanout.py, functions/evaluate.py)


def test_a_self_hosted_judge_has_no_endpoint_until_the_backend_gives_one() -> None:
    client = JudgeClient(JudgeSpec(source="judge-model", model="ref"), name="ref")
    with pytest.raises(JudgeError, match="self-hosted .*served on backend: modal") as e:
        client.complete_sync(msgs("q"))
    assert e.value.kind == "config" and client.calls == 0


def test_the_eval_function_scores_a_batch_through_a_self_hosted_judge(
    server: JudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`score_body`'s work: the judge's app URL from the payload, its vLLM key and the Proxy Auth
    Token from the container's environment; per-case scores and judge counters back."""
    from mlops.evals.fanout import batches, score_payload
    from mlops.evals.types import Case, Output

    env = {"MLOPS_VLLM_API_KEY": "vllm-k", "MLOPS_PROXY_TOKEN_ID": "wk-1", "MLOPS_PROXY_TOKEN_SECRET": "ws-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    judge = JudgeSpec(source="judge-model", model="judge-1", max_tokens=40)
    payload = {
        "metrics": [{"name": "deepeval.geval", "judge": "ref", "criteria": "The actual output equals the expected."}],
        "judges": {"ref": {"spec": judge.model_dump(mode="json"), "url": server.url}},
        "cases": [Case(id=str(i), input=f"q{i}", expected=f"a{i}") for i in range(3)],
        "outputs": [Output(text="a0"), Output(text="a1 BADJSON"), Output(text="a2")],
    }
    out = score_payload(payload, env, startup_s=10)
    scores = out["scores"]["deepeval.geval"]
    assert [(v, f) for v, _, f in scores] == [(1.0, False), (0.0, True), (1.0, False)]
    assert "JSON" in scores[1][1]  # a judge answer that does not parse: a failed case with its reason
    assert set(server.auth) == {"Bearer vllm-k"} and set(server.proxy) == {("wk-1", "ws-1")}
    assert out["judges"]["ref"]["calls"] == server.total >= 3
    assert [len(r) for r in batches(9)] == [4, 4, 1] and batches(0) == []
    assert len(batches(1000)) <= 32 and sum(map(len, batches(1000))) == 1000


def test_fanned_out_scores_are_the_local_harness_result(server: JudgeServer) -> None:
    """The same suite scored here and through the fan-out (each batch through `score_payload`,
    the eval function's body, with a base_url judge) gives the same summary and rows; only heavy
    metrics travel, and the judge's calls are counted on the runner's client."""
    from mlops.evals.fanout import remote_metrics, score_payload
    from mlops.evals.harness import score
    from mlops.evals.metrics import build_metric
    from mlops.evals.types import Case, Output

    specs: list[Any] = [
        "exact_match",
        {"name": "deepeval.geval", "judge": "ref", "criteria": "The actual output equals the expected."},
    ]
    judge = spec(server)
    cases = [Case(id=str(i), input=f"q{i}", expected=f"a{i}") for i in range(9)]
    outputs = [Output(text=f"a{i}" if i % 3 else f"b{i} BADJSON") for i in range(9)]

    def metrics() -> tuple[list[Any], dict[str, Any]]:
        clients = {"ref": JudgeClient(judge, name="ref")}
        return [build_metric(s, Path("."), clients) for s in specs], clients

    local_metrics, _ = metrics()
    want = score(local_metrics, cases, outputs)
    sent: list[dict[str, Any]] = []

    def run_map(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent.extend(inputs)
        return [score_payload(x, {}) for x in inputs]

    built, clients = metrics()
    judges = {"ref": {"spec": judge.model_dump(mode="json")}}
    server.reset()
    got = score(remote_metrics(specs, built, judges, clients, run_map), cases, outputs)
    assert got == want
    assert [len(x["cases"]) for x in sent] == [4, 4, 1] and all(x["metrics"] == specs[1:] for x in sent)
    assert clients["ref"].calls == server.total > 0  # counted for the cost report


def test_the_eval_function_scores_embeddings_offline() -> None:
    from mlops.evals.fanout import heavy, score_payload
    from mlops.evals.types import Case, Output

    assert heavy("ragas.semantic_similarity") and not heavy("ragas.chrf_score")
    payload = {
        "metrics": ["ragas.semantic_similarity"],
        "judges": {},
        "cases": [Case(id="1", input="q", expected="the cat sat on the mat")],
        "outputs": [Output(text="the cat sat on the mat")],
    }
    [[value, _, failed]] = score_payload(payload, {})["scores"]["ragas.semantic_similarity"]
    assert not failed and value > 0.99
