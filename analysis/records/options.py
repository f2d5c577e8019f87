"""Choices of the command line, kept apart so that building the parser imports nothing heavy."""

from __future__ import annotations

from typing import Final

__all__ = ["FORMATS", "GROUPINGS", "SORTS"]

GROUPINGS: Final = ("flow", "vm", "vm-pair", "host-pair", "protocol")
"""``--by`` of ``vspan report``."""
SORTS: Final = ("bytes", "packets", "flows")
"""``--sort`` of ``vspan report``."""
FORMATS: Final = ("table", "csv", "json", "parquet")
"""``--format`` of the commands that print tables."""
