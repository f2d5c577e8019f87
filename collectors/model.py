"""What the parts of a collector hand each other: ports, captured batches, tagged batches.

The collector captures and ships; it never parses past the destination MAC (STYLE.md habit
9). A capture source yields ``PortBatch`` (frames as seen on VM ports, with the port and
the direction); ``mirror`` turns them into VN-tagged frames per the mirroring rules; the
forwarder packs those into tunnel messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from vspan.batch import FrameBatch
from vspan.inventory import Port

__all__ = ["CaptureCounters", "CaptureSource", "PortBatch", "PortDirectory"]


@dataclass(frozen=True, slots=True, eq=False)
class PortBatch:
    """Frames captured on VM ports, as the VM sent or received them (untagged)."""

    frames: FrameBatch
    """The frames; ``iface`` is unused here."""
    vif: npt.NDArray[np.uint16]
    """vif of the port each frame was captured on."""
    from_vm: npt.NDArray[np.bool_]
    """True when the VM sent the frame into the vswitch; False when the vswitch delivered
    it to the VM. On a port's host-side interface, a frame the VM sends arrives as
    incoming (packet type HOST/BROADCAST/MULTICAST/OTHERHOST) and a frame delivered to the
    VM leaves as PACKET_OUTGOING."""


@dataclass
class CaptureCounters:
    """What a capture source has seen and lost (monotonic counters)."""

    frames: int = 0
    """Frames handed to the collector (after sampling and filter)."""
    bytes: int = 0
    truncated: int = 0
    """Frames cut by the snaplen."""
    kernel_drops: int = 0
    """Frames the kernel dropped (ring full), from PACKET_STATISTICS."""
    sampled_out: int = 0
    """Frames skipped by 1:N sampling."""
    per_port: dict[str, int] = field(default_factory=dict)
    """Frames per port name."""


class PortDirectory(Protocol):
    """The collector's view of its VM ports (narrow interface over inventory discovery)."""

    def ports(self) -> list[Port]:
        """Ports that currently exist and belong to VMs."""
        ...


class CaptureSource(Protocol):
    """A source of ``PortBatch`` (AF_PACKET on VM ports, pcap replay, simulator)."""

    counters: CaptureCounters

    def start(self) -> None:
        """Open what the source needs (sockets, files)."""
        ...

    def stop(self) -> None:
        """Release everything; idempotent."""
        ...

    def poll(self, timeout_s: float) -> PortBatch | None:
        """Frames captured since the last call, waiting up to ``timeout_s``; None if none."""
        ...
