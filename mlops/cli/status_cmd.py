"""`mlops status`: where every deployed model's rollout stands (the controller's record)."""

from __future__ import annotations

from pathlib import Path

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, SetOpt, emit, load_config


def register(app: typer.Typer) -> None:
    @app.command()
    def status(config: ConfigOpt = Path("mlops.yaml"), set_: SetOpt = None, json_: JsonOpt = False) -> None:
        """Every deployed model: production, routing, and its rollout (step, verdicts, guardrail
        bake, lease holder), or the last finished one."""
        from mlops.flows.session import Session
        from mlops.registry import rollouts
        from mlops.rollout_start import where

        loaded = load_config(config, set_)
        models = {}
        lines = []
        for name in loaded.cfg.deploy.names:
            s = Session.open(loaded, model=name)
            st, _ = s.registry.read_state()
            last = next(iter(rollouts.history(s.registry, name)), None)
            models[name] = {
                **{k: st.stages.get(k) for k in ("production", "previous", "canary")},
                "routing": st.routing,
                "rollout": st.rollout or None,
                "lease": st.lease or None,
                "last_rollout": last,
                "experiment": st.experiment or None,  # an A/B experiment (mlops experiment status)
            }
            routing = ", ".join(f"{r} {w}%" for r, w in st.routing.items()) or "none"
            lines.append(f"{name}: production {st.stages.get('production')}; routing {routing}")
            lines.append(f"  {where(st)}")
            for v in (st.rollout or {}).get("verdicts", []):
                what = f"step {v.get('step')} ({v.get('percent')}%)"
                if v.get("mode") == "shadow":
                    what = f"shadow ({v.get('shadow_share', 0):.0%} mirrored, agreement {v.get('agreement', 0):.0%})"
                lines.append(
                    f"  {what}: {v.get('verdict')}"
                    + (f": {'; '.join(v.get('reasons', []))}" if v.get("reasons") else "")
                )
            if last and not st.rollout:
                lines.append(f"  last: {where(type(st)(rollout=last))}")
            ex = st.experiment
            if ex and ex.get("status", "running") == "running":
                lines.append(
                    f"  experiment {ex.get('id')}: {ex.get('share')}% of users to {ex.get('release')} against "
                    f"{ex.get('baseline')}, metric {ex.get('metric')} (mlops experiment status)"
                )
        emit({"models": models}, json_, "\n".join(lines))
