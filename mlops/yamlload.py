"""Safe YAML that remembers where every key came from.

PyYAML's SafeLoader already refuses python tags; on top of it this rejects duplicate keys,
bounds alias expansion (billion-laughs), recursive aliases, nesting depth, NUL bytes and the
file's size (read at most MAX_BYTES + 1 bytes, whatever stat says: /dev/zero or a sparse file
costs nothing), and records `key.path -> line` so every config error can name `mlops.yaml:LINE`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

import yaml

from mlops.errors import ConfigError

MAX_NODES = 100_000  # far above any real config; an alias bomb expands past it in microseconds
MAX_BYTES = 1 << 20  # a real mlops.yaml is a few KB; 1 MiB is generous and cheap to hold
MAX_DEPTH = 64  # real configs nest < 10 deep; PyYAML's composer recurses, so bound it first

Loc = tuple[str | int, ...]


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Loader(yaml.SafeLoader):
    src = "config"
    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.src}:{mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _walk(loader: _Loader, node: yaml.Node, path: Loc, lines: dict[Loc, int], budget: list[int], src: str) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{src}:{node.start_mark.line + 1}: document expands past {MAX_NODES} nodes (alias bomb?)")
    if len(path) > MAX_DEPTH:  # an alias inside its own anchor (`&x [*x]`) is a cycle, not a deep file
        raise ConfigError(
            f"{src}:{node.start_mark.line + 1}: {_fmt(path[:4])}…: recursive alias (an anchor refers to itself)"
        )
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
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(f"{src}:{line}: NUL byte in the file (not a text config)")
    loader = _Loader(text)
    loader.src = src
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
    except RecursionError as e:  # a safety net behind the depth bounds above
        raise ConfigError(f"{src}: nested too deeply to read") from e
    finally:
        loader.dispose()


def read_bounded(path: Path, limit: int = MAX_BYTES) -> bytes:
    """At most `limit` + 1 bytes: the size is learned by reading, never from stat (which says 0 for
    /dev/zero and 1 GB for a sparse file). O_NONBLOCK keeps open() of a FIFO from hanging."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_yaml_file(path: Path) -> tuple[Any, dict[Loc, int]]:
    try:
        data = read_bounded(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file (run from the project root or pass --config)") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: too large for a config (over {MAX_BYTES // 1024} KiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from e
    return load_yaml(text, path.name if path.parent == Path.cwd() else str(path))
