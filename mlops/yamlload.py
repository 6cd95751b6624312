"""Safe YAML that remembers where every key came from.

PyYAML's SafeLoader already refuses python tags; on top of it this rejects duplicate keys,
bounds alias expansion (billion-laughs), and records `key.path -> line` so every config error
can name `mlops.yaml:LINE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mlops.errors import ConfigError

MAX_NODES = 100_000  # far above any real config; an alias bomb expands past it in microseconds

Loc = tuple[str | int, ...]


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Loader(yaml.SafeLoader):
    pass


def _walk(loader: _Loader, node: yaml.Node, path: Loc, lines: dict[Loc, int], budget: list[int], src: str) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{src}:{node.start_mark.line + 1}: document expands past {MAX_NODES} nodes (alias bomb?)")
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_TAGS:
        # SafeLoader would refuse these when constructing; walking nodes ourselves, refuse them here
        raise ConfigError(
            f"{src}:{node.start_mark.line + 1}: {_fmt(path)}: tag {node.tag!r} is not allowed (no constructor)"
        )
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<` merge keys
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = _walk(loader, knode, path, {}, budget, src)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise ConfigError(f"{src}:{knode.start_mark.line + 1}: mapping keys must be scalars")
            if key in out:
                raise ConfigError(f"{src}:{knode.start_mark.line + 1}: {_fmt(path + (str(key),))}: duplicate key")
            child = (*path, str(key))
            lines[child] = knode.start_mark.line + 1
            out[key] = _walk(loader, vnode, child, lines, budget, src)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, v, (*path, i), lines, budget, src) for i, v in enumerate(node.value)]
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{src}:{node.start_mark.line + 1}: {_fmt(path)}: {_one_line(e.problem)}") from e


def _fmt(path: Loc) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _one_line(s: str | None) -> str:
    return " ".join((s or "invalid YAML").split())


def load_yaml(text: str, src: str) -> tuple[Any, dict[Loc, int]]:
    """Parse one YAML document; return (data, line of each key path)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[Loc, int] = {}
        return _walk(loader, node, (), lines, [MAX_NODES], src), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{src}:{line}: invalid YAML: {_one_line(e.problem or e.context)}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: invalid YAML: {_one_line(str(e))}") from e
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> tuple[Any, dict[Loc, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file (run from the project root or pass --config)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    return load_yaml(text, path.name if path.parent == Path.cwd() else str(path))
