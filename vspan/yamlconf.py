"""YAML loading that remembers where each value came from, so errors can name file and line.

``load(text, path)`` gives a ``Node``: a thin read-only view over the parsed value that knows
its line and its dotted field path (``vms[3].nics[0].mac``). Validators ask it for typed
fields and raise ``ConfigError`` naming the file, the line and the field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from vspan.errors import ConfigError
from vspan.wire.tunnel import DEFAULT_PORT

__all__ = ["Node", "load", "load_file", "parse_address"]

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's C parser when PyYAML was built with it (the wheels are), else pure Python."""


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML value with its origin."""

    value: Any
    """The plain Python value (dict, list, str, int, ...)."""
    yaml_node: yaml.Node
    path: str
    """The file the value came from."""
    field: str
    """Dotted field path from the document root ("" for the root)."""

    @property
    def line(self) -> int:
        """1-based line of the value."""
        return int(self.yaml_node.start_mark.line) + 1

    def error(self, message: str) -> ConfigError:
        """A ``ConfigError`` at this node."""
        return ConfigError(message, path=self.path, line=self.line, field=self.field or None)

    def _child_field(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.field}[{key}]"
        return f"{self.field}.{key}" if self.field else key

    def has(self, key: str) -> bool:
        """Whether a mapping has ``key``."""
        return isinstance(self.value, dict) and key in self.value

    def get(self, key: str) -> Node:
        """The child at ``key`` of a mapping (an error if the key is missing)."""
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {type(self.value).__name__}")
        assert isinstance(self.yaml_node, yaml.MappingNode)
        for knode, vnode in self.yaml_node.value:
            if knode.value == key:
                # The parsed mapping may hold the key as another type (``7:`` is an int).
                value = next(v for k, v in self.value.items() if str(k) == key)
                return Node(value, vnode, self.path, self._child_field(key))
        raise self.error(f"missing required field '{key}'")

    def keys(self) -> list[str]:
        """Keys of a mapping."""
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {type(self.value).__name__}")
        return [str(k) for k in self.value]

    def check_keys(self, allowed: set[str]) -> None:
        """Raise on a key outside ``allowed`` (a typo should not pass silently)."""
        assert isinstance(self.yaml_node, yaml.MappingNode) or not isinstance(self.value, dict)
        for key in self.keys():
            if key not in allowed:
                child = self.get(key)
                raise child.error(f"unknown field; expected one of {', '.join(sorted(allowed))}")

    def items(self) -> Iterator[Node]:
        """Children of a sequence."""
        if not isinstance(self.value, list):
            raise self.error(f"expected a list, got {type(self.value).__name__}")
        assert isinstance(self.yaml_node, yaml.SequenceNode)
        for i, (item, ynode) in enumerate(zip(self.value, self.yaml_node.value, strict=True)):
            yield Node(item, ynode, self.path, self._child_field(i))

    def as_str(self) -> str:
        """A non-empty string."""
        if not isinstance(self.value, str) or not self.value:
            raise self.error(f"expected a non-empty string, got {self.value!r}")
        return self.value

    def as_int(self, lo: int, hi: int) -> int:
        """An integer in ``lo..hi``."""
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error(f"expected an integer, got {self.value!r}")
        if not lo <= self.value <= hi:
            raise self.error(f"{self.value} out of range {lo}..{hi}")
        return self.value

    def as_mac(self) -> int:
        """A MAC address ``aa:bb:cc:dd:ee:ff`` (or with ``-``) as a 48-bit integer."""
        text = str(self.value)
        parts = text.replace("-", ":").split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise self.error(f"expected a MAC address like 52:54:00:12:34:56, got {text!r}")
        try:
            return int("".join(parts), 16)
        except ValueError:
            raise self.error(
                f"expected a MAC address like 52:54:00:12:34:56, got {text!r}"
            ) from None

    def as_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """An IPv4 or IPv6 address."""
        try:
            return ipaddress.ip_address(str(self.value))
        except ValueError:
            raise self.error(f"expected an IP address, got {self.value!r}") from None


def load(text: str, path: str) -> Node:
    """Parse one YAML document; syntax errors become ``ConfigError`` with the line."""
    try:
        ynode = yaml.compose(text, Loader=_LOADER)
        value = None if ynode is None else _LOADER(text).construct_document(ynode)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = None if mark is None else mark.line + 1
        raise ConfigError(f"YAML syntax: {exc.problem}", path=path, line=line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML: {exc}", path=path) from exc
    if ynode is None:
        raise ConfigError("the file is empty", path=path, line=1)
    return Node(value, ynode, path, "")


def load_file(path: str) -> Node:
    """Read and parse ``path``; I/O errors become ``ConfigError``."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from exc
    return load(text, path)


def parse_address(text: str, *, field: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; port 0: the kernel chooses) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"expected ADDR:PORT (e.g. 127.0.0.1:{DEFAULT_PORT}), got {text!r}", field=field
        )
    return host.strip("[]"), int(port)
