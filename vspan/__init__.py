"""vspan: traffic visibility and remote SPAN for virtualized datacenters."""

from vspan.errors import (
    CaptureFileError,
    ConfigError,
    DecodeError,
    MalformedError,
    PolicyError,
    TruncatedError,
    TunnelError,
    UnsupportedError,
    VspanError,
)

__version__ = "0.1.0"

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
    "__version__",
]
