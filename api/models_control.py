"""Request and response bodies of the control plane (``/api/v1/control``), in one place.

Requests are validated here: a bad field is a 422 whose ``detail`` names it. MACs travel as
text (``52:54:00:00:00:01``), UUIDs in canonical lower-case form. Each model converts to or
from the ``analysis.inventory_state`` values, so handlers stay one line of glue.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

from vspan.analysis.inventory.state import Heartbeat, InventorySnapshot, Migration, PortInfo
from vspan.inventory import MAX_VIF, Host, Vm, format_mac

__all__ = [
    "ConfigOut",
    "HeartbeatIn",
    "HeartbeatOut",
    "HostOut",
    "InventoryOut",
    "MigrationOut",
    "MigrationsOut",
    "NicOut",
    "PortIn",
    "ProfilesOut",
    "RegisterIn",
    "SessionsOut",
    "VmOut",
    "as_dicts",
    "parse_mac",
]

Vif = Annotated[int, Field(ge=1, le=MAX_VIF, description="virtual interface id 1..4095")]
Name = Annotated[str, Field(min_length=1, max_length=255)]
Reason = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
"""A drop reason: a label value of ``/metrics``, so short and plain."""
PortName = Annotated[str, Field(max_length=255)]
_TOTAL = (
    "SPAN sessions on the analyzer, for all hosts: while any exists, a collector mirrors only "
    "what its sessions select (nothing, when none selects its VMs)"
)


def parse_mac(text: str) -> int:
    """``52:54:00:00:00:01`` (or with ``-``) → 48-bit integer; ``ValueError`` otherwise."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"expected a MAC address like 52:54:00:12:34:56, got {text!r}")
    try:
        return int("".join(parts), 16)
    except ValueError:
        raise ValueError(f"expected a MAC address like 52:54:00:12:34:56, got {text!r}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PortIn(_Strict):
    """A VM port (vNIC) on the registering host."""

    name: str = Field("", max_length=255, description="interface name on the host (vnet3)")
    vif: Vif
    mac: str | None = Field(None, description="the VM's MAC on this vNIC; null when unknown")
    vm_name: Name
    vm_uuid: str | None = None
    profile: Name | None = Field(None, description="port-profile of the VM")
    ifindex: NonNegativeInt = 0
    bridge: str | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        return None if value is None else format_mac(parse_mac(value))

    @field_validator("vm_uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(uuidlib.UUID(value))
        except ValueError:
            raise ValueError(f"expected a UUID, got {value!r}") from None

    def to_port(self) -> PortInfo:
        """The port as ``InventoryState.register`` takes it."""
        mac = 0 if self.mac is None else parse_mac(self.mac)
        return PortInfo(self.vm_name, self.vif, mac, self.vm_uuid, self.profile, self.name)


class RegisterIn(_Strict):
    """``POST /collectors/{id}/register``: the host and all its VM ports (replaces the last)."""

    host: Name
    ports: list[PortIn] = Field(default_factory=list, max_length=MAX_VIF)

    @model_validator(mode="after")
    def _unique(self) -> RegisterIn:
        vifs: dict[int, str] = {}
        macs: dict[str, str] = {}
        for port in self.ports:
            label = port.name or port.vm_name
            if port.vif in vifs:
                raise ValueError(f"vif {port.vif} used by ports {vifs[port.vif]} and {label}")
            if port.mac is not None and port.mac in macs:
                raise ValueError(f"MAC {port.mac} used by ports {macs[port.mac]} and {label}")
            vifs[port.vif] = label
            if port.mac is not None:
                macs[port.mac] = label
        return self

    def to_ports(self) -> list[PortInfo]:
        """The ports as ``InventoryState.register`` takes them."""
        return [p.to_port() for p in self.ports]


class ConfigOut(BaseModel):
    """What a registered collector is to apply: sessions and port-profiles for its VMs."""

    collector_id: int
    host: str
    vms: int = Field(description="VMs the analyzer now places on this host")
    sessions: list[dict[str, Any]]
    sessions_total: int = Field(0, description=_TOTAL)
    profiles: list[dict[str, Any]]


_DELIBERATE = frozenset({"duplicates", "unselected", "filtered", "sampled_out"})
"""Reasons of an older collector's ``dropped`` that are not losses (``not_mirrored``)."""


class HeartbeatIn(_Strict):
    """``POST /collectors/{id}/heartbeat``: capture counters (monotonic) at ``time``.

    Collectors older than issue 17 sent ``kernel_drops``, ``sampled_out`` and ``dropped``
    (losses and frames left out on purpose mixed): they are still accepted, and sorted into
    ``drops`` and ``not_mirrored``.
    """

    time: float = Field(description="the collector's clock, seconds since the epoch")
    frames: NonNegativeInt = Field(0, description="frames captured on the VM ports")
    bytes: NonNegativeInt = 0
    truncated: NonNegativeInt = Field(0, description="frames sent cut to the snap length")
    exported: NonNegativeInt | None = Field(None, description="frames mirrored to an analyzer")
    waiting: NonNegativeInt = Field(0, description="frames exported, not yet sent")
    drops: dict[Reason, NonNegativeInt] = Field(
        default_factory=dict, max_length=32,
        description="frames lost, by cause: kernel (capture ring full), runts, queue_full, "
        "send_error, stopped, unsent",
    )  # fmt: skip
    not_mirrored: dict[Reason, NonNegativeInt] = Field(
        default_factory=dict, max_length=32,
        description="frames left out on purpose, by reason: duplicates (intra-host delivery "
        "copies), unselected, filtered, sampled_out",
    )  # fmt: skip
    per_port: dict[PortName, NonNegativeInt] = Field(
        default_factory=dict, max_length=MAX_VIF, description="frames"
    )
    kernel_drops: NonNegativeInt = Field(0, description="older collectors: drops.kernel")
    sampled_out: NonNegativeInt = Field(0, description="older collectors: sampled out")
    dropped: dict[Reason, NonNegativeInt] = Field(
        default_factory=dict, max_length=32, description="older collectors: both kinds"
    )

    def to_heartbeat(self, received: float) -> Heartbeat:
        """The heartbeat as the inventory state keeps it (older fields sorted out)."""
        drops, not_mirrored = dict(self.drops), dict(self.not_mirrored)
        legacy = {**self.dropped, "kernel": self.kernel_drops, "sampled_out": self.sampled_out}
        for reason, n in legacy.items():
            if n:
                into = not_mirrored if reason in _DELIBERATE else drops
                into[reason] = into.get(reason, 0) + n
        return Heartbeat(
            time=self.time, received=received, frames=self.frames, bytes=self.bytes,
            truncated=self.truncated, exported=self.exported, waiting=self.waiting,
            drops=drops, not_mirrored=not_mirrored, per_port=dict(self.per_port),
        )  # fmt: skip


class HeartbeatOut(BaseModel):
    """A heartbeat was kept."""

    collector_id: int
    received: float


class SessionsOut(BaseModel):
    """The SPAN sessions that concern a collector's VMs (``vspan.sessions``)."""

    sessions: list[dict[str, Any]]
    sessions_total: int = Field(0, description=_TOTAL)
    registered: bool = Field(
        True,
        description="whether the collector registered with this analyzer since it started "
        "(false: a host of the inventory file that must register its ports again)",
    )


class ProfilesOut(BaseModel):
    """The port-profiles bound to a collector's VMs."""

    profiles: list[dict[str, Any]]


class HostOut(BaseModel):
    """A host of the inventory."""

    name: str
    collector_id: int
    registered: float | None = Field(description="last registration; null: from the file")


class NicOut(BaseModel):
    """A vNIC: its MAC and vif on the VM's host."""

    mac: str
    vif: int
    ips: list[str]


class VmOut(BaseModel):
    """A VM running now."""

    name: str
    uuid: str | None
    host: str
    profile: str | None
    nics: list[NicOut]

    @classmethod
    def of(cls, vm: Vm) -> VmOut:
        """The VM as JSON."""
        nics = [NicOut(mac=format_mac(n.mac), vif=n.vif, ips=list(n.ips)) for n in vm.nics]
        return cls(name=vm.name, uuid=vm.uuid or None, host=vm.host, profile=vm.profile, nics=nics)


class InventoryOut(BaseModel):
    """``GET /inventory``: hosts, and the VMs running now with their vifs and host."""

    hosts: list[HostOut]
    vms: list[VmOut]

    @classmethod
    def of(cls, snapshot: InventorySnapshot, registered: Mapping[int, float]) -> InventoryOut:
        """The snapshot as JSON."""
        hosts = [_host(h, registered.get(h.collector_id)) for h in snapshot.hosts]
        return cls(hosts=hosts, vms=[VmOut.of(v) for v in snapshot.present_vms()])


def _host(host: Host, registered: float | None) -> HostOut:
    return HostOut(name=host.name, collector_id=host.collector_id, registered=registered)


class MigrationOut(BaseModel):
    """A VM that appeared behind a different host."""

    time: float
    vm_uuid: str | None
    vm_name: str
    from_host: str
    to_host: str
    source: str = Field(description="inventory (a registration) or dataplane (traffic)")


class MigrationsOut(BaseModel):
    """``GET /migrations``: oldest first."""

    migrations: list[MigrationOut]

    @classmethod
    def of(cls, migrations: Iterable[Migration]) -> MigrationsOut:
        """Migrations as JSON."""
        return cls(
            migrations=[
                MigrationOut(
                    time=m.time,
                    vm_uuid=m.vm_uuid,
                    vm_name=m.vm_name,
                    from_host=m.from_host,
                    to_host=m.to_host,
                    source=str(m.source),
                )
                for m in migrations
            ]
        )


def as_dicts(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Provider output (sessions, profiles) as plain JSON objects."""
    return [dict(item) for item in items]
