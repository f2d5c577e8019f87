"""Persistent vif numbers: each port identity keeps its vif 1..4095 across restarts.

A vif is what the VN-Tag carries (12-bit ``svif``), so the analyzer's view of a VM hangs on
it: the number must not change when the collector restarts, and a VM whose port comes back
(reboot, migration back to this host) gets its old number again. ``VifTable`` keeps the
assignment in a JSON file in a state directory, rewritten atomically (temporary file,
``fsync``, ``os.replace``) whenever it changes.

Identity of a port (``port_identity``): ``vm:<uuid>/<mac>`` when the port's VM UUID and MAC
are known, else ``iface:<iface-id>`` when the vswitch gives the interface an id, else
``port:<name>``. Rules of ``VifTable.assign``:

- an explicit vif (from the static inventory file) wins: whoever held that number before
  loses it and is given a new one;
- a known identity keeps its vif; a new one gets the lowest free vif;
- entries are never forgotten while there is room; when all 4095 are taken, the entry
  seen least recently among those not present now is reclaimed; when all 4095 are present
  at once, ``VifsExhaustedError``.

"Seen" is a generation counter bumped by every ``assign`` call (no clock is read).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vspan.errors import ConfigError, VspanError
from vspan.inventory import MAX_VIF, Port

__all__ = ["STATE_VERSION", "VifTable", "VifsExhaustedError", "port_identity"]

STATE_VERSION: Final = 1
"""``version`` field of the state file."""


class VifsExhaustedError(VspanError):
    """More than 4095 port identities are present at once on one host."""


def port_identity(port: Port) -> str:
    """The key a port's vif is stored under: VM UUID + MAC, else the interface id, else the
    port name."""
    if port.vm_uuid and port.mac:
        return f"vm:{port.vm_uuid.lower()}/{port.mac:012x}"
    if port.iface_id:
        return f"iface:{port.iface_id}"
    return f"port:{port.name}"


@dataclass(slots=True)
class _Entry:
    vif: int
    """The assigned vif."""
    seen: int
    """Generation of the last ``assign`` call that listed this identity."""


class VifTable:
    """vif per port identity, persisted as ``<state_dir>/<filename>``.

    The constructor only stores; the file is read on first use. ``assign`` is the one
    mutating call; ``lookup`` and ``snapshot`` read.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, filename: str = "vifs.json") -> None:
        self.path = Path(state_dir) / filename
        self._entries: dict[str, _Entry] | None = None
        self._generation = 0
        self.writes = 0
        """Times the state file was rewritten."""

    # --- reading ------------------------------------------------------------------------

    def lookup(self, identity: str) -> int | None:
        """The vif stored for ``identity``, or None."""
        entry = self._table().get(identity)
        return None if entry is None else entry.vif

    def snapshot(self) -> dict[str, int]:
        """Every stored identity and its vif."""
        return {key: entry.vif for key, entry in self._table().items()}

    def __len__(self) -> int:
        return len(self._table())

    # --- assigning ----------------------------------------------------------------------

    def assign(self, wanted: Sequence[tuple[str, int | None]]) -> dict[str, int]:
        """vifs for the identities present now, each with its explicit vif or None.

        Raises ``ConfigError`` when an identity is listed twice, an explicit vif is out of
        range or claimed twice; ``VifsExhaustedError`` when more than 4095 are present.
        """
        table = self._table()
        explicit: dict[int, str] = {}
        present: dict[str, int | None] = {}
        for identity, vif in wanted:
            if identity in present:
                raise ConfigError(f"port identity {identity!r} listed twice")
            present[identity] = vif
            if vif is None:
                continue
            if not 1 <= vif <= MAX_VIF:
                raise ConfigError(f"{identity}: explicit vif {vif} out of range 1..{MAX_VIF}")
            if vif in explicit:
                raise ConfigError(f"vif {vif} claimed by both {explicit[vif]!r} and {identity!r}")
            explicit[vif] = identity
        if len(present) > MAX_VIF:
            raise VifsExhaustedError(f"{len(present)} ports present, only {MAX_VIF} vifs exist")
        before = self.snapshot()
        self._generation += 1
        holder = {entry.vif: key for key, entry in table.items()}
        for vif, identity in explicit.items():
            previous = holder.get(vif)
            if previous is not None and previous != identity:
                del table[previous]  # the explicit claim wins; the old holder gets a new vif
            old = table.get(identity)
            if old is not None and old.vif != vif:
                holder.pop(old.vif, None)
            table[identity] = _Entry(vif, self._generation)
            holder[vif] = identity
        for identity, vif in present.items():
            if vif is None and identity in table:
                table[identity].seen = self._generation
        free = iter(sorted(set(range(1, MAX_VIF + 1)) - set(holder)))
        for identity, vif in present.items():
            if vif is None and identity not in table:
                number = next(free, None)
                if number is None:
                    number = self._reclaim(table, present)
                table[identity] = _Entry(number, self._generation)
        result = {identity: table[identity].vif for identity in present}
        if self.snapshot() != before or not self.path.exists():
            self._save(table)
        return result

    def _reclaim(self, table: dict[str, _Entry], present: dict[str, int | None]) -> int:
        """Free the vif of the least recently seen identity not present now."""
        absent = [(entry.seen, key) for key, entry in table.items() if key not in present]
        if not absent:  # pragma: no cover - excluded by the count check in assign
            raise VifsExhaustedError(f"all {MAX_VIF} vifs are held by ports present now")
        _, key = min(absent)
        return table.pop(key).vif

    # --- persistence --------------------------------------------------------------------

    def _table(self) -> dict[str, _Entry]:
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def _load(self) -> dict[str, _Entry]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", path=str(self.path)) from exc
        try:
            doc = json.loads(text)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {STATE_VERSION}")
            self._generation = int(doc["generation"])
            entries: dict[str, _Entry] = {}
            seen_vifs: set[int] = set()
            for row in doc["vifs"]:
                key, vif, seen = str(row["identity"]), int(row["vif"]), int(row["seen"])
                if not 1 <= vif <= MAX_VIF or vif in seen_vifs or key in entries:
                    raise ValueError(f"bad or duplicate entry {row!r}")
                seen_vifs.add(vif)
                entries[key] = _Entry(vif, seen)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"corrupt vif state ({exc}); fix or remove the file (vifs will be renumbered)",
                path=str(self.path),
            ) from exc
        return entries

    def _save(self, table: dict[str, _Entry]) -> None:
        rows = [
            {"identity": key, "vif": entry.vif, "seen": entry.seen}
            for key, entry in sorted(table.items(), key=lambda item: item[1].vif)
        ]
        doc = {"version": STATE_VERSION, "generation": self._generation, "vifs": rows}
        data = json.dumps(doc, indent=1).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.writes += 1
