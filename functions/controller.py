"""The rollout controller on Modal: advances every deployed model's rollout record on a schedule,
so a rollout outlives the CI job that started it (`mlops run/deploy --no-wait`), a promoted release
is watched through its guardrail bake, and a canary whose CI job was killed is aborted.

    modal deploy functions/controller.py   # ModalBackend deploys it with the gateway, with its config

Its own app (`{app}-controller`, not a function of the gateway app): it is deployed with mlops.yaml
and the first eval suite (mlops/backends/modal_controller.py), which change more often than the
gateway's code, and a redeploy must not replace the endpoint's containers; `modal app stop
{app}-controller` freezes rollouts where they stand without taking the endpoint down.

Every PERIOD_S one invocation (`max_containers=1`: one at a time) runs `controller_body`
(mlops/rollout_schedule.py): it ticks `Controller.tick()` for each model against the registry's
storage, the routing Dict and the gateway's live stats; while a rollout needs it, it keeps ticking
at the controller's pace (a quarter of `deploy.rollout.interval`) until its period is nearly over,
so the interval is honoured though a period is a minute; with nothing to advance it returns after
one tick. Cost: 60 invocations an hour of a small CPU container, each a second or two when idle,
and one container busy throughout a rollout.
"""

from __future__ import annotations

import os

import modal
from images import auth_secret, controller_image, extra_secrets, settings

from mlops.backends.modal_api import ModalAPI, ModalSDK
from mlops.backends.modal_settings import CONTROLLER_BUNDLE_ENV

app = modal.App(settings.controller_app)

# A minute: Modal accepts shorter periods, but each invocation is a container start (the image's
# import, the config, the registry), and the loop inside an invocation already ticks at the
# rollout's own interval; the price is up to a minute before the first step of a rollout is set.
PERIOD_S = 60
# An invocation stops ticking a margin before its period ends (rollout_schedule.budget); the rest
# bounds one slow tick (a replayed step's requests, a publish that waits for the gateway).
TIMEOUT_S = PERIOD_S + 600


def controller_body(api: ModalAPI, period_s: float = PERIOD_S) -> list[str]:
    """One scheduled invocation against `api` (Modal's in the container, the twin's here)."""
    from mlops.rollout_schedule import run_invocation

    return run_invocation(api, period_s)


@app.function(
    image=controller_image,
    secrets=[auth_secret(), *extra_secrets()],  # the gateway's keys; the storage's credentials
    env=settings.env(**{CONTROLLER_BUNDLE_ENV: os.environ.get(CONTROLLER_BUNDLE_ENV, "")}),
    schedule=modal.Period(seconds=PERIOD_S),
    max_containers=1,
    timeout=TIMEOUT_S,
)
def controller() -> None:
    controller_body(ModalSDK(settings))
