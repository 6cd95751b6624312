"""Registry commands: releases, history, rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, ModelOpt, SetOpt, emit, load_config, out, say_fn


def _session(config: Path, set_: list[str] | None, json_: bool, model: str | None = None) -> Any:
    from mlops.flows.session import Session

    return Session.open(load_config(config, set_), say=say_fn(json_), model=model)


def register(app: typer.Typer) -> None:
    @app.command()
    def releases(
        config: ConfigOpt = Path("mlops.yaml"), set_: SetOpt = None, json_: JsonOpt = False, model: ModelOpt = None
    ) -> None:
        """Releases of a deployed model newest first, with their stage and status."""
        from rich.table import Table

        s = _session(config, set_, json_, model)
        st, _ = s.registry.read_state()
        # the table reads the index alone (--json keeps its shape: each manifest with its history),
        # and the few manifests the stages name, so a damaged one is named here (exit 4, see doctor)
        for rid in sorted(st.referenced()):
            s.registry.manifest(rid)
        several = len(s.loaded.raw.get("deploy", {}).get("models") or {}) > 1
        items = [m for m in s.registry.list(full=json_) if not several or m.get("model") == s.model]
        doc = {
            **{k: st.stages.get(k) for k in ("production", "previous", "candidate", "canary")},
            "routing": st.routing,
            "state_version": st.version,
            "releases": items,
        }
        if json_:
            emit(doc, True)
            return
        stage_of = {v: k for k, v in st.stages.items() if v}
        t = Table("release", "stage", "status", "traffic", "created", "exact/metrics", "git")
        for m in items:
            ev = m.get("summary")
            metrics = "; ".join(
                f"{k}: " + ", ".join(f"{n} {v:.3g}" for n, v in d.items()) for k, d in (ev or {}).items()
            )
            t.add_row(
                m["id"],
                stage_of.get(m["id"], ""),
                m["status"],
                f"{st.routing.get(m['id'], 0)}%",
                (m.get("created_at") or "")[:19],
                metrics,
                str(m.get("git_sha") or "")[:12],
            )
        out.print(t)

    @app.command()
    def history(
        release: Annotated[str, typer.Argument(help="A release id.")],
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        model: ModelOpt = None,
    ) -> None:
        """Every decision about a release: step, metric values, verdict, who or what decided."""
        from rich.table import Table

        from mlops.flows.session import Session

        loaded = load_config(config, set_)
        # a release id names its model: --model is only checked, never needed
        s = Session.open(loaded, say=say_fn(json_), model=model or loaded.cfg.deploy.names[0])
        s.registry.require(release)
        events = s.registry.history(release)
        if json_:
            emit({"release": release, "history": events}, True)
            return
        t = Table("at", "event", "by", "detail")
        for e in events:
            d = e.get("detail", {})
            if e["event"] == "canary_step":
                c = d.get("candidate", {})
                step = f"shadow {d.get('shadow_share', 0):.0%}" if d.get("mode") == "shadow" else f"{d.get('percent')}%"
                agree = f", agree {d['agreement']:.0%}" if "agreement" in d else ""
                detail = (
                    f"{step}: {int(c.get('requests', 0))} req, err {c.get('error_rate', 0):.1%}, "
                    f"p95 {c.get('p95', 0) * 1000:.1f} ms{agree} -> {'pass' if d.get('passed') else 'FAIL ' + '; '.join(d.get('reasons', []))}"
                )
            elif "gates" in d:
                detail = "; ".join(f"{g['name']} {'pass' if g['passed'] else 'FAIL'}" for g in d["gates"])
            else:
                detail = ", ".join(f"{k}={v}" for k, v in d.items())
            t.add_row(e["at"][:23], e["event"], e["by"], detail)
        out.print(t)

    @app.command()
    def rollback(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        to: Annotated[
            str | None, typer.Option("--to", help="Release to serve (default: the previous production).")
        ] = None,
        reason: Annotated[str, typer.Option(help="Why; recorded in the release history.")] = "manual rollback",
        model: ModelOpt = None,
    ) -> None:
        """Route all traffic to an earlier release after checking its artifact (sha256) and that it loads."""
        from mlops.cli.rollback_fast import actor
        from mlops.config import owner
        from mlops.flows.release import rollback_release
        from mlops.flows.session import Session

        # the plain forms of this command run without Typer (mlops/cli/rollback_fast.py); keep both alike
        loaded = load_config(config, set_)
        if model is None and to is not None:  # a release id names its model
            model = owner(loaded.cfg.deploy.names, to)
        s = Session.open(loaded, say=say_fn(json_), model=model)
        res = rollback_release(s, to, reason, actor())
        emit(res.model_dump(mode="json"), json_, f"production is now {res.production} (was {res.rolled_back_from})")
