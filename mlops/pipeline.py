"""The stages and `run`, under the names scripts, benchmarks and tests have imported since the start.

The orchestrator lives in `mlops.flows` (session, stages, run, eval/deploy/rollback); this module
only re-exports it.
"""

from mlops.contracts import RunResult
from mlops.flows.run import run
from mlops.flows.session import Session, cache_dir, resolve_release
from mlops.flows.stages import evaluate, gate, production_results, recover, roll_out, train

__all__ = [
    "RunResult",
    "Session",
    "cache_dir",
    "evaluate",
    "gate",
    "production_results",
    "recover",
    "resolve_release",
    "roll_out",
    "run",
    "train",
]
