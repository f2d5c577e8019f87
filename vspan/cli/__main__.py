"""``python -m vspan.cli``: the ``vspan`` command."""

from vspan.cli import entry

entry()
