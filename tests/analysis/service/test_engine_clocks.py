"""The live analyzer with sources whose capture times lag: a replay of an old capture beside
live traffic, a sender that starts its timestamps again. Each host's clock goes on with the
analyzer's from that host's newest frame, so the replay's flows are whole and end
``idle_timeout`` after its last frame, while the live traffic goes on.

The end-to-end tests run ``vspan analyze`` and ``vspan collect --replay`` as the README
does, with a live collector's messages built here (current timestamps), and the benchmark's
own sender (``bench/analyzer_ingest.py``); the truth is ``vspan report`` of the replayed
capture, and the frames the test sent.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.flows.table import FlowConfig
from vspan.analysis.service.engine import Engine, EngineConfig
from vspan.analysis.store.store import Store
from vspan.batch import FrameBatch
from vspan.pcap.write import PcapngWriter
from vspan.synth import SynthCapture, generate_small, write_inventory_yaml
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.hosts import host_capture
from vspan_testing.netlab import vspan_command

S = 1_000_000_000
BENCH = Path(__file__).resolve().parents[3] / "bench"


def host_frames(cap: SynthCapture, host: int, shift_ns: int = 0) -> FrameBatch:
    """The frames of ``cap`` that ``host`` observed, ``shift_ns`` later."""
    b = cap.frames
    rows = np.flatnonzero(b.host_column() == host)
    return FrameBatch(data=b.data, offset=b.offset[rows], caplen=b.caplen[rows],
                      origlen=b.origlen[rows], ts_ns=b.ts_ns[rows] + shift_ns,
                      linktype=b.linktype[rows], host=b.host_column()[rows])  # fmt: skip


def test_a_replay_into_a_live_engine_ends_its_flows_by_its_own_clock() -> None:
    # Host 1 is live (today), host 2 replays its 2023 capture into the same engine at the
    # analyzer's time 1000 s. Ticks move each host's clock on from its newest frame: the
    # replay's last flows stay open until the idle timeout has passed since the replay's
    # last frame — whatever the live host's clock says — then end, whole.
    cap = generate_small(seed=3)
    inventory = cap.inventory()  # endpoints then do not depend on which frames came before
    idle = 5
    config = EngineConfig(flow=FlowConfig(idle_timeout_s=idle))
    engine = Engine(config, inventory=lambda: inventory)
    live = host_frames(cap, 1, shift_ns=1_750_000_000 * S - 1_700_000_000 * S)
    replay = host_frames(cap, 2)
    last = int(replay.ts_ns.max())
    engine.process(live, now=1000.0)
    engine.process(replay, now=1000.5)
    assert engine.counters()["late_frames"] == 0
    alone = Engine(config, inventory=lambda: inventory)
    alone.process(replay, now=0.0)
    alone.flush()
    expected = alone.drain()
    ended = [engine.drain()]
    engine.tick(1000.5 + idle - 0.5)
    ended.append(engine.drain())
    assert not (ended[-1]["last_ns"] == last).any()  # the replay's last flow: still open
    engine.tick(1000.5 + idle + 0.5)
    ended.append(engine.drain())
    assert (ended[-1]["last_ns"] == last).any()  # ... until the idle timeout has passed
    done = pd.concat(ended, ignore_index=True)
    replayed = done[done["observer"] == 2]
    columns = ["ep_a", "ep_b", "port_a", "port_b", "start_ns", "last_ns", "packets", "bytes",
               "packets_rev", "bytes_rev"]  # fmt: skip
    got = sorted(map(tuple, replayed[columns].to_numpy().tolist()))
    assert got == sorted(map(tuple, expected[columns].to_numpy().tolist()))
    assert len(expected) > 10


# --- through the real processes --------------------------------------------------------------

MAC_A, MAC_B = bytes.fromhex("020000000a01"), bytes.fromhex("020000000b01")
LIVE_COLLECTOR = 9


def live_frame(i: int) -> bytes:
    """Frame ``i`` of a UDP conversation between two VMs of the live collector's host."""
    payload = b"live" + struct.pack("!I", i)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), i & 0xFFFF, 0, 64, 17, 0,
                     b"\x0a\x09\x00\x01", b"\x0a\x09\x00\x02")  # fmt: skip
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0)
    tag = encode_vntag(VnTag(d=0, svif=1, dvif=2, ethertype=0x0800))
    return MAC_B + MAC_A + b"\x89\x26" + tag + ip + udp + payload


class LiveCollector(threading.Thread):
    """Sends a message of two frames with the current time every 20 ms until stopped (at
    most ``limit_s``)."""

    def __init__(self, address: tuple[str, int], limit_s: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.address, self.limit_s = address, limit_s
        self.stop = threading.Event()
        self.frames = 0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            seq = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                now = time.time_ns()
                frames = [live_frame(self.frames), live_frame(self.frames + 1)]
                message = encode_message(collector_id=LIVE_COLLECTOR, boot_id=1, seq=seq,
                                         frames=frames, ts_ns=[now, now + 1000])  # fmt: skip
                sock.sendto(message, self.address)
                seq, self.frames = seq + 1, self.frames + 2
                self.stop.wait(0.02)


def cli(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([*vspan_command(), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def status(analyzer: AnalyzerProcess) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(analyzer.get("/api/v1/status"))
    return out


def wait_until(analyzer: AnalyzerProcess, done: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(now := status(analyzer)):
        assert time.monotonic() < deadline, json.dumps(now)[:2000]
        time.sleep(0.2)
    return now


KEY = ["src_ip", "dst_ip", "src_port", "dst_port", "proto", "packets", "bytes", "packets_rev",
       "bytes_rev"]  # fmt: skip


def keyed(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    def value(v: Any) -> Any:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        return str(v) if isinstance(v, str) else int(v)

    return sorted((tuple(value(r[k]) for k in KEY) for r in rows), key=repr)


@pytest.mark.slow
def test_a_replay_of_an_old_capture_beside_live_traffic_is_stored_as_vspan_report_gives_it(
    tmp_path: Path,
) -> None:
    # Regression: the analyzer's one clock followed the live collector (now); every frame of
    # the replay (2023) was far behind it and became a flow of its own, ended at once: the
    # store flooded with one-frame flows and the report of the capture was unrecognisable.
    cap = generate_small(seed=3)
    inventory = tmp_path / "inventory.yaml"
    write_inventory_yaml(cap, inventory)
    host = cap.inventory().hosts[2]
    pcap = tmp_path / f"{host.name}.pcap"  # what its VM ports saw, replayed
    tagged = host_capture(cap, host.collector_id, pcap)
    exported = tmp_path / f"{host.name}.pcapng"  # the same, as its collector exports it
    with exported.open("wb") as fh:
        writer = PcapngWriter(fh)
        writer.add_interface(name=host.name)
        writer.write_batch(tagged, iface=0)
    report = json.loads(cli("report", str(exported), "--inventory", str(inventory),
                            "--format", "json", "--no-progress"))  # fmt: skip
    assert len(report) > 10
    data = tmp_path / "data"
    analyzer = AnalyzerProcess(
        ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0", "--data-dir",
         str(data), "--inventory", str(inventory), "--idle-timeout", "2"],
        stderr_path=tmp_path / "analyze.stderr",
    ).wait_started()  # fmt: skip
    assert analyzer.udp is not None
    live = LiveCollector(analyzer.udp)
    try:
        live.start()
        wait_until(analyzer, lambda s: s["engine"]["frames"] >= 20)
        cli("collect", "--replay", str(pcap), "--inventory", str(inventory), "--host",
            host.name, "--collector-id", str(host.collector_id), "--analyzer",
            f"{analyzer.udp[0]}:{analyzer.udp[1]}", "--max-speed")  # fmt: skip
        # The replay's flows end by its own clock, while the live traffic goes on: stored
        # before the analyzer is killed (nothing is flushed by a kill).
        final = wait_until(
            analyzer, lambda s: s["store_writer"].get("rows_written{flows}", 0) >= len(report)
        )
        assert final["engine"]["late_frames"] == 0
        assert final["engine"]["open_flows"] >= 1  # the live flow
        assert live.is_alive()
    finally:
        live.stop.set()
        live.join(10)
        analyzer.kill()
    with Store(data, read_only=True) as store:
        stored = store.query_flows(limit=None)
    replayed = stored[stored["host"] == host.name]
    assert keyed(replayed.to_dict("records")) == keyed(report)
    assert len(stored) == len(replayed)  # the live flow is still open: not stored


@pytest.mark.slow
def test_the_benchmark_sender_run_twice_with_the_same_timestamps_makes_no_flow_per_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression (bench/analyzer_process.py): a second sender run whose timestamps start
    # again from the first run's start made every frame a finished one-frame flow (the
    # store writer at 0.77 cores, 60 % of the frames lost at a rate taken otherwise).
    monkeypatch.syspath_prepend(str(BENCH))  # the sender processes import it too
    from analyzer_ingest import FRAMES_PER_MESSAGE, SendJob, build_templates, sender

    templates = build_templates(100, 128)  # 100 messages of 64 frames: 400 flows in 20 s
    in_set = len(templates[1])
    # The benchmark's churn shape: an idle timeout shorter than the 20 s each replay of the
    # template set moves on, so that each replay's flows are new ones.
    analyzer = AnalyzerProcess(
        ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0", "--data-dir",
         str(tmp_path / "data"), "--idle-timeout", "15"],
        stderr_path=tmp_path / "analyze.stderr",
    ).wait_started()  # fmt: skip
    assert analyzer.udp is not None
    ctx = mp.get_context("spawn")
    sent, replays = 0, 0
    try:
        for boot in (100, 101):  # a new boot each run, the same timestamps (start_ns=0)
            # 200 messages/s for 2 s: the set four times, each 20 s later; the second run
            # starts 80 s of capture time behind where the first ended.
            ready, done = ctx.Event(), ctx.Queue()
            job = SendJob(analyzer.udp, 200, 2.0, templates, boot_id=boot, start_ns=0)
            proc = ctx.Process(target=sender, args=(job, ready, done))
            proc.start()
            assert ready.wait(60)
            messages, errors = done.get(timeout=60)
            proc.join(10)
            assert errors == 0
            sent += messages * FRAMES_PER_MESSAGE
            replays += -(-messages // in_set)
        seen = wait_until(analyzer, lambda s: s["engine"]["frames"] >= sent * 0.95)
        engine = seen["engine"]
    finally:
        summary = analyzer.stop()  # SIGTERM: every open flow finished
    assert engine["late_frames"] == 0
    assert engine["clock_resets"] == 4  # each of the 4 hosts went back once
    # At most the template set's 400 flows per replay of it, not a flow per frame (before:
    # every frame of the second run).
    assert summary.finished <= replays * 100 * 4 < summary.frames // 5
