"""The composition root: one command's config, registry and backend, opened once.

Every flow takes a Session; the CLI opens one per command (`Session.open`) and passes it on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlops.backends import backend_class
from mlops.backends.base import Backend
from mlops.config import Loaded, narrow, resolve_model
from mlops.errors import UsageError
from mlops.registry.releases import Registry
from mlops.registry.store import open_store

Say = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


@dataclass
class Session:
    """Everything one command needs: the config, the registry, the backend, and where to talk."""

    loaded: Loaded
    registry: Registry
    backend: Backend
    say: Say = _quiet
    progress: Callable[[dict[str, float]], None] | None = None
    # production's registry when it is not `registry` (a pull request's own storage): read only
    baseline: Registry | None = None

    @property
    def production_registry(self) -> Registry:
        return self.baseline or self.registry

    @classmethod
    def open(
        cls,
        loaded: Loaded,
        say: Say = _quiet,
        progress: Callable[[dict[str, float]], None] | None = None,
        model: str | None = None,
    ) -> Session:
        """One deployed model's session: `model`, or the only one deployed (several and none named:
        a one-line error listing them). Its config is that model's view (`mlops.config.narrow`)."""
        name = resolve_model(loaded, model)
        loaded = narrow(loaded, name)
        store = open_store(loaded.cfg.storage, base_dir=loaded.root)
        registry = Registry(store, cache_dir=cache_dir(loaded), model=name)
        backend = backend_class(loaded.cfg.backend)(loaded, registry)
        baseline = None
        if loaded.cfg.baseline_storage:
            base_store = open_store(loaded.cfg.baseline_storage, base_dir=loaded.root)
            baseline = Registry(base_store, cache_dir=cache_dir(loaded) / "baseline", model=name)
        return cls(loaded, registry, backend, say, progress, baseline)

    @property
    def model(self) -> str:
        return self.loaded.cfg.deploy.model


def cache_dir(loaded: Loaded) -> Path:
    return loaded.root / ".mlops" / "cache"


STAGE_REFS = ("candidate", "production", "previous", "canary")


def resolve_release(s: Session, ref: str) -> str:
    """A stage name (candidate, production, previous, canary) or a release id -> a release id."""
    st, _ = s.registry.read_state()
    if ref in STAGE_REFS:
        rid = st.stages.get(ref)
        if rid is None and ref == "candidate":  # a PR's candidate may already be the newest release
            rel = s.registry.index()
            rid = rel[0]["id"] if rel else None
        if rid is None:
            raise UsageError(f"there is no {ref} release yet")
        return str(rid)
    s.registry.require(ref)
    owner = s.registry.model_of(ref)
    if owner is not None and owner != s.model and owner in s.loaded.raw.get("deploy", {}).get("models", {}):
        raise UsageError(f"release {ref} is a release of model {owner!r}, not {s.model!r}: pass --model {owner}")
    return ref
