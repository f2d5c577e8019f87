"""The analyzer's kernel workload: every call of a kernel the analyzer and ``vspan report``
make, with the argument types they make it with (``vspan.kernels.warm`` runs it once per
machine to fill the kernel cache; ``tests/vspan/test_kernels.py`` checks it misses none).

It goes through ``vspan report`` over pcapng and classic pcap (with and without an
inventory, every text format), the engine's decode, endpoints and flow table (growth,
eviction, expiry, fragments), the live analyzer's packet ring and open-flow records, and
pcapng writing with comments read back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ROLE", "run", "warm"]

ROLE = "analyzer"


def warm(say: Any = None) -> float | None:
    """Compile the analyzer's kernels unless the cache has them (see ``_kernels.warm``)."""
    from vspan import kernels as _kernels

    return _kernels.warm(ROLE, run, say)


def run() -> None:
    """Call every analyzer kernel the way vspan does."""
    from vspan.analysis.decode import decode_batch
    from vspan.analysis.flows.endpoints import EndpointResolver
    from vspan.analysis.flows.keys import usable
    from vspan.analysis.flows.table import FlowTable
    from vspan.analysis.records.textrows import TEXT_FORMATS, text_blocks
    from vspan.analysis.report import analyze_captures
    from vspan.analysis.ring.comments import epb_comments
    from vspan.analysis.service.engine import Engine, EngineConfig, warm_up
    from vspan.inventory import Inventory
    from vspan.pcap.read import CaptureReader
    from vspan.pcap.write import PcapngWriter
    from vspan.synth import generate_small, write_capture, write_inventory_yaml

    capture = generate_small()
    with tempfile.TemporaryDirectory(prefix="vspan-warm-") as name:
        tmp = Path(name)
        write_inventory_yaml(capture, tmp / "inventory.yaml")
        inventory = Inventory.load(str(tmp / "inventory.yaml"))
        for fmt in ("pcapng", "pcap"):
            write_capture(capture, tmp / f"sample.{fmt}", fmt)
            for inv in (inventory, None):
                report = analyze_captures(
                    [tmp / f"sample.{fmt}"], inventory=inv, chunk_bytes=1 << 16
                )
                for text in TEXT_FORMATS:
                    b"".join(text_blocks(report.records, text))
        warm_up()
        table = FlowTable(initial_rows=2)  # grows, evicts, expires, flushes
        decoded = decode_batch(capture.frames)
        good = decoded.take(np.flatnonzero(usable(decoded)))
        table.update(good, EndpointResolver(inventory).resolve(good))
        table.evict(4)
        table.advance(int(capture.frames.ts_ns.max()) + (1 << 40))
        table.flush()
        engine = Engine(EngineConfig(max_flows=16))
        engine.process(capture.frames)
        engine.process(_fragments())
        engine.flush()
        _live(tmp, capture, inventory)
        frames = capture.frames
        with open(tmp / "comments.pcapng", "wb") as fh:
            writer = PcapngWriter(fh)
            writer.add_interface(name="vm")
            comments = [None if i % 3 else f"frame {i % 5}" for i in range(len(frames))]
            writer.write_batch(frames, iface=0, comments=comments)
        for batch in CaptureReader(tmp / "comments.pcapng"):
            epb_comments(batch)


def _live(tmp: Path, capture: Any, inventory: Any) -> None:
    """What the live analyzer runs beyond ``vspan report``: the packet ring (its index), the
    open flows copied and turned into records, as the store writer does."""
    from vspan.analysis.decode import decode_batch
    from vspan.analysis.flows.endpoints import EndpointResolver
    from vspan.analysis.flows.table import FlowTable
    from vspan.analysis.records.build import HostNames, flow_table
    from vspan.analysis.ring.feeder import compact
    from vspan.analysis.ring.ring import PacketRing
    from vspan.analysis.service.engine import warm_batch

    ring = PacketRing(tmp / "ring", inventory=inventory)
    ring.start()
    for batch in (capture.frames, warm_batch()):
        ring.append(compact(batch), decode_batch(batch))
    ring.stop()
    table = FlowTable()
    decoded = decode_batch(capture.frames)
    table.update_rows(decoded, EndpointResolver(inventory).resolve(decoded))
    for rows in (table.open_rows(), table.flush_rows()):
        flow_table(rows.columns(), inventory=inventory, hosts=HostNames.from_inventory(inventory))


def _fragments() -> Any:
    """Two fragments of one UDP datagram (the flow table fills in the later one's ports)."""
    import dpkt

    from vspan.batch import FrameBatch

    udp = bytes(dpkt.udp.UDP(sport=5353, dport=53, data=b"x" * 24))
    frames = [
        dpkt.ip.IP(id=7, p=17, mf=more, offset=eighths, data=part, src=b"\n\0\0\1", dst=b"\n\0\0\2")
        for eighths, more, part in ((0, 1, udp[:16]), (2, 0, udp[16:]))
    ]
    eth = [bytes(dpkt.ethernet.Ethernet(src=b"\2" * 6, dst=b"\4" * 6, data=f)) for f in frames]
    return FrameBatch.from_frames(eth, ts_ns=[1, 2])
