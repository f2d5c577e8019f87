"""``GET /metrics`` of a real Analyzer fed by real collectors over loopback UDP, scraped with a
token: the exposition passes ``promtool check metrics`` (Prometheus's own linter: counters
end in ``_total``, help on every family) and ``prometheus_client``'s parser; its per-collector
counters are the frames each simulated host sent; the capture drops a collector reported in
its heartbeat are there and in ``/api/v1/collectors``; the receivers' drops are there by
cause; and 200 invalid datagrams claiming 200 collector ids add no series per id."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.api.server import HttpServer, create_app
from vspan.collectors.control.client import ControlClient
from vspan.synth import SynthCapture, generate_small, write_inventory_yaml
from vspan.wire.tunnel import encode_message
from vspan_testing.hosts import replay_hosts
from vspan_testing.served import Client

READ, ADMIN = "metrics-read-0123456789", "metrics-admin-0123456789"
BOGUS_IDS = range(50_000, 50_200)
"""Collector ids that only ever send invalid messages."""
BEAT = {"time": 1.0, "frames": 5000, "bytes": 600_000, "truncated": 7, "exported": 4700,
        "waiting": 9, "drops": {"kernel": 42, "queue_full": 2},
        "not_mirrored": {"duplicates": 250, "sampled_out": 3}}  # fmt: skip


@dataclass
class Live:
    cap: SynthCapture
    served: Client
    text: str


def bad_record(cap: SynthCapture, collector_id: int) -> bytes:
    """A message whose header is readable but whose frame has no VN-Tag: ``bad_record``."""
    frame = cap.frames.frame(0)
    msg = bytearray(encode_message(collector_id=collector_id, boot_id=1, seq=1,
                                   frames=[frame], ts_ns=[1]))  # fmt: skip
    at = bytes(msg).rfind(frame)
    msg[at + 12 : at + 14] = b"\x08\x00"
    return bytes(msg)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("metrics")
    cap = generate_small(seed=11)
    write_inventory_yaml(cap, folder / "inventory.yaml")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp="127.0.0.1:0", data_dir=str(folder / "data"),
                            inventory=str(folder / "inventory.yaml"))  # fmt: skip
    analyzer = Analyzer(config)
    analyzer.start()
    server = HttpServer(create_app(analyzer, tokens={READ: "read", ADMIN: "admin"}), "127.0.0.1", 0)
    try:
        udp = analyzer.addresses()["udp"]
        replay_hosts(cap, udp, folder)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"this is no tunnel message at all", udp)
            for cid in BOGUS_IDS:
                sock.sendto(bad_record(cap, cid), udp)
        deadline = time.monotonic() + 10
        assert analyzer.engine is not None
        while analyzer.engine.frames < len(cap.frames) or (
            analyzer.engine.accounting.invalid()["messages"].sum() < 1 + len(BOGUS_IDS)
        ):
            assert time.monotonic() < deadline, "the analyzer did not get every message"
            time.sleep(0.01)
        server.start()
        url = f"http://127.0.0.1:{server.port}"
        host = cap.hosts[0]
        ControlClient(url, host.collector_id, token=ADMIN).heartbeat(BEAT)
        served = Client(url)
        status, body, headers = served.call("GET", "/metrics", token=READ, raw=True)
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        yield Live(cap, served, body.decode())
    finally:
        server.stop()
        analyzer.stop()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample by name (``prometheus_client``'s parser), and the TYPE of each family."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
        out.setdefault(f"TYPE {family.name}", []).append(({"type": family.type}, 0.0))
    return out


def test_promtool_accepts_the_exposition(live: Live) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (./run.sh test installs the Debian package prometheus)")
    done = subprocess.run([promtool, "check", "metrics"], input=live.text, text=True,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_counters_end_in_total_and_levels_are_gauges(live: Live) -> None:
    got = samples(live.text)
    types = {
        k.removeprefix("TYPE "): v[0][0]["type"] for k, v in got.items() if k.startswith("TYPE ")
    }
    assert types["vspan_frames"] == "counter"
    assert "vspan_frames_total" in got
    assert types["vspan_open_flows"] == types["vspan_ring_segments"] == "gauge"
    assert types["vspan_store_queue_rows"] == types["vspan_store_file_bytes"] == "gauge"
    for line in live.text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line
        if line.startswith("# TYPE ") and line.endswith(" gauge"):
            assert not line.split()[2].endswith("_total"), line


def test_metrics_count_each_collectors_frames(live: Live) -> None:
    got, cap = samples(live.text), live.cap
    hosts = cap.frames.host_column()
    frames = {str(h.collector_id): int((hosts == h.collector_id).sum()) for h in cap.hosts}
    assert {s["collector_id"]: int(v) for s, v in got["vspan_collector_frames_total"]} == frames
    sizes = cap.frames.origlen.astype(np.int64)
    assert got["vspan_frames_total"] == [({}, float(len(cap.frames)))]
    assert got["vspan_bytes_total"][0][1] >= int(sizes.sum()) > 0
    assert {v for _, v in got["vspan_collector_lost_messages_total"]} == {0}
    assert got["vspan_ring_frames_written_total"][0][1] == len(cap.frames)
    assert got["vspan_store_file_bytes"][0][1] > 0


def test_invalid_datagrams_add_no_series_per_claimed_collector(live: Live) -> None:
    invalid = samples(live.text)["vspan_collector_invalid_messages_total"]
    by = {(s["collector_id"], s["reason"]): v for s, v in invalid}
    assert sum(by.values()) == 1 + len(BOGUS_IDS)
    assert {cid for cid, _ in by} == {"0"}  # none of the 200 claimed ids is a series
    assert by[("0", "bad_record")] == len(BOGUS_IDS)
    per_collector = [s for name, rows in samples(live.text).items() for s, _ in rows
                     if "collector_id" in s and int(s["collector_id"]) in BOGUS_IDS]  # fmt: skip
    assert per_collector == []


def test_capture_drops_from_heartbeats(live: Live) -> None:
    got = samples(live.text)
    cid = str(live.cap.hosts[0].collector_id)
    drops = {
        (s["collector_id"], s["cause"]): v for s, v in got["vspan_collector_capture_drops_total"]
    }
    assert drops == {(cid, "kernel"): 42.0, (cid, "queue_full"): 2.0}  # losses only
    left_out = {
        (s["collector_id"], s["reason"]): v
        for s, v in got["vspan_collector_frames_not_mirrored_total"]
    }
    assert left_out == {(cid, "duplicates"): 250.0, (cid, "sampled_out"): 3.0}
    assert got["vspan_collector_captured_frames_total"] == [({"collector_id": cid}, 5000.0)]
    assert got["vspan_collector_truncated_frames_total"] == [({"collector_id": cid}, 7.0)]
    assert got["vspan_collector_frames_waiting"] == [({"collector_id": cid}, 9.0)]
    rows = live.served.get("/api/v1/collectors", token=READ)["collectors"]
    capture = {r["collector_id"]: r["capture"] for r in rows}
    assert capture[int(cid)]["drops"] == {"kernel": 42, "queue_full": 2}
    assert capture[int(cid)]["not_mirrored"] == {"duplicates": 250, "sampled_out": 3}
    assert (capture[int(cid)]["frames"], capture[int(cid)]["exported"]) == (5000, 4700)
    assert capture[int(cid)]["time"] == "1970-01-01T00:00:01.000000Z"
    assert all(capture.get(h.collector_id) is None for h in live.cap.hosts[1:])


def test_receiver_drops_by_cause(live: Live) -> None:
    got = samples(live.text)
    causes = {(s["receiver"], s["cause"]) for s, _ in got["vspan_receiver_drops_total"]}
    assert ("udp", "kernel") in causes  # datagrams the analyzer's socket dropped
    assert "vspan_receiver_backpressure_waits_total" in got  # reading paused: not a drop
    assert "vspan_receiver_backpressure_seconds_total" in got
    assert got["vspan_receiver_datagrams_total"][0][0] == {"receiver": "udp"}
    assert got["vspan_receiver_datagrams_total"][0][1] >= 1 + len(BOGUS_IDS)


def test_metrics_need_a_token_and_answer_under_the_api_prefix(live: Live) -> None:
    assert live.served.call("GET", "/metrics")[0] == 401
    prefixed = live.served.call("GET", "/api/v1/metrics", token=READ, raw=True)[1].decode()
    assert [line for line in prefixed.splitlines() if line.startswith("#")] == [
        line for line in live.text.splitlines() if line.startswith("#")
    ]


def test_every_family_has_a_type(live: Live) -> None:
    # Regression: the tunnel's rejection and bound counters (duplicates and stale messages
    # dropped, evictions, TCP connections refused) were exposed untyped, without _total.
    untyped = [
        line.split()[2]
        for line in live.text.splitlines()
        if line.startswith("# TYPE ") and line.endswith(" untyped")
    ]
    assert untyped == []
    got = samples(live.text)
    for counter in ("vspan_messages_dropped_duplicate_total", "vspan_streams_evicted_total",
                    "vspan_learned_macs_evicted_total", "vspan_frames_late_total"):  # fmt: skip
        assert counter in got, counter
    tcp = {s["receiver"] for s, _ in got["vspan_receiver_rejected_connections_total"]}
    assert tcp == {"tcp"}
