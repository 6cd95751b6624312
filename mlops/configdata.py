"""mlops.yaml's data around validation: `${VAR}` expansion, `--set` overrides, and errors that
point back to `file:LINE` (or the `--set` flag) with a did-you-mean for unknown keys.

Independent of the models (the root model is a parameter), so `mlops.config` stays the schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from mlops import plugins
from mlops.errors import ConfigError
from mlops.redact import remember
from mlops.yamlload import Loc, load_yaml


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (for 'did you mean')."""
    cls: Any = root
    for part in loc:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        cls = _unwrap(ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    """dict[str, M] / list[M] / M | None -> M: the model a nested key lives in."""
    for _ in range(4):
        origin = get_origin(ann)
        if origin is dict:
            ann = get_args(ann)[1]
        elif origin is list:
            ann = get_args(ann)[0]
        elif origin is not None:
            models = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not models:
                return None
            ann = models[0]
        else:
            return ann
    return ann


def line_of(lines: dict[Loc, int], loc: Sequence[str | int], overridden: set[str]) -> str:
    """The line of `loc` in the file, or `--set a.b` when an override put it there."""
    path = tuple(str(p) if not isinstance(p, int) else p for p in loc)
    for i in range(len(path), 0, -1):
        dotted = ".".join(str(p) for p in path[:i])
        if dotted in overridden:
            return f"--set {dotted}"
        if path[:i] in lines:
            return str(lines[path[:i]])
    return str(lines.get((), 1))


def dotted(loc: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "json-or-python")))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, path: Loc, lines: dict[Loc, int], src: str) -> Any:
    if isinstance(data, dict):
        return {k: expand_env(v, (*path, str(k)), lines, src) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, (*path, i), lines, src) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data:

        def sub(m: re.Match[str]) -> str:
            val = os.environ.get(m.group(1), m.group(2))
            if val is None:
                raise ConfigError(
                    f"{src}:{lines.get(path, 1)}: {dotted(path)}: environment variable {m.group(1)} is not set"
                )
            if m.group(1) in os.environ:  # a default written in the file is no secret
                remember(val, m.group(1))
            return val

        return _ENV.sub(sub, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> set[str]:
    """`a.b.c=value` (value parsed as YAML) onto `data`; returns the dotted paths set."""
    done: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = re.sub(r"\[(\d+)\]", r".\1", key.strip())  # gates[0].min: the same as gates.0.min
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        # the same bounded loader as files (alias bombs, recursion, depth); its errors name the flag
        parsed = load_yaml(value, f"--set {key}")[0] if value.strip() else ""
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list) and p.isdigit():
                if int(p) >= len(node):
                    raise ConfigError(f"--set {key}: index {p} is out of range (the list has {len(node)} items)")
                node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a mapping")
            node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise ConfigError(f"--set {key}: parent is not a mapping")
        done.add(key)
    return done


def pydantic_error(
    root: type[BaseModel], e: ValidationError, src: str, lines: dict[Loc, int], overridden: set[str]
) -> ConfigError:
    """The first validation error as one line: `file:LINE: key.path: message`, with did-you-mean."""
    err = e.errors()[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    where = line_of(lines, loc, overridden)
    prefix = f"{src}:{where}" if not where.startswith("--set") else where
    if err["type"] == "extra_forbidden" and loc:
        key = str(loc[-1])
        owner = _model_at(root, _fields_only(root, loc[:-1]))
        hint = plugins.did_you_mean(key, owner.model_fields) if owner else ""
        return ConfigError(f"{prefix}: {dotted(loc)}: unknown key {key!r} {hint}".rstrip())
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "required key is missing"
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ConfigError(f"{prefix}: {dotted(loc) or '(top level)'}: {msg}{more}")


def _fields_only(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Walk a loc through the root model, keeping only model field names (dropping dict keys / indices)."""
    out: list[str] = []
    cls: Any = root
    expect_container = False
    for part in loc:
        if expect_container:
            expect_container = False
            continue
        if isinstance(cls, type) and issubclass(cls, BaseModel) and str(part) in cls.model_fields:
            out.append(str(part))
            ann = cls.model_fields[str(part)].annotation
            origin = get_origin(ann)
            if origin in (dict, list):
                expect_container = True
            cls = _unwrap(ann)
    return out
