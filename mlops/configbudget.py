"""mlops.yaml's `budget:` (issue 20): caps per run and per calendar month on what the loop spends.

Every cap is optional; a cap left out is not checked. Hours are GPU-hours (a local run on a CPU
counts its CPU-hours, so the local backend is budgeted the same way); dollars come from `prices`.
"""

from typing import Annotated

from pydantic import Field

from mlops.configbase import Strict

Cap = Annotated[float, Field(ge=0)] | None


class RunCaps(Strict):
    train_gpu_hours: Cap = Field(None, description="GPU-hours of training (a local CPU run: its CPU-hours).")
    train_usd: Cap = Field(None, description="Dollars of training (GPU-hours x prices.gpu_per_hour).")
    judge_tokens: Cap = Field(None, description="Tokens the judges read and write (prompt + completion).")
    judge_usd: Cap = Field(None, description="Dollars of judge tokens (prices.judge_per_1m_tokens).")
    eval_gpu_hours: Cap = Field(None, description="GPU-hours the release serves for its evals (backend: modal).")
    usd: Cap = Field(None, description="Every dollar above together.")


class MonthCaps(RunCaps):
    serve_gpu_hours: Cap = Field(
        None, description="GPU-hours of the release and adapter base apps (their containers' uptime; backend: modal)."
    )


class BudgetCfg(Strict):
    per_run: RunCaps = Field(
        default_factory=RunCaps.model_construct, description="What one run (mlops run/train/eval) may spend."
    )
    per_month: MonthCaps = Field(
        default_factory=MonthCaps.model_construct,
        description="What a calendar month (UTC) may spend, counted from the registry's cost records.",
    )

    @property
    def active(self) -> bool:
        return any(v is not None for caps in (self.per_run, self.per_month) for v in caps.model_dump().values())
