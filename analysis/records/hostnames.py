"""Host names by collector_id: from the inventory, and from capture interface names."""

from __future__ import annotations

from dataclasses import dataclass

from vspan.inventory import InventoryView

__all__ = ["HostNames"]


@dataclass
class HostNames:
    """collector_id ↔ host name, from the inventory and from capture interface names."""

    names: dict[int, str]

    @classmethod
    def from_inventory(cls, inventory: InventoryView | None) -> HostNames:
        """Names of the inventory's hosts."""
        if inventory is None:
            return cls({})
        return cls({h.collector_id: h.name for h in inventory.hosts})

    def id_for(self, name: str) -> int:
        """The id of host ``name``, allocating one (above any collector's) when new."""
        for cid, known in self.names.items():
            if known == name:
                return cid
        cid = max([0xFFFF_0000, *self.names]) + 1
        self.names[cid] = name
        return cid

    def name(self, cid: int) -> str | None:
        """The name of ``cid``; None for 0 (unknown)."""
        if cid == 0:
            return self.names.get(0)
        return self.names.get(cid, f"collector-{cid}")
