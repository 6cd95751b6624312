"""Releases (immutable manifests + an append-only history) and the serving state (stages + routing).

Layout on the store:

    artifacts/<release>/<file>           model files, written first
    releases/<release>/manifest.json     written once (if-none-match), only after the artifact
    releases/<release>/events/<stamp>-<random>.json  one status event each (mlops/registry/events.py;
                                         history.json, the list older registries kept, still reads)
    releases/<release>/evals/<suite>.json  eval results, stored with the release
    index/releases/<release>.json        id, model, created_at, fingerprint, status: what finding and
                                         listing releases need, without reading every manifest and history
    state.json                           stage pointers AND routing weights in one document

Stages and routing live in one document so that one atomic compare-and-swap moves both: there is
never a routing table that points at a release the stages do not know, or at a missing manifest.

A deployed model is a dimension of that document. A registry whose releases are of one model keeps
the single-model layout (a `State` at the top level, as every registry before several models); once
a second model has a state, the document becomes `{"models": {name: State, ...}}`, the old state
kept under the model its releases belong to. A `Registry` is scoped to one model (`model=`): its
`read_state`/`update_state` see and move that model's state only, so its lease, canary and rollback
never touch a neighbour (one compare-and-swap still guards the whole document).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mlops.contracts import EvalResult
from mlops.errors import ConflictError, InfraError, IntegrityError, UsageError
from mlops.registry import events
from mlops.registry.damage import RegistryDamaged, loads, working
from mlops.registry.events import INDEX
from mlops.registry.store import Store, atomic_write
from mlops.util import now

STAGES = ("production", "candidate", "previous", "canary")
STATE_KEY = "state.json"
# Pointer writes are rare and tiny, but several writers on a loaded machine can keep beating one
# unlucky writer: lost races back off with jitter (capped at 50 ms), and 60 lost in a row (seconds
# of contention) means something is wrong.
CAS_RETRIES = 60


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


IndexEntries = list[dict[str, Any]]  # (a module-level name: inside Registry, `list` is the method)
_index_entry = events.index_entry


def read_eval(doc: Any) -> tuple[EvalResult | None, str | None]:
    """(the stored eval result, None) or (None, why the document is not one): for `get_eval` and `mlops doctor`."""
    try:
        return EvalResult.model_validate(doc), None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        return None, f"not an eval result: {where}: {err['msg']}"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(files: dict[str, str]) -> str:
    """One digest for a directory: sha256 over sorted `name sha256` lines."""
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


@dataclass
class State:
    version: int = 0
    stages: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(STAGES))
    routing: dict[str, int] = field(default_factory=dict)  # release id -> weight (percent, sums to 100)
    shadow: dict[str, Any] = field(default_factory=dict)  # {"release": id, "share": 0.1}
    updated_at: str | None = None
    reason: str | None = None
    actor: str | None = None
    # the rollout lease (mlops/registry/lease.py): owner, token, heartbeat_at, expires_at (epoch s)
    lease: dict[str, Any] = field(default_factory=dict)
    # the model's active rollout record, advanced by the rollout controller ({} when none runs):
    # id, release, baseline, phase, steps, step, step_started_at, verdicts, status, ... (mlops/rollout*.py)
    rollout: dict[str, Any] = field(default_factory=dict)
    # the model's active A/B experiment ({} when none runs): id, arms, share, metric, started_at, ...
    experiment: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def live_routing(self, at: float | None = None) -> dict[str, int]:
        """The routing to serve now. Weights written under a lease whose holder stopped renewing it
        (a killed pipeline) fall back to production once it expires: a canary never becomes
        production by accident, even before the next run repairs the state."""
        exp = self.lease.get("expires_at") if self.lease.get("token") else None
        if exp is not None and self.routing and (time.time() if at is None else at) > float(exp):
            prod = self.stages.get("production")
            return {prod: 100} if prod else {}
        return self.routing

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> State:
        stages = dict.fromkeys(STAGES) | dict(d.get("stages", {}))
        return cls(
            int(d.get("version", 0)),
            stages,
            dict(d.get("routing", {})),
            dict(d.get("shadow", {})),
            d.get("updated_at"),
            d.get("reason"),
            d.get("actor"),
            dict(d.get("lease") or {}),
            dict(d.get("rollout") or {}),
            dict(d.get("experiment") or {}),
        )

    def referenced(self) -> set[str]:
        refs = {r for r in self.stages.values() if r} | set(self.routing)
        if self.shadow.get("release"):
            refs.add(self.shadow["release"])
        for rec in (self.rollout, self.experiment):
            if rec.get("status", "running") == "running":
                refs.update(r for r in rec.get("releases", []) if r)
        return refs


class StateDoc:
    """state.json parsed: each model's State, and which layout it was stored in."""

    def __init__(self, states: dict[str, State], legacy: State | None, owner: str | None) -> None:
        self.states = states  # model -> State (the layout with several models)
        self.legacy = legacy  # the single-model layout's State (None: empty, or several models)
        self.owner = owner  # the model the legacy State's releases belong to (None: it references none)

    def models(self) -> list[str]:
        return sorted(self.states) if self.legacy is None else [self.owner] if self.owner else []


def models_doc(doc: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The per-model states of a state.json document, or None for the single-model layout."""
    models = doc.get("models")
    if models is None:
        return None
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise TypeError("'models' is not a mapping of model name to state")
    return models


class Registry:
    def __init__(self, store: Store, cache_dir: Path | None = None, model: str | None = None) -> None:
        self.store = store
        self.cache_dir = cache_dir
        # the deployed model whose state this registry reads and writes (None: the only one there is)
        self.model = model
        # a held rollout lease (mlops.registry.lease.Lease): every state write is then conditional on it
        self.lease: Any = None
        self._owners: dict[str, str | None] = {}  # release id -> model (manifests are immutable)

    def scoped(self, model: str | None) -> Registry:
        """The same store and cache, seen as `model`'s registry."""
        return Registry(self.store, self.cache_dir, model)

    def model_of(self, release_id: str) -> str | None:
        if release_id not in self._owners:
            m = self.manifest(release_id)
            self._owners[release_id] = str(m["model"]) if m and m.get("model") else None
        return self._owners[release_id]

    # ------------------------------------------------------------------ releases

    @staticmethod
    def new_id(model: str) -> str:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        return f"{model}-{stamp}-{secrets.token_hex(3)}"

    def publish(self, release_id: str, artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload the artifact, then write the manifest once. A crash in between leaves only an
        orphan artifact directory, never a manifest that points at missing files."""
        files: dict[str, str] = {}
        local = self.store.local_path(f"artifacts/{release_id}")
        # an flock beside the upload: a sweeper can tell a dead upload (kill -9) from a live one
        busy = working(local / ".publishing") if local is not None else contextlib.nullcontext()
        with busy:
            try:
                for p in sorted(Path(artifact_dir).rglob("*")):
                    if p.is_file():
                        rel = p.relative_to(artifact_dir).as_posix()
                        if rel.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")):
                            raise IntegrityError(f"refusing to publish {rel}: weights must be safetensors (no pickle)")
                        files[rel] = sha256_file(p)
                        self.store.put_file(f"artifacts/{release_id}/{rel}", p)
                manifest = self._manifest(release_id, manifest, files)
            except BaseException:
                if self.store.get(f"releases/{release_id}/manifest.json") is None:
                    self._unpublish(release_id, local)  # disk full, read-only, interrupted: no orphan left
                raise
        self.append_event(release_id, "registered", by=str(manifest.get("registered_by", "pipeline")))
        return manifest

    def _unpublish(self, release_id: str, local: Path | None) -> None:
        with contextlib.suppress(Exception):
            for key in self.store.list(f"artifacts/{release_id}"):
                self.store.delete(key)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)

    def _manifest(self, release_id: str, manifest: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
        manifest = dict(manifest) | {
            "id": release_id,
            "created_at": manifest.get("created_at") or now(),
            "artifact": {
                "uri": f"{self.store.uri}/artifacts/{release_id}",
                "sha256": tree_sha256(files),
                "files": files,
            },
        }
        self.store.put(f"releases/{release_id}/manifest.json", _dumps(manifest), if_none_match=True)
        self.store.put(f"{INDEX}/{release_id}.json", _dumps(_index_entry(manifest)))
        return manifest

    def manifest(self, release_id: str) -> dict[str, Any] | None:
        blob = self.store.get(f"releases/{release_id}/manifest.json")
        return self._loads(blob.data, f"releases/{release_id}/manifest.json", dict) if blob else None

    def _loads(self, data: bytes, key: str, expect: type = object) -> Any:
        """A registry document, or RegistryDamaged naming it and pointing to `mlops doctor` (exit 4)."""
        return loads(data, f"{self.store.uri}/{key}", expect)

    def require(self, release_id: str) -> dict[str, Any]:
        m = self.manifest(release_id)
        if m is None:
            known = [r["id"] for r in self.index()][:5]
            raise UsageError(f"unknown release {release_id!r} (recent: {', '.join(known) or 'none'})")
        return m

    def history(self, release_id: str) -> list[dict[str, Any]]:
        """Every event, oldest first: a registry's legacy history.json, then the event objects."""
        return events.read(self.store, release_id)

    def append_event(self, release_id: str, event: str, by: str = "pipeline", **detail: Any) -> None:
        """Store one event (its own object: concurrent appenders lose nothing), then note it as the
        release's status in the index. Flows reach this through their backend (`Router.record`)."""
        entry = {"at": now(), "event": event, "by": by} | ({"detail": detail} if detail else {})
        head = events.write(self.store, release_id, entry)
        events.appended(self.store, release_id, head, event, detail)

    def put_eval(self, release_id: str, suite: str, result: EvalResult) -> None:
        self.store.put(f"releases/{release_id}/evals/{suite}.json", _dumps(result.model_dump()))

    def get_eval(self, release_id: str, suite: str) -> EvalResult | None:
        key = f"releases/{release_id}/evals/{suite}.json"
        blob = self.store.get(key)
        if blob is None:
            return None
        result, why = read_eval(self._loads(blob.data, key, dict))
        if result is None:  # valid JSON, but not a result: damaged like a truncated file
            raise RegistryDamaged(f"{self.store.uri}/{key}", str(why))
        return result

    def release_ids(self, keys: Sequence[str] | None = None) -> list[str]:
        keys = self.store.list("releases") if keys is None else keys
        return sorted({k.split("/")[1] for k in keys if k.endswith("/manifest.json") and k.count("/") == 2})

    def list(self, full: bool = False) -> IndexEntries:
        """Every release with its status (and last eval summary), newest first, from the index alone:
        no manifest or history is read, except to rebuild the entry of a release whose newest event
        the index has not seen (a writer killed in between, a registry from before event objects).
        `full`: each release's manifest and history too (`mlops releases --json` keeps that shape)."""
        keys = self.store.list("releases")
        head, ids = events.heads(keys), set(self.release_ids(keys))
        out = []
        for e in self.index(keys):
            rid = e["id"]
            if rid not in ids:
                continue  # its manifest was moved aside (`mlops doctor`): the release is gone
            hist = self.history(rid) if full or e.get("head") != head.get(rid) else []
            if e.get("head") != head.get(rid):
                e |= self._reindex(rid, head.get(rid), hist, e)
            if full:
                if (m := self.manifest(rid)) is None:
                    continue
                e = m | {"history": hist, "status": events.status_of(hist)["status"]}
            out.append(e | {"status": e.get("status") or "registered"})
        return out

    def _reindex(self, rid: str, head: str | None, hist: IndexEntries, e: dict[str, Any]) -> dict[str, Any]:
        """An index entry's status rebuilt from the whole history (and fields an older index lacks)."""
        fields = events.status_of(hist)
        if "git_sha" not in e and (m := self.manifest(rid)) is not None:
            fields |= _index_entry(m)
        if head is not None:
            with contextlib.suppress(InfraError):  # a read-only store lists, rebuilding each time
                events.note(self.store, rid, head, fields)
        return fields

    def index(self, keys: Sequence[str] | None = None) -> IndexEntries:
        """id, model, created_at and fingerprint of every release, newest first: one small object
        each, no manifest or history read. A release from before the index is read from its
        manifest once and added (so old registries migrate on read). `keys`: a listing of
        `releases` the caller already has."""
        entries: dict[str, dict[str, Any]] = {}
        for key in self.store.list(INDEX):
            blob = self.store.get(key)
            if blob is not None:
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    e = json.loads(blob.data)
                    entries[str(e["id"])] = e
        for rid in self.release_ids(keys):
            if rid not in entries and (m := self.manifest(rid)) is not None:
                entries[rid] = _index_entry(m)
                with contextlib.suppress(InfraError):  # a read-only store still lists, just slower
                    self.store.put(f"{INDEX}/{rid}.json", _dumps(entries[rid]))
        return sorted(entries.values(), key=lambda e: (e.get("created_at") or "", e["id"]), reverse=True)

    def find_by_fingerprint(self, model: str, fingerprint: str) -> dict[str, Any] | None:
        for e in self.index():
            if e.get("model") == model and e.get("fingerprint") == fingerprint:
                return self.manifest(e["id"])
        return None

    # ------------------------------------------------------------------ artifacts

    def verify(self, release_id: str) -> dict[str, Any]:
        """Check that every artifact file exists and matches its sha256; return the manifest."""
        m = self.require(release_id)
        for rel, want in m["artifact"]["files"].items():
            key = f"artifacts/{release_id}/{rel}"
            local = self.store.local_path(key)
            if local is not None:
                if not local.is_file():
                    raise IntegrityError(f"release {release_id}: artifact file {rel} is missing")
                got = sha256_file(local)
            else:
                blob = self.store.get(key)
                if blob is None:
                    raise IntegrityError(f"release {release_id}: artifact file {rel} is missing")
                got = hashlib.sha256(blob.data).hexdigest()
            if got != want:
                raise IntegrityError(f"release {release_id}: {rel} sha256 {got[:12]}… != manifest {want[:12]}…")
        return m

    def artifact_dir(self, release_id: str) -> Path:
        """A local directory holding the verified artifact (downloaded to the cache for remote stores)."""
        m = self.verify(release_id)
        local = self.store.local_path(f"artifacts/{release_id}")
        if local is not None:
            return local
        if self.cache_dir is None:
            raise UsageError("a cache directory is needed to use artifacts from a remote store")
        dest = self.cache_dir / "artifacts" / release_id
        for rel, want in m["artifact"]["files"].items():
            p = dest / rel
            if not (p.is_file() and sha256_file(p) == want):
                self.store.get_file(f"artifacts/{release_id}/{rel}", p)
                if sha256_file(p) != want:
                    os.unlink(p)
                    raise IntegrityError(f"release {release_id}: downloaded {rel} does not match its sha256")
        return dest

    # ------------------------------------------------------------------ state

    def read_doc(self) -> tuple[StateDoc, str | None]:
        """Every model's state (and the document's etag, for a compare-and-swap)."""
        blob = self.store.get(STATE_KEY)
        if blob is None:
            return StateDoc({}, None, None), None
        doc = self._loads(blob.data, STATE_KEY, dict)
        try:
            models = models_doc(doc)
            if models is not None:
                return StateDoc({k: State.from_json(v) for k, v in models.items()}, None, None), blob.etag
            legacy = State.from_json(doc)
        except (TypeError, ValueError, AttributeError) as e:
            raise RegistryDamaged(f"{self.store.uri}/{STATE_KEY}", f"unexpected content: {e}") from e
        owner = next((o for rid in sorted(legacy.referenced()) if (o := self.model_of(rid))), None)
        return StateDoc({}, legacy, owner), blob.etag

    def _mine(self, doc: StateDoc) -> State:
        if doc.legacy is not None:
            if self.model is None or doc.owner in (None, self.model):
                return doc.legacy
            return State()
        if self.model is None:
            if len(doc.states) > 1:
                raise UsageError(
                    f"several models are deployed ({', '.join(sorted(doc.states))}): name one with --model"
                )
            return next(iter(doc.states.values()), State())
        return doc.states.get(self.model) or State()

    def _with(self, doc: StateDoc, new: State) -> dict[str, Any]:
        """The document with this model's state replaced by `new`: the single-model layout while
        no other model has a state, the per-model layout from the second model on."""
        if doc.legacy is not None or not doc.states:
            owner = doc.owner or self.model
            if doc.legacy is None or self.model is None or doc.owner in (None, self.model):
                return new.to_json()
            states = {str(owner): doc.legacy}
        else:
            states = dict(doc.states)
        key = self.model if self.model is not None else next(iter(states))
        states[key] = new
        return {"models": {k: v.to_json() for k, v in sorted(states.items())}}

    def read_state(self) -> tuple[State, str | None]:
        doc, etag = self.read_doc()
        return self._mine(doc), etag

    def update_state(
        self, change: Callable[[State], State | None], reason: str, actor: str = "pipeline", *, quiet: bool = False
    ) -> State:
        """Apply `change` by compare-and-swap, retrying on a lost race. Every release the new state
        references must have a manifest, and routing weights must sum to 100 (or be empty).
        While this process holds the rollout lease, the change applies only if it still does.
        `quiet` keeps the last reason and actor (a lease heartbeat is not a decision)."""
        if self.lease is not None:
            change = self.lease.guard(change)
        for attempt in range(CAS_RETRIES):
            doc, etag = self.read_doc()
            current = self._mine(doc)
            new = change(State.from_json(current.to_json()))
            if new is None:
                return current
            for rid in new.referenced():
                if self.manifest(rid) is None:
                    if rid in current.referenced():  # not this change's doing: the registry is damaged
                        raise RegistryDamaged(
                            f"{self.store.uri}/releases/{rid}/manifest.json",
                            "missing, but state.json routes or points to it",
                        )
                    raise IntegrityError(f"refusing to route to {rid}: it has no manifest")
            if new.routing and sum(new.routing.values()) != 100:
                raise UsageError(f"routing weights must sum to 100, got {new.routing}")
            new.routing = {k: v for k, v in new.routing.items() if v > 0}
            new.version = current.version + 1
            if not quiet:
                new.updated_at, new.reason, new.actor = now(), reason, actor
            data = _dumps(self._with(doc, new))
            try:
                if etag is None:
                    self.store.put(STATE_KEY, data, if_none_match=True)
                else:
                    self.store.put(STATE_KEY, data, if_match=etag)
                return new
            except ConflictError:
                _backoff(attempt)
        raise ConflictError("could not update state.json: too many concurrent writers")


def write_local_json(path: Path, obj: Any) -> None:
    atomic_write(path, _dumps(obj))
