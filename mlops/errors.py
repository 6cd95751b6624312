"""One error tree: every known failure carries a one-line headline and an exit code.

Exit codes are a contract with the workflows (see README):
0 ok; 1 usage or config error; 3 a gate failed; 4 infrastructure failure (retry is sensible).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_GATE = 3
EXIT_INFRA = 4


class MlopsError(Exception):
    """Base of every error the CLI knows how to report in one line."""

    exit_code = EXIT_CONFIG

    def __init__(self, headline: str) -> None:
        super().__init__(headline)
        self.headline = headline


class ConfigError(MlopsError):
    """mlops.yaml is malformed or refers to something that does not exist."""


class UsageError(MlopsError):
    """The command line asks for something that cannot be done."""


class OverBudget(MlopsError):
    """What a run would spend exceeds a cap of `budget:` (exit 1, before anything is spent)."""


class GateFailed(MlopsError):
    """A gate failed: the candidate was rejected or rolled back."""

    exit_code = EXIT_GATE


class InfraError(MlopsError):
    """Storage, a server, or a remote service failed; retrying may help."""

    exit_code = EXIT_INFRA


class ConflictError(InfraError):
    """A compare-and-swap lost a race: someone else moved the pointer first."""


class IntegrityError(InfraError):
    """An artifact is missing, or its sha256 does not match its manifest."""
