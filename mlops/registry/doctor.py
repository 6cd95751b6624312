"""`mlops doctor`: find what is damaged in a registry and repair what can be repaired.

Dry run by default (what is wrong, what `--repair` would do); `--repair` applies it and records
each repair in the affected releases' histories. What it knows:

- `state.json` unreadable: rebuilt from the release histories (production := the release last
  promoted or rolled back to that still has a valid manifest; previous := the one before it).
- a manifest unreadable: moved aside (`manifest.json.damaged`); its release stops existing for the
  registry (its artifact is then an orphan), and routing that named it is repaired as below.
- a history unreadable: every complete event is salvaged, the damaged copy kept beside it (an
  older registry's `history.json`); an unreadable event object is moved aside, the others stay.
- stored eval results unreadable: moved aside (`mlops eval` recomputes them).
- the state routes to a release with no (valid) manifest: production falls back to previous, or
  to the newest release ever promoted; all traffic to production; the canary dropped.
- a rollout lease that expired with canary weights in place: all traffic back to production.
- several deployed models (`{"models": {name: state}}`): each model's state is examined and
  repaired alone, from its own releases' histories (a release's manifest names its model); an
  unreadable state.json is rebuilt with a state for every model that has releases.
- a capture directory (`monitor/capture`, `monitor/counters`) that is not a directory: serving
  counts every request it then cannot capture (`mlops monitor` exits 4); moved aside.
- orphans: artifact directories with no manifest whose writer is gone, and `.tmp` files left by a
  write that was killed. The pipeline sweeps these itself (`sweep`) at the start and end of a run.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlops.registry import events
from mlops.registry.damage import abandoned, parse
from mlops.registry.lease import live, recover_routing
from mlops.registry.releases import STATE_KEY, Registry, State, _dumps, read_eval
from mlops.util import now

TMP_GRACE_S = 2.0  # a live small write holds its .tmp for milliseconds


@dataclass
class Finding:
    kind: str
    key: str
    problem: str
    repair: str
    repaired: bool = False
    model: str | None = None  # several deployed models: whose state this finding is about

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _doc(reg: Registry, key: str) -> tuple[bool, Any, str | None]:
    """(exists, document or None, why unreadable or None)."""
    blob = reg.store.get(key)
    if blob is None:
        return False, None, None
    doc, why = parse(blob.data)
    return True, doc, why


def _eval_damage(reg: Registry, key: str) -> str | None:
    """Why a stored eval result cannot be read (unparsable, or not the EvalResult contract), or None."""
    exists, doc, why = _doc(reg, key)
    if not exists:
        return None
    return why or read_eval(doc)[1]


def _valid_manifest(reg: Registry, rid: str) -> bool:
    _, doc, why = _doc(reg, f"releases/{rid}/manifest.json")
    return why is None and isinstance(doc, dict) and isinstance(doc.get("artifact"), dict)


def _salvage_events(data: bytes) -> list[dict[str, Any]]:
    """Every complete event object of a truncated history list."""
    text = data.decode("utf-8", "replace")
    dec, out, i = json.JSONDecoder(), [], text.find("[") + 1
    while 0 < i < len(text):
        j = text.find("{", i)
        if j < 0:
            break
        try:
            obj, i = dec.raw_decode(text, j)
        except ValueError:
            break
        if isinstance(obj, dict) and "event" in obj:
            out.append(obj)
    return out


def _release_ids(reg: Registry) -> set[str]:
    return {k.split("/")[1] for k in reg.store.list("releases") if k.count("/") >= 2}


def _local_root(reg: Registry) -> Path | None:
    return reg.store.local_path("")


# ---------------------------------------------------------------------------- orphans


def orphan_findings(reg: Registry, tmp_grace: float = TMP_GRACE_S) -> list[Finding]:
    out = []
    manifests = {rid for rid in _release_ids(reg) if reg.store.get(f"releases/{rid}/manifest.json") is not None}
    artifacts = {k.split("/")[1] for k in reg.store.list("artifacts") if k.count("/") >= 2}
    root = _local_root(reg)
    if root is not None and (root / "artifacts").is_dir():  # a dir may hold only a lock or .tmp files
        artifacts |= {p.name for p in (root / "artifacts").iterdir() if p.is_dir()}
    for rid in sorted(artifacts - manifests):
        if root is not None and not abandoned(root / "artifacts" / rid / ".publishing"):
            continue  # a live process is uploading it
        out.append(Finding("orphan_artifact", f"artifacts/{rid}/", "artifact with no manifest", "delete it"))
    if root is not None:
        cutoff = time.time() - tmp_grace
        for p in sorted(root.rglob(".*.tmp")):
            if p.is_file() and p.stat().st_mtime < cutoff:
                key = p.relative_to(root).as_posix()
                out.append(Finding("tmp_file", key, "left by an interrupted write", "delete it"))
    return out


def _remove_orphan(reg: Registry, f: Finding) -> None:
    root = _local_root(reg)
    if f.kind == "tmp_file" and root is not None:
        (root / f.key).unlink(missing_ok=True)
        return
    rid = f.key.split("/")[1]
    if root is not None and not abandoned(root / "artifacts" / rid / ".publishing"):
        return
    if reg.store.get(f"releases/{rid}/manifest.json") is not None:
        return  # published between the look and now
    for key in reg.store.list(f"artifacts/{rid}"):
        reg.store.delete(key)
    if root is not None:
        shutil.rmtree(root / "artifacts" / rid, ignore_errors=True)
    f.repaired = True


def sweep(reg: Registry, build_dir: Path | None = None) -> list[str]:
    """What a pipeline cleans by itself: orphan artifacts and stale .tmp files (local stores only:
    on S3 nothing tells a dead uploader from a slow one, so `mlops doctor --repair` does it), and
    training outputs in `build_dir` that no live process is writing."""
    done = []
    if _local_root(reg) is not None:
        for f in orphan_findings(reg):
            _remove_orphan(reg, f)
            done.append(f.key)
    if build_dir is not None and build_dir.is_dir():
        for p in build_dir.iterdir():
            if p.is_dir() and abandoned(build_dir / f".{p.name}.lock"):
                shutil.rmtree(p, ignore_errors=True)
                done.append(str(p))
    return done


# ---------------------------------------------------------------------------- examine


def examine(reg: Registry) -> list[Finding]:
    found: list[Finding] = []
    for rid in sorted(_release_ids(reg)):
        base = f"releases/{rid}"
        exists, doc, why = _doc(reg, f"{base}/manifest.json")
        if exists and (why or not isinstance(doc, dict) or not isinstance(doc.get("artifact"), dict)):
            found.append(Finding("damaged_manifest", f"{base}/manifest.json", why or "not a manifest", "move it aside"))
        exists, doc, why = _doc(reg, f"{base}/{events.LEGACY}")
        if exists and (why or not isinstance(doc, list)):
            found.append(
                Finding("damaged_history", f"{base}/{events.LEGACY}", why or "not a list", "keep every complete event")
            )
        for key in events.event_keys(reg.store, rid):
            exists, doc, why = _doc(reg, key)
            if exists and (why or not isinstance(doc, dict) or "event" not in doc):
                found.append(Finding("damaged_event", key, why or "not an event", "move it aside (keep the others)"))
        for key in reg.store.list(f"{base}/evals"):
            if key.endswith(".json") and (bad := _eval_damage(reg, key)):
                found.append(Finding("damaged_eval", key, bad, "move it aside (re-run eval)"))
    exists, doc, why = _doc(reg, STATE_KEY)
    if exists and (why or not isinstance(doc, dict) or not _states(doc)):
        found.append(Finding("damaged_state", STATE_KEY, why or "not an object", "rebuild it from release histories"))
    elif exists:
        for name, st in _states(doc).items():
            found += _state_findings(reg, st, name)
    return found + capture_findings(reg) + orphan_findings(reg)


def _states(doc: dict[str, Any]) -> dict[str | None, State]:
    """Each model's State (None: the single-model layout's); {} when one is not a state."""
    try:
        if isinstance(doc.get("models"), dict):
            return {str(n): State.from_json(sub) for n, sub in sorted(doc["models"].items())}
        return {None: State.from_json(doc)}
    except (TypeError, ValueError, AttributeError):
        return {}


def _state_findings(reg: Registry, st: State, model: str | None) -> list[Finding]:
    whose = f"model {model} " if model else ""
    missing = sorted(r for r in st.referenced() if not _valid_manifest(reg, r))
    if missing:
        problem = f"{whose}routes or points to {', '.join(missing)}, which has no valid manifest"
        return [Finding("missing_release", STATE_KEY, problem, "route to the last good production", model=model)]
    if st.lease.get("token") and not live(st.lease) and recover_routing(State.from_json(st.to_json())):
        problem = f"{whose}canary weights of {st.lease.get('owner')}, whose lease expired"
        return [Finding("expired_lease", STATE_KEY, problem, "all traffic back to production", model=model)]
    return []


CAPTURE_DIRS = ("monitor", "monitor/capture", "monitor/counters")


def capture_findings(reg: Registry) -> list[Finding]:
    """A file where capture writes its directories: every capture write fails (local stores)."""
    root = _local_root(reg)
    if root is None:
        return []
    return [
        Finding("capture_not_dir", key, "not a directory: traffic capture cannot write", f"move it to {key}.damaged")
        for key in CAPTURE_DIRS
        if (root / key).exists() and not (root / key).is_dir()
    ]


# ---------------------------------------------------------------------------- repair


def _repair_state(reg: Registry, actor: str) -> list[str]:
    """Rewrite state.json with every model's state repaired (one compare-and-swap); return the
    production releases of the states that changed."""
    blob = reg.store.get(STATE_KEY)
    doc, why = parse(blob.data) if blob else (None, None)
    olds: dict[str | None, State | None] = {}
    if why is None and isinstance(doc, dict):
        olds.update(_states(doc))
    several = why is None and isinstance(doc, dict) and isinstance(doc.get("models"), dict)
    if not olds:  # unreadable: a state for each model whose releases the registry holds
        owners = sorted({o for r in _release_ids(reg) if _valid_manifest(reg, r) and (o := reg.model_of(r))})
        several = len(owners) > 1
        olds = dict.fromkeys(owners, None) if several else {None: None}
    # above any version a server has seen, so every watcher takes the repaired state (a version
    # lost with the file: seconds since the epoch exceed any count of writes)
    seen = [int(v) for v in re.findall(rb'"version":\s*(\d+)', blob.data)] if blob else []
    salvaged = max(seen, default=0)
    new: dict[str | None, State] = {}
    changed = []
    for name, old in olds.items():
        st = _good_state(reg, old, name if several else None)
        st.version = old.version if old else salvaged
        if old is not None and st.to_json() == old.to_json():
            new[name] = old
            continue
        st.version = st.version + 1 if st.version else int(time.time())
        st.updated_at, st.reason, st.actor = now(), "mlops doctor --repair", actor
        new[name] = st
        changed.append(st.stages.get("production"))
    if not changed:
        return []
    out = {"models": {str(n): st.to_json() for n, st in new.items()}} if several else new[None].to_json()
    if blob is None:
        reg.store.put(STATE_KEY, _dumps(out), if_none_match=True)
    else:
        reg.store.put(STATE_KEY, _dumps(out), if_match=blob.etag)
    return [p for p in changed if p]


def _promotions(reg: Registry, valid: set[str]) -> list[tuple[str, str]]:
    """(at, release) of every promotion or rollback-to, oldest first, for releases still valid."""
    out = []
    for rid in valid:
        _, hist, why = _doc(reg, f"releases/{rid}/{events.LEGACY}")
        readable = list(hist) if why is None and isinstance(hist, list) else []
        for key in events.event_keys(reg.store, rid):
            _, e, why = _doc(reg, key)
            readable += [e] if why is None else []
        for e in readable:
            if isinstance(e, dict) and e.get("event") in ("promoted", "rolled_back_to"):
                out.append((str(e.get("at", "")), rid))
    return sorted(out)


def _good_state(reg: Registry, old: State | None, model: str | None = None) -> State:
    """`old` with every stage and route to a release gone repaired; `model`: from that model's releases only."""
    valid = {r for r in _release_ids(reg) if _valid_manifest(reg, r)}
    if model is not None:
        valid = {r for r in valid if reg.model_of(r) == model}
    st = State.from_json(old.to_json()) if old else State()
    for stage, rid in st.stages.items():
        if rid and rid not in valid:
            st.stages[stage] = None
    if st.stages.get("production") is None:
        history = [r for _, r in _promotions(reg, valid)]
        prev = st.stages.get("previous")
        st.stages["production"] = prev or (history[-1] if history else None)
        if prev:
            st.stages["previous"] = None
        older = [r for r in history if r != st.stages["production"]]
        st.stages["previous"] = st.stages.get("previous") or (older[-1] if older else None)
    st.routing = {r: w for r, w in st.routing.items() if r in valid}
    if sum(st.routing.values()) != 100 or (st.shadow.get("release") not in valid and st.shadow):
        st.routing, st.shadow = {}, {}
    if not live(st.lease):  # a live rollout keeps its canary; a dead one's weights go
        st.lease = {}
        recover_routing(st)
    prod = st.stages.get("production")
    if not st.routing and prod:
        st.routing = {prod: 100}
    return st


def _move_aside(reg: Registry, key: str) -> None:
    blob = reg.store.get(key)
    if blob is not None:
        reg.store.put(f"{key}.damaged", blob.data)
        reg.store.delete(key)


def repair(reg: Registry, findings: list[Finding], actor: str) -> list[Finding]:
    touched: dict[str, list[str]] = {}
    for f in findings:
        rid = f.key.split("/")[1] if f.key.startswith("releases/") else None
        if f.kind == "damaged_history" and rid:
            blob = reg.store.get(f.key)
            events = _salvage_events(blob.data) if blob else []
            if blob is not None:
                reg.store.put(f"{f.key}.damaged", blob.data)
            reg.store.put(f.key, _dumps(events))
            f.repaired, f.repair = True, f"kept {len(events)} complete event(s)"
        elif f.kind in ("damaged_manifest", "damaged_eval", "damaged_event"):
            _move_aside(reg, f.key)
            f.repaired = True
        elif f.kind == "capture_not_dir" and (root := _local_root(reg)) is not None:
            (root / f.key).replace(root / f"{f.key}.damaged")
            f.repaired = True
        if rid and f.repaired:
            touched.setdefault(rid, []).append(f"{f.kind}: {f.key} ({f.problem})")
    state_fix = [f for f in findings if f.kind in ("damaged_state", "missing_release", "expired_lease")]
    if state_fix or any(f.kind == "damaged_manifest" for f in findings):
        for prod in _repair_state(reg, actor):
            touched.setdefault(prod, []).extend(f"{f.kind}: {f.problem}" for f in state_fix)
        for f in state_fix:
            f.repaired = True
    # a manifest moved aside leaves its artifact an orphan: look again after the repairs above
    seen = {f.key for f in findings}
    findings = findings + [f for f in orphan_findings(reg) if f.key not in seen]
    for f in findings:
        if f.kind == "tmp_file":
            _remove_orphan(reg, f)
            f.repaired = True
        elif f.kind == "orphan_artifact":
            _remove_orphan(reg, f)
    for rid, what in touched.items():
        if _valid_manifest(reg, rid):
            reg.append_event(rid, "doctor_repair", by=actor, repairs=what)
    return findings


def in_progress(reg: Registry) -> list[str]:
    """Live leases whose holder is a rollout in progress: not damage, left alone (one line each)."""
    from mlops.registry.lease import describe

    try:
        doc, _ = reg.read_doc()
    except Exception:  # noqa: BLE001 - an unreadable state is examine()'s finding
        return []
    states = doc.states if doc.legacy is None else {doc.owner or "default": doc.legacy}
    out = []
    for name, st in sorted(states.items()):
        rec = st.rollout
        if live(st.lease) and rec.get("status") == "running":
            out.append(
                f"rollout in progress: model {name}, {rec.get('id')} of {rec.get('release')} "
                f"({rec.get('phase')}, step {int(rec.get('step', 0)) + 1}/{len(rec.get('steps', []))}), "
                f"lease held by {describe(st.lease)} -> left alone (`mlops rollback` pre-empts it)"
            )
    return out
