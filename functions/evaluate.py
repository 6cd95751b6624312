"""Heavy eval scoring as a serverless function: judge-based and embedding metrics over case batches.

`mlops run` / `mlops eval` on `backend: modal` query the release through the gateway on the runner,
then fan the suite's heavy metrics (every deepeval/ragas metric) out over batches of cases:

    modal.Function.from_name("{app}-eval", "score").map(batches)     # ModalBackend does this

and aggregate the per-case scores into the same eval result the local harness writes. `mlops`
deploys this app itself whenever the code it would run changes, as it does the train app:

    modal deploy functions/evaluate.py       # by hand: the same app, {app}-eval

Self-hosted judges (`judges.<name>.source`) are their own vLLM apps, `{app}-judge-<name>`
(functions/serve.py); this function reaches them with the Proxy Auth Token and the vLLM key from
the `{app}-auth` Secret, waiting for a cold one's /health first. It runs on CPU: the judge model
runs on its own app's GPU, and a suite's embeddings are small.
"""

from __future__ import annotations

from typing import Any

import modal
from images import auth_secret, eval_image, extra_secrets, settings

app = modal.App(settings.eval_app)

EVAL_TIMEOUT_S = 30 * 60  # one batch: a cold judge start (startup_timeout) plus its judge calls


def score_body(payload: dict[str, Any], root: str | None = None) -> dict[str, Any]:
    """Score one batch of cases with the suite's heavy metrics (see mlops/evals/fanout.py).
    Plain Python: the twin runs it in a process, tests call it directly."""
    from mlops.evals.fanout import score_payload

    return score_payload(payload, startup_s=float(settings.startup_timeout + 60))


@app.function(
    image=eval_image,
    secrets=[auth_secret(), *extra_secrets()],
    env=settings.env(),
    timeout=EVAL_TIMEOUT_S,
    max_containers=settings.max_containers * 4,  # the fan-out: one batch per container
)
def score(payload: dict[str, Any]) -> dict[str, Any]:
    return score_body(payload)
