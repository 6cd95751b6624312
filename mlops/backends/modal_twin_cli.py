"""The twin's `modal` command line (`python -m mlops.backends.modal_twin ...`, see modal_twin.py):
`secret create`, `environment create|list`, `deploy`, `app list|stop`, `stop-all`, `proxy-token create`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mlops.backends.modal_settings import TWIN_ENV, ModalSettings, current_settings
from mlops.errors import InfraError


def app_name(script: Path, settings: ModalSettings) -> str:
    """The app a `functions/<x>.py` defines, named as the module does (for `deploy` without --name)."""
    apps = {"train": settings.train_app, "gateway": settings.gateway_app, "evaluate": settings.eval_app}
    return apps.get(script.stem, settings.serve_app(""))


def twin_from_env(twin: Any) -> Any:
    root = os.environ.get(TWIN_ENV)
    if not root:
        raise SystemExit(f"set {TWIN_ENV} to the twin's directory")
    return twin(Path(root), current_settings())


def _options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional words, and the `--flag value` / `--flag` options of a `modal ...` command line."""
    words: list[str] = []
    opts: dict[str, str] = {}
    it = iter(argv)
    for a in it:
        if a in ("--env", "--name", "--from-json"):
            opts[a[2:]] = next(it, "")
        elif a.startswith("--"):
            opts[a[2:]] = "1"
        else:
            words.append(a)
    return words, opts


def main(argv: list[str], twin: Any, usage: str) -> int:
    """The twin's side of `modal secret create`, `modal environment create|list`, `modal deploy`,
    `modal app list|stop`. `twin` is modal_twin.TwinAPI, handed in by its `__main__` so that this
    module does not import modal_twin back (one direction: tests/test_layers.py forbids cycles)."""
    import dataclasses

    words, opts = _options(argv)
    cmd = words[:2]
    api = twin_from_env(twin)
    if "env" in opts:
        api = twin(api.root, dataclasses.replace(api.settings, environment=opts["env"]))
    try:
        if cmd == ["secret", "create"] and len(words) >= 3:
            values = dict(kv.split("=", 1) for kv in words[3:])
            if "from-json" in opts:
                values |= json.loads(Path(opts["from-json"]).read_text())
            api.secret_create(words[2], values, force="force" in opts)
        elif cmd == ["secret", "list"]:
            print(json.dumps([{"name": n} for n in api.secret_names()]))
        elif cmd == ["environment", "create"] and len(words) >= 3:
            api.environment_create(words[2])
        elif cmd == ["environment", "list"]:
            # modal 1.6.4's columns (modal/cli/environment.py `list_`), in snake_case
            rows = [
                {"name": e, "web_suffix": "", "image_builder_version": None, "active": str(e == api.environment)}
                for e in api.environments()
            ]
            print(json.dumps(rows))
        elif cmd[:1] == ["deploy"] and len(words) >= 2:
            script = Path(words[1])
            name = opts.get("name") or app_name(script, api.settings)
            api.deploy(script, name, {})
            print(f"deployed {name} {api._apps()[name].get('url', '')}".strip())
        elif cmd == ["app", "list"]:
            if "json" in opts:
                print(json.dumps(api.app_list_json()))
            else:
                for name, app in sorted(api._apps().items()):
                    print(name, app.get("url", ""))
        elif cmd == ["app", "stop"] and len(words) >= 3:
            api.stop(words[-1])
        elif cmd == ["stop-all"]:
            api.stop_all()
        elif cmd == ["proxy-token", "create"]:
            key, secret = api.proxy_token_create()
            print(f"MLOPS_PROXY_TOKEN_ID={key} MLOPS_PROXY_TOKEN_SECRET={secret}")
        else:
            print(usage, file=sys.stderr)
            return 1
    except InfraError as e:
        print(f"Error: {e.headline}", file=sys.stderr)
        return 1
    return 0
