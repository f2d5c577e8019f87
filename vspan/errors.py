"""The one exception tree of vspan.

::

    VspanError
     ├── DecodeError            malformed input bytes (frames, tags, messages)
     │    ├── TruncatedError     the bytes end before a layer is complete
     │    ├── MalformedError     the bytes are there but contradict the format
     │    ├── UnsupportedError   valid but outside what vspan decodes
     │    └── TunnelError        a tunnel message rejected whole, with a reason code
     ├── CaptureFileError       a capture file that cannot be read (file, byte offset)
     └── ConfigError            a bad configuration (file, line, field)
          └── PolicyError        a bad port-profile or ACL rule

Decoders raise only ``DecodeError`` (and its subclasses) for bad input; any other
exception escaping a decoder is a bug. Foreign errors are wrapped at the boundary with
``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "CaptureFileError",
    "ConfigError",
    "DecodeError",
    "MalformedError",
    "PolicyError",
    "TruncatedError",
    "TunnelError",
    "UnsupportedError",
    "VspanError",
]


class VspanError(Exception):
    """Base class of every error vspan raises on purpose."""


class DecodeError(VspanError):
    """Input bytes that cannot be decoded."""


class TruncatedError(DecodeError):
    """The input ends before the layer being decoded is complete."""


class MalformedError(DecodeError):
    """The input contradicts the format it claims to be."""


class UnsupportedError(DecodeError):
    """Well-formed input that vspan does not decode."""


class TunnelError(DecodeError):
    """A tunnel message rejected whole.

    ``reason`` is the counter name of ``spec/tunnel.md``: ``bad_magic``, ``bad_version``,
    ``bad_flags``, ``bad_length``, ``bad_collector``, ``bad_record``, ``bad_auth``,
    ``unknown_collector``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class CaptureFileError(VspanError):
    """A capture file that cannot be read past ``offset``."""

    def __init__(self, path: str, offset: int, message: str) -> None:
        super().__init__(f"{path}: at byte offset {offset}: {message}")
        self.path = path
        self.offset = offset


class ConfigError(VspanError):
    """A configuration file or value that is wrong; names the file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = path if line is None else f"{path}:{line}"
        if field is not None:
            where = f"{where}: {field}" if where else field
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.line = line
        self.field = field


class PolicyError(ConfigError):
    """A port-profile or ACL rule that does not validate."""
