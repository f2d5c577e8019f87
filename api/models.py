"""Response bodies of the read API (``/api/v1``), in one place.

A row model per resource, its fields in the order and under the names of the query's columns
(``analysis.queries``: ``FLOW_COLUMNS`` — the flow record's ``RECORD_COLUMNS`` then what the
store adds —, ``HIT_COLUMNS``, ``MIGRATION_COLUMNS``, ``COLLECTOR_COLUMNS``). Rows are the
JSON that ``vspan report --format json`` writes (``queries.json_rows``): times as ISO 8601
UTC text with microseconds, null for a missing value. ``extra="forbid"`` makes a column the
model does not know an error, so the models and the queries cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, Self, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from vspan.analysis.store.queries import FlowPage, json_rows

__all__ = [
    "CaptureOut",
    "CollectorRow",
    "CollectorsOut",
    "FlowRow",
    "FlowsOut",
    "HealthOut",
    "MigrationHistoryOut",
    "MigrationRow",
    "PolicyHitRow",
    "PolicyHitsOut",
    "ViolationsOut",
    "rows_of",
]

Time = str
"""ISO 8601 UTC with microseconds: ``2024-05-01T12:00:00.123456Z``."""


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FlowRow(_Row):
    """A stored flow (``docs/store.md``, table ``flows``)."""

    flow_id: int | None = Field(
        description="number of the flow within one analyzer run; null while it is open"
    )
    src_vm: str | None = Field(description="VM of the side that sent first")
    dst_vm: str | None
    src_vif: int | None = Field(description="vif of src at the observing host")
    dst_vif: int | None
    host: str | None = Field(description="host that observed the flow (first copy)")
    src_host: str | None
    dst_host: str | None
    scope: str = Field(description="intra-host, cross-host or external")
    vlan: int | None
    ethertype: int
    proto: int | None
    src_ip: str | None
    dst_ip: str | None
    src_port: int | None
    dst_port: int | None
    icmp_type: int | None
    icmp_code: int | None
    icmp_id: int | None
    packets: int = Field(description="packets src → dst")
    bytes: int
    packets_rev: int = Field(description="packets dst → src")
    bytes_rev: int
    first: Time
    last: Time
    first_ns: int
    last_ns: int
    duration_s: float
    tcp_flags: int | None
    tcp_flags_rev: int | None
    src_mac: str | None = Field(description="when src is not a known vNIC")
    dst_mac: str | None
    copies: int = Field(description="frames received for the flow, copies included")
    observed_at: list[str] | None = Field(description="hosts that saw it")
    delay_us: float | None = Field(
        None, description="mean time from a packet's sender copy to its receiver copy"
    )
    flow_uid: str = Field(description="unique id of the record (vspan export --flow)")
    src_vm_uuid: str | None
    dst_vm_uuid: str | None
    policy_verdict: str | None = Field(description="permit, deny or none")
    policy_rule: str | None = Field(description="rule that decided: profile#n")
    state: Literal["open", "closed"] = Field(
        description="open: the flow goes on (its counters so far); closed: it ended and is stored"
    )


class FlowsOut(BaseModel):
    """``GET /api/v1/flows``: a page of flows."""

    flows: list[FlowRow]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null: last")

    @classmethod
    def of(cls, page: FlowPage) -> Self:
        return cls(flows=rows_of(FlowRow, page.flows), next_cursor=page.next_cursor)


class ViolationsOut(BaseModel):
    """``GET /api/v1/violations``: denied flows, the most recent first."""

    violations: list[FlowRow]


class PolicyHitRow(_Row):
    """What one rule decided for one VM, added up."""

    profile: str
    rule: str = Field(description="profile#n, or profile#default")
    verdict: str | None
    vm_name: str | None = Field(description="the VM's name at the last hit")
    vm_uuid: str | None = Field(description="null: the VM has none (found behind a Linux bridge)")
    flows: int
    packets: int = Field(description="packets of those flows, both directions")
    bytes: int
    last_hit: Time


class PolicyHitsOut(BaseModel):
    """``GET /api/v1/policies/hits``: in profile and rule order."""

    hits: list[PolicyHitRow]


class MigrationRow(_Row):
    """A VM seen behind another host."""

    time: Time
    vm_name: str | None = Field(description="the VM's name at the move")
    vm_uuid: str | None = Field(description="null: the VM has none (found behind a Linux bridge)")
    from_host: str | None = Field(description="null: first seen")
    to_host: str
    source: str = Field(description="inventory or dataplane")
    profile: str | None = Field(None, description="profile that decided its flows before")
    flows_before: int = Field(0, description="its flows on the old host before the move")
    flows_after: int = Field(0, description="its flows on the new host after the move")
    decided_after: int = Field(0, description="of those after, decided by that profile")
    policy_followed: bool | None = Field(
        None, description="the profile decided flows on the new host (null: no evidence yet)"
    )


class MigrationHistoryOut(BaseModel):
    """``GET /api/v1/migrations``: the latest, oldest first."""

    migrations: list[MigrationRow]


class CaptureOut(BaseModel):
    """What a collector captured, lost and left out on purpose before sending, as its latest
    heartbeat said (counters since the collector started)."""

    time: Time = Field(description="the collector's clock when it sent the heartbeat")
    received: Time = Field(description="when the analyzer got the heartbeat")
    frames: int = Field(description="frames captured on the VM ports")
    bytes: int
    truncated: int = Field(description="frames sent cut to the snap length")
    exported: int | None = Field(
        description="frames mirrored to an analyzer; null: the collector does not say"
    )
    waiting: int = Field(description="frames exported and not sent yet (a TCP sender that "
                         "cannot connect holds them)")  # fmt: skip
    drops: dict[str, int] = Field(
        description="frames lost, by cause: kernel (capture ring full), runts, queue_full, "
        "send_error, stopped (the collector's senders), unsent (a session destination it "
        "could not open)"
    )
    not_mirrored: dict[str, int] = Field(
        description="frames left out on purpose, not lost, by reason: duplicates (the copy of "
        "a frame between two VMs of the host delivered to the receiver: exported once, at the "
        "sender), unselected, filtered (SPAN sessions), sampled_out"
    )


class CollectorRow(_Row):
    """A collector's latest counters, summed over its boots."""

    collector_id: int
    restarts: int = Field(description="boots in the latest sample, less one")
    time: Time = Field(description="of the latest sample")
    received: int = Field(description="messages, summed over the boots")
    lost: int = Field(description="messages the network lost (sequence gaps)")
    kernel: int = Field(
        description="messages the analyzer's own socket dropped because its buffer was full "
        "(sequence gaps charged to the analyzer, never to the network)"
    )
    missed_while_down: int = Field(
        description="messages the collector sent while the analyzer was stopped: the gap in "
        "its sequence at the analyzer's restart (after a crash, also the messages received "
        "since the last counters save, at most 10 s of them); never network loss",
    )
    duplicates: int
    reordered: int
    frames: int
    bytes: int
    loss: float = Field(
        description="lost (network) / expected messages (missed while down included), 0..1"
    )
    messages_per_s: float | None = Field(description="over the last two samples; null: unknown")
    frames_per_s: float | None
    bytes_per_s: float | None
    invalid: int = Field(description="messages rejected")
    drops: dict[str, int] = Field(
        description="messages missing or rejected, by cause: lost (network), kernel (the "
        "analyzer's socket), missed_while_down (the analyzer was stopped), and each reason of "
        "rejection"
    )
    capture: CaptureOut | None = Field(
        None, description="the collector's capture counters (latest heartbeat); null: none"
    )


class CollectorsOut(BaseModel):
    """``GET /api/v1/collectors``: by collector_id."""

    collectors: list[CollectorRow]


class HealthOut(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok"] = "ok"
    ready: bool = True
    """Whether the analyzer processes what it receives. False for the first tenths of a
    second after a start, or about half a minute on a machine's first run, while its
    compiled kernels load or compile; what arrives meanwhile waits in its buffers."""


R = TypeVar("R", bound="_Row")


def rows_of(model: type[R], frame: pd.DataFrame) -> list[R]:
    """The rows of a query's frame as ``model``s."""
    return [model.model_validate(row) for row in json_rows(frame)]
