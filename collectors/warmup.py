"""The collector's kernel workload: every kernel call ``vspan collect`` makes, with the
argument types it makes it with — the AF_PACKET ring walk, the sessions' packet filters,
and the capture-file reader of ``--replay`` (pcapng and classic pcap). Run once per machine
by ``vspan.kernels.warm`` to fill the kernel cache; imports neither pandas nor the analyzer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ROLE", "run", "warm"]

_FRAME = bytes.fromhex(
    "020000000002"
    "020000000001"
    "0800"  # Ethernet
    "4500001c00010000401100000a0000010a000002"  # IPv4, UDP
    "9c40003500080000"
)
"""One UDP frame (and, cut short, a truncated one) for the capture files."""
ROLE = "collector"


def warm(say: Any = None) -> float | None:
    """Compile the collector's kernels unless the cache has them (``_kernels.warm``)."""
    from vspan import kernels as _kernels

    return _kernels.warm(ROLE, run, say, about="a few seconds")


def run() -> None:
    """Call every collector kernel the way vspan does."""
    from vspan import bpf
    from vspan.batch import FrameBatch
    from vspan.collectors.capture import _tpacket
    from vspan.pcap.read import CaptureReader
    from vspan.pcap.write import PcapngWriter, PcapWriter

    _tpacket._compile_kernels()
    bpf.warm_up()
    frames = FrameBatch.from_frames([_FRAME, _FRAME[:34]], ts_ns=[1, 2])
    with tempfile.TemporaryDirectory(prefix="vspan-warm-") as name:
        for fmt, make in (("pcapng", PcapngWriter), ("pcap", PcapWriter)):
            path = Path(name, f"sample.{fmt}")
            with open(path, "wb") as fh:
                writer: Any = make(fh)
                if fmt == "pcapng":
                    writer.add_interface(name="vm")
                    writer.write_batch(frames, iface=0)
                else:
                    writer.write_batch(frames)
            for strict in (True, False):
                for _ in CaptureReader(path, chunk_bytes=1 << 16, strict=strict):
                    pass
