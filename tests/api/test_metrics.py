"""``GET /metrics`` of a real Analyzer fed by real collectors over loopback UDP: the
Prometheus text format (0.0.4) is well formed, and its per-collector counters are the
frames and bytes each simulated host sent."""

from __future__ import annotations

import re
import socket
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pytest

from vspan.analysis.config import AnalyzerConfig
from vspan.analysis.service import Analyzer
from vspan.api.server import HttpServer, create_app
from vspan.synth import SynthCapture, generate_small, write_inventory_yaml
from vspan_testing.hosts import replay_hosts
from vspan_testing.served import Client

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SynthCapture, Client]]:
    folder = tmp_path_factory.mktemp("metrics")
    cap = generate_small(seed=11)
    write_inventory_yaml(cap, folder / "inventory.yaml")
    config = AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(folder / "data"),
                            inventory=str(folder / "inventory.yaml"))  # fmt: skip
    analyzer = Analyzer(config)
    analyzer.start()
    app = create_app(analyzer)  # the views and metrics included
    server = HttpServer(app, "127.0.0.1", 0)
    try:
        udp = analyzer.addresses()["udp"]
        replay_hosts(cap, udp, folder)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"this is no tunnel message at all", udp)
        deadline = time.monotonic() + 10
        assert analyzer.engine is not None
        while analyzer.engine.frames < len(cap.frames) or not len(
            analyzer.engine.accounting.invalid()
        ):
            assert time.monotonic() < deadline, "the analyzer did not get every frame"
            time.sleep(0.01)
        server.start()
        yield cap, Client(f"http://127.0.0.1:{server.port}")
    finally:
        server.stop()
        analyzer.stop()


def _parse(text: str) -> tuple[dict[str, str], dict[str, list[tuple[dict[str, str], float]]]]:
    """TYPE per family and its samples; asserts HELP and TYPE come before a family's samples."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge")
            assert name in helps, f"TYPE before HELP for {name}"
            types[name] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            assert name in types, f"sample of {name} before its TYPE"
            labels = dict(_LABEL.findall(match.group(3) or ""))
            samples[name].append((labels, float(match.group(4))))
    return types, samples


def test_metrics_count_each_collectors_frames_and_bytes(live: tuple[SynthCapture, Client]) -> None:
    cap, served = live
    status, body, headers = served.call("GET", "/metrics", raw=True)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = _parse(body.decode())
    hosts = cap.frames.host_column()
    frames = {str(h.collector_id): int((hosts == h.collector_id).sum()) for h in cap.hosts}
    got = {s["collector_id"]: int(v) for s, v in samples["vspan_collector_frames_total"]}
    assert got == {"0": 0, **frames}  # collector 0: messages whose header was unreadable
    sizes = cap.frames.origlen.astype(np.int64)
    assert sum(v for _, v in samples["vspan_collector_bytes_total"]) > 0
    assert {v for _, v in samples["vspan_collector_lost_messages_total"]} == {0}
    assert samples["vspan_frames_total"] == [({}, float(len(cap.frames)))]
    assert samples["vspan_bytes_total"][0][1] >= int(sizes.sum()) > 0
    assert types["vspan_open_flows"] == "gauge"
    assert types["vspan_flows_total"] == "counter"
    invalid = samples["vspan_collector_invalid_messages_total"]
    assert [(s["collector_id"], v) for s, v in invalid] == [("0", 1.0)]
    assert invalid[0][0]["reason"]
    for name in ("vspan_store_rows_written", "vspan_ring_frames_written", "vspan_ring_segments",
                 "vspan_store_file_bytes", "vspan_collector_reordered_messages_total",
                 "vspan_collector_duplicate_messages_total"):  # fmt: skip
        assert name in types
    assert samples["vspan_ring_frames_written"][0][1] == len(cap.frames)
    assert samples["vspan_store_file_bytes"][0][1] > 0


def test_metrics_also_under_the_api_prefix(live: tuple[SynthCapture, Client]) -> None:
    _, served = live
    root = served.call("GET", "/metrics", raw=True)[1].decode().splitlines()
    prefixed = served.call("GET", "/api/v1/metrics", raw=True)[1].decode().splitlines()
    assert [line for line in prefixed if line.startswith("#")] == [
        line for line in root if line.startswith("#")
    ]
