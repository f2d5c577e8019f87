"""``vspan analyze`` stopped and started again while a collector goes on sending.

Regression (issue 17, "nothing lost silently"): the highest seq of each tunnel stream was not
saved, so an analyzer started again began each stream at the first seq it saw: the messages a
collector sent while the analyzer was down (UDP: it cannot know) were counted nowhere, and
``/api/v1/collectors`` said 0 lost. Now the first gap after a restart is counted under its own
name, ``missed_while_down`` — never as network ``lost`` nor ``kernel``.

A test-built sender speaks the tunnel (``vspan.wire.tunnel.encode_message``) over real UDP: each
message ``seq`` carries ``FRAMES`` frames of a flow of its own (UDP source port ``BASE + seq``),
so the test knows which messages the analyzer had and which frames the store must hold.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vspan.analysis.store.store import Store
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.netlab import vspan_command

pytestmark = pytest.mark.slow

CID, BOOT, NEW_BOOT = 11, 0x6000_0000, 0x6000_0100
FRAMES, BASE = 2, 20_000
SRC_MAC, DST_MAC = 0x0277_0000_0201, 0x0277_0000_0202
SAVE_S = 10.0
"""How often the analyzer saves its counters (``Analyzer._maintain``)."""


def frame(sport: int, i: int) -> bytes:
    """A VN-tagged UDP frame from vif 1 to vif 2 of the host (intra-host, ``d=0``)."""
    udp = struct.pack("!HHHH", sport, 9000, 8 + 10, 0) + bytes(10)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                     socket.inet_aton("10.78.0.1"), socket.inet_aton("10.78.0.2"))  # fmt: skip
    tag = encode_vntag(VnTag(d=0, svif=1, dvif=2, ethertype=0x0800))
    return DST_MAC.to_bytes(6, "big") + SRC_MAC.to_bytes(6, "big") + b"\x89\x26" + tag + ip + udp


def send(address: tuple[str, int], seqs: range, boot: int = BOOT) -> None:
    """One datagram per seq; to a closed port they are lost, as a collector's would be."""
    now = time.time_ns()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for seq in seqs:
            frames = [frame(BASE + seq, i) for i in range(FRAMES)]
            message = encode_message(collector_id=CID, boot_id=boot, seq=seq, frames=frames,
                                     ts_ns=[now + 1000 * i for i in range(FRAMES)])  # fmt: skip
            # to a closed port, the ICMP answer to an earlier datagram may come back here
            with contextlib.suppress(ConnectionRefusedError):
                sock.sendto(message, address)
            time.sleep(0.002)  # a paced sender: no datagram waits for a full socket buffer


def get(analyzer: AnalyzerProcess, path: str) -> Any:
    return json.loads(analyzer.get(path))


def live_received(analyzer: AnalyzerProcess) -> int:
    """Messages of collector ``CID`` the running analyzer has counted (not yet saved)."""
    rows = get(analyzer, "/api/v1/status").get("collectors") or []
    return sum(r["received"] for r in rows if r["collector_id"] == CID)


def wait_until(what: str, check: Any, analyzer: AnalyzerProcess, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"{what}:\n{analyzer.stderr()}"
        time.sleep(0.1)
    return got


def collector_row(analyzer: AnalyzerProcess, received: int) -> dict[str, Any]:
    """``GET /api/v1/collectors``'s row of ``CID`` from a sample saved after the running
    analyzer counted ``received`` messages of this run (saved every ``SAVE_S`` seconds)."""
    wait_until("messages", lambda: live_received(analyzer) >= received, analyzer)
    after = datetime.now(UTC)

    def row() -> dict[str, Any] | None:
        rows = get(analyzer, "/api/v1/collectors")["collectors"]
        mine = [r for r in rows if r["collector_id"] == CID]
        return mine[0] if mine and datetime.fromisoformat(mine[0]["time"]) >= after else None

    found: dict[str, Any] = wait_until("no saved sample", row, analyzer, timeout=3 * SAVE_S)
    return found


def metric(analyzer: AnalyzerProcess, name: str) -> float | None:
    """The sample ``name`` of ``CID`` on ``/metrics`` (None: absent)."""
    for family in text_string_to_metric_families(analyzer.get("/metrics")):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("collector_id") == str(CID):
                return float(sample.value)
    return None


def stored_ports(data: Path) -> dict[int, int]:
    """Packets per UDP source port of the stored flows (each message's flow)."""
    with Store(data, read_only=True) as store:
        flows = store.query_flows(limit=None)
    assert (flows["packets_rev"] == 0).all()
    return {int(p): int(n) for p, n in zip(flows["src_port"], flows["packets"], strict=True)}


class Run:
    """``vspan analyze`` runs on one data directory and one UDP port."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.data, self.runs = tmp_path, tmp_path / "data", 0
        self.udp: tuple[str, int] | None = None

    def start(self) -> AnalyzerProcess:
        self.runs += 1
        udp = "127.0.0.1:0" if self.udp is None else f"{self.udp[0]}:{self.udp[1]}"
        analyzer = AnalyzerProcess(
            ["--udp", udp, "--tcp", "off", "--http", "127.0.0.1:0", "--data-dir", str(self.data)],
            stderr_path=self.tmp_path / f"analyze-{self.runs}.stderr",
        ).wait_started()
        wait_until("not ready", lambda: get(analyzer, "/healthz")["ready"], analyzer, 120)
        assert analyzer.udp is not None
        self.udp = analyzer.udp
        return analyzer


def test_messages_sent_while_the_analyzer_was_stopped_are_missed_while_down(
    tmp_path: Path,
) -> None:
    n, m, k = 6, 9, 4
    run = Run(tmp_path)
    first = run.start()
    try:
        assert run.udp is not None
        send(run.udp, range(n))
        wait_until("first messages", lambda: live_received(first) == n, first)
    finally:
        first.stop()  # SIGTERM: counters saved, flows written
    send(run.udp, range(n, n + m))  # nobody listens: lost, and the test knows how many
    second = run.start()
    try:
        send(run.udp, range(n + m, n + m + k))
        row = collector_row(second, k)
        counted = metric(second, "vspan_collector_messages_missed_while_down_total")
        status = get(second, "/api/v1/status")
    finally:
        second.stop()
    assert (row["received"], row.get("missed_while_down")) == (n + k, m)
    assert (row["lost"], row["kernel"]) == (0, 0)
    assert row["drops"] == {"missed_while_down": m}
    assert row["loss"] == 0.0  # the network lost nothing
    assert counted == m
    assert status["drops"]["missed_while_down"] == m
    assert (status["drops"]["lost"], status["drops"]["kernel"]) == (0, 0)
    # The store holds exactly the frames of the messages received, none of those missed.
    received = [*range(n), *range(n + m, n + m + k)]
    assert stored_ports(run.data) == {BASE + s: FRAMES for s in received}
    # And so says ``vspan collectors`` from the data directory.
    done = subprocess.run(
        [*vspan_command(), "collectors", "--data-dir", str(run.data), "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (cli,) = [r for r in json.loads(done.stdout) if r["collector_id"] == CID]
    assert (cli["received"], cli.get("missed_while_down"), cli["lost"]) == (n + k, m, 0)


def test_after_kill_9_what_is_missed_is_bounded_by_the_last_save(tmp_path: Path) -> None:
    # Killed, the analyzer saves nothing: the messages it received after its last counters
    # save are counted as missed too. The test sends `n` messages, waits for a saved sample
    # of them, sends `p` more and kills at once: between `m` and `m + p` are missed, and no
    # message is counted twice or not at all.
    n, p, m, k = 5, 7, 8, 3
    run = Run(tmp_path)
    first = run.start()
    try:
        assert run.udp is not None
        send(run.udp, range(n))
        collector_row(first, n)  # a sample of the first n is saved
        send(run.udp, range(n, n + p))
        wait_until("more messages", lambda: live_received(first) == n + p, first)
    finally:
        first.kill()  # nothing flushed, nothing saved
    send(run.udp, range(n + p, n + p + m))
    second = run.start()
    try:
        send(run.udp, range(n + p + m, n + p + m + k))
        row = collector_row(second, k)
    finally:
        second.stop()
    assert m <= (row.get("missed_while_down") or 0) <= m + p, row
    assert (row["lost"], row["kernel"]) == (0, 0)
    sent = n + p + m + k
    assert row["received"] + (row.get("missed_while_down") or 0) == sent  # each seq counted once


def test_a_collector_restarted_while_the_analyzer_was_down_has_nothing_missed(
    tmp_path: Path,
) -> None:
    n, k = 5, 4
    run = Run(tmp_path)
    first = run.start()
    try:
        assert run.udp is not None
        send(run.udp, range(n))
        wait_until("first messages", lambda: live_received(first) == n, first)
    finally:
        first.stop()
    second = run.start()
    try:  # a new boot starts at seq 0: nothing of the old one is missing
        send(run.udp, range(k), boot=NEW_BOOT)
        row = collector_row(second, k)
    finally:
        second.stop()
    assert (row.get("missed_while_down"), row["lost"], row["kernel"]) == (0, 0, 0)
    assert row["restarts"] == 1
    assert row["received"] == n + k
