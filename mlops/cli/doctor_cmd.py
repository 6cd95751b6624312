"""`mlops doctor`: what is damaged in the registry, and (with --repair) repair what can be repaired."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mlops.cli.common import ConfigOpt, JsonOpt, SetOpt, emit, load_config
from mlops.errors import EXIT_INFRA


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        config: ConfigOpt = Path("mlops.yaml"),
        set_: SetOpt = None,
        json_: JsonOpt = False,
        repair: Annotated[bool, typer.Option("--repair", help="Apply the repairs (default: a dry run).")] = False,
        modal: Annotated[
            bool, typer.Option("--modal", help="Print the Modal environments and Secrets to set up instead.")
        ] = False,
        apply: Annotated[
            bool, typer.Option("--apply", help="With --modal: create them in --env, values from this shell.")
        ] = False,
        env: Annotated[
            str | None, typer.Option("--env", help="With --modal --apply: the environment (default: production's).")
        ] = None,
        pr_env: Annotated[str, typer.Option("--pr-env", help="With --modal: the PR environment's name.")] = "pr",
    ) -> None:
        """Check the registry: unreadable state, manifests, histories or evals, routing to a missing
        release, expired leases, orphans. A dry run unless --repair; exit 4 while damage remains.
        With --modal: the Modal environments (production's, the PRs') and their Secrets."""
        if modal or apply:
            modal_setup(config, set_, json_, apply, env, pr_env)
            return
        import getpass

        from mlops.registry.doctor import examine, in_progress
        from mlops.registry.doctor import repair as do_repair
        from mlops.registry.lease import owner_name
        from mlops.registry.releases import Registry
        from mlops.registry.store import open_store

        loaded = load_config(config, set_)
        reg = Registry(open_store(loaded.cfg.storage, base_dir=loaded.root))
        found = examine(reg)
        if repair and found:
            try:
                who = getpass.getuser()
            except (KeyError, OSError):
                who = "user"
            found = do_repair(reg, found, actor=f"doctor:{who}@{owner_name('cli').split('@')[1]}")
        left = [f for f in found if not f.repaired]
        lines = [f"{'repaired' if f.repaired else 'FOUND'}: {f.key}: {f.problem} -> {f.repair}" for f in found] or [
            f"{reg.store.uri}: no damage found"
        ]
        if found and not repair:
            lines.append("dry run: `mlops doctor --repair` applies the repairs above")
        running = in_progress(reg)  # not damage: a live lease a rollout holds
        lines += [f"NOTE: {line}" for line in running]
        emit(
            {
                "store": reg.store.uri,
                "repair": repair,
                "findings": [f.to_json() for f in found],
                "in_progress": running,
                "ok": not left,
            },
            json_,
            "\n".join(lines),
        )
        if left:
            raise typer.Exit(EXIT_INFRA)


def modal_setup(config: Path, set_: list[str] | None, json_: bool, apply: bool, env: str | None, pr_env: str) -> None:
    """`doctor --modal`: the `modal` commands (names only: each value comes from the operator's
    shell); with --apply, run them for one environment through the Modal seam (the twin too)."""
    import os

    from mlops.backends.modal_api import open_api
    from mlops.backends.modal_settings import ModalSettings
    from mlops.backends.modal_setup import apply as do_apply
    from mlops.backends.modal_setup import steps

    loaded = load_config(config, set_)
    s = ModalSettings.from_config(loaded.cfg, loaded.root)
    plan = steps(loaded.cfg, s, pr_env)
    if apply:
        target = env if env is not None else s.environment
        done = do_apply(open_api(s), loaded.cfg, s, target, os.environ)
        emit({"environment": target, "applied": done}, json_, "\n".join(done))
        return
    lines = []
    for e in dict.fromkeys(st.environment for st in plan):
        who = "production" if e == s.environment else "pull requests (its own values: never production's keys)"
        lines.append(f"# {e or 'the default environment'}: {who}")
        lines += [st.shell() for st in plan if st.environment == e]
    lines.append("# run them (values exported in this shell), or: mlops doctor --modal --apply [--env ENV]")
    if json_:
        emit({"steps": [{**st.__dict__, "names": list(st.names), "argv": st.argv()} for st in plan]}, json_)
    else:  # not through rich: a wrapped command line would not paste
        sys.stdout.write("\n".join(lines) + "\n")
