"""The JSON shapes of the view routers (hosts, VMs, top, matrix, sessions), in one place.

Rows come from ``analysis.views`` as JSON values already (times ISO 8601 UTC); the models
fix and document their fields for the OpenAPI schema and validate what leaves the API.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HostRow",
    "HostsOut",
    "MatrixOut",
    "MatrixRow",
    "SessionOut",
    "SessionsListOut",
    "TopOut",
    "TopRow",
    "VifRow",
    "VmDetailOut",
    "VmRow",
    "VmsOut",
]


class HostRow(BaseModel):
    """One host and the traffic of the flows it is on."""

    name: str
    collector_id: int
    vms: int = Field(description="VMs on the host now")
    flows: int
    bytes: int = Field(description="both directions of its flows")
    packets: int
    intra_bytes: int = Field(description="of flows between two VMs of this host")
    cross_bytes: int = Field(description="of flows between this host and another")
    intra_packets: int
    cross_packets: int


class HostsOut(BaseModel):
    hosts: list[HostRow]


class VifRow(BaseModel):
    vif: int = Field(description="virtual interface id on the VM's host")
    mac: str
    ips: list[str]


class VmRow(BaseModel):
    """A VM of the inventory and its traffic."""

    name: str
    uuid: str | None = Field(description="null: the VM has none (found behind a Linux bridge)")
    host: str
    profile: str | None
    vifs: list[VifRow]
    flows: int
    bytes: int
    packets: int


class VmsOut(BaseModel):
    vms: list[VmRow]


class HostStay(BaseModel):
    time: float = Field(description="epoch seconds the VM was placed on the host")
    host: str


class Peer(BaseModel):
    vm: str
    bytes: int
    flows: int


class Traffic(BaseModel):
    flows: int
    bytes: int
    packets: int
    bytes_sent: int
    bytes_received: int
    intra_bytes: int
    cross_bytes: int
    peers: list[Peer] = Field(description="the 10 largest peers by bytes")


class VmDetailOut(BaseModel):
    """One VM: vifs, host history, profile, traffic, latest flows, policy hits, migrations."""

    name: str
    uuid: str | None = Field(description="null: the VM has none (found behind a Linux bridge)")
    host: str
    profile: str | None
    vifs: list[VifRow]
    host_history: list[HostStay]
    traffic: Traffic
    flows: list[dict[str, Any]] = Field(description="latest flows, as GET /flows rows")
    policy_hits: list[dict[str, Any]]
    migrations: list[dict[str, Any]]


class TopRow(BaseModel):
    """A VM (``name``) or an unordered pair (``a`` < ``b``) and its traffic."""

    name: str | None = None
    a: str | None = None
    b: str | None = None
    flows: int
    bytes: int
    packets: int


class TopOut(BaseModel):
    by: str
    metric: str
    top: list[TopRow]


class MatrixRow(BaseModel):
    time: int = Field(description="start of the bin, epoch seconds")
    src: str
    dst: str
    flows: int
    bytes: int
    packets: int
    intra_bytes: int
    cross_bytes: int
    intra_packets: int
    cross_packets: int


class MatrixOut(BaseModel):
    level: str
    bin: int = Field(description="seconds per bin")
    cells: list[MatrixRow]


class SessionOut(BaseModel):
    """A SPAN session: the fields of ``vspan.sessions``."""

    model_config = ConfigDict(extra="allow")
    name: str


class SessionsListOut(BaseModel):
    sessions: list[SessionOut]
