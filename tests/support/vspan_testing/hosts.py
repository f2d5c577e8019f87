"""Simulated hypervisors for tests: what each host's VM ports saw, replayed through real
collectors into an analyzer's UDP receiver."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vspan.analysis.decode import decode_batch
from vspan.analysis.ring.export import strip_tags
from vspan.batch import FrameBatch
from vspan.collectors.agent import Collector, CollectorSettings
from vspan.collectors.capture.replay import ReplaySource
from vspan.collectors.forward.forwarder import UdpSender
from vspan.pcap.write import PcapWriter
from vspan.synth import SynthCapture


def host_capture(cap: SynthCapture, host: int, path: Path) -> FrameBatch:
    """What host ``host`` exported (its tagged frames, returned) and, written to ``path`` as
    pcap, what its VM ports saw: the same frames untagged (replay adds intra-host deliveries)."""
    rows = np.flatnonzero(cap.frames.host_column() == host)
    tagged = FrameBatch(
        data=cap.frames.data, offset=cap.frames.offset[rows], caplen=cap.frames.caplen[rows],
        origlen=cap.frames.origlen[rows], ts_ns=cap.frames.ts_ns[rows],
        linktype=cap.frames.linktype[rows],
    )  # fmt: skip
    plain = strip_tags(tagged, decode_batch(tagged), np.arange(len(tagged), dtype=np.int64))
    with path.open("wb") as fh:
        PcapWriter(fh).write_batch(plain)
    return tagged


def replay_hosts(
    cap: SynthCapture, analyzer: tuple[str, int], folder: Path, *, max_message: int = 9000
) -> None:
    """Every host of ``cap`` replayed through a real collector sending UDP to ``analyzer``,
    all at once as hypervisors run, at ``REPLAY_SPEED`` times capture time on a simulated
    clock (so the two copies of a cross-host packet reach the analyzer close together, as
    they do live); returns when every collector has sent everything."""
    inventory = cap.inventory()
    clock = [0.0]
    running = []
    for host in inventory.hosts:
        path = folder / f"{host.name}.pcap"
        host_capture(cap, host.collector_id, path)
        source = ReplaySource(path, inventory, speed=REPLAY_SPEED, host=host.name,
                              now=lambda: clock[0], sleep=lambda _: None)  # fmt: skip
        collector = Collector(
            CollectorSettings(collector_id=host.collector_id, host=host.name,
                              max_message=max_message),
            source=source, directory=source,
            sender=UdpSender(analyzer, max_message=max_message),
        )  # fmt: skip
        collector.start(0.0)
        running.append((source, collector))
    for _ in range(20_000):
        clock[0] += 0.001
        for _, collector in running:
            collector.step(clock[0], poll_s=0.0)
        if all(s.finished and not c.forwarder.pending_frames for s, c in running):
            break
    for _, collector in running:
        collector.stop()


REPLAY_SPEED = 10.0
"""Capture seconds replayed per second of the simulated clock (1 ms a step)."""
