"""`mlops doctor`: what is damaged in the registry, and (with --repair) repair what can be repaired."""

from __future__ import annotations

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
    ) -> None:
        """Check the registry: unreadable state, manifests, histories or evals, routing to a missing
        release, expired leases, orphans. A dry run unless --repair; exit 4 while damage remains."""
        import getpass

        from mlops.registry.doctor import examine
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
        emit(
            {"store": reg.store.uri, "repair": repair, "findings": [f.to_json() for f in found], "ok": not left},
            json_,
            "\n".join(lines),
        )
        if left:
            raise typer.Exit(EXIT_INFRA)
