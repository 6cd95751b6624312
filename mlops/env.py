"""The one place that makes the process offline and quiet: no telemetry, no hub downloads.

Set wherever eval libraries, transformers or tokenizers may run (the CLI, the metric families,
the server, benchmarks, tests). `setdefault`: a user who sets a variable keeps their value.
"""

from __future__ import annotations

import os

OFFLINE_ENV: dict[str, str] = {
    "DEEPEVAL_TELEMETRY_OPT_OUT": "1",
    "DEEPEVAL_DISABLE_DOTENV": "1",  # deepeval loads ./.env into os.environ otherwise
    "RAGAS_DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def set_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
