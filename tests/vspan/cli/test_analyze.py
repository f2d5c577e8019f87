"""``vspan analyze`` as a subprocess.

The listening policy: a non-loopback ``--http`` address without ``--tokens`` is refused (exit
status 2, a message that says what to do) unless ``--insecure-listen`` (flag or config key)
is given, which is logged as a WARNING; and ``vspan collect`` sends its control-plane token
(``--control-token``, ``$VSPAN_CONTROL_TOKEN``, the config file's ``control_token``) to an
analyzer with a tokens file.

What is stored: a collector registers through the control plane, sends over the tunnel, and
the store and the exit line say what was stored. Regression (issue 17, point 1): VMs a
collector discovered behind a Linux bridge have no UUID. Their flows reached the store with
``src_vm_uuid = ""``, the cast to UUID failed the whole append — the flows of the VM that had
a UUID went with them — and at exit the analyzer printed "N flows stored" (flows finished)
over a table of 0 rows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vspan.analysis.store.store import Store
from vspan.collectors.config import CollectorFile
from vspan.collectors.control.client import ControlClient
from vspan.inventory import Port
from vspan.synth import generate_small, write_inventory_yaml
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.hosts import host_capture
from vspan_testing.netlab import vspan_command

READ, C1, C2 = "cli-read-0123456789", "cli-collector-1-0123456789", "cli-collector-2-0123456789"
VSPAN = [sys.executable, "-m", "vspan.cli"]


def analyze(folder: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [*VSPAN, "analyze", "--udp", "127.0.0.1:0", "--tcp", "off",
            "--data-dir", str(folder / "data"), *flags]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def test_a_non_loopback_http_without_tokens_is_refused(tmp_path: Path) -> None:
    done = analyze(tmp_path, "--http", "0.0.0.0:0")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "vspan analyze: error: http: --http 0.0.0.0:0 is not a loopback address and no "
        "--tokens file is given"
    )
    assert "--insecure-listen" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started
    config = tmp_path / "analyzer.yaml"
    config.write_text("http: '[::]:0'\n")
    assert analyze(tmp_path, "--config", str(config)).returncode == 2


@pytest.mark.slow
def test_insecure_listen_starts_and_says_so(tmp_path: Path) -> None:
    done = analyze(tmp_path, "--http", "0.0.0.0:0", "--insecure-listen", "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert "vspan analyze: WARNING: insecure listen: serving the API, dashboard and control " \
        "plane on 0.0.0.0:0 without tokens to every client" in done.stderr  # fmt: skip
    config = tmp_path / "analyzer.yaml"
    config.write_text("http: 0.0.0.0:0\ninsecure_listen: true\n")
    done = analyze(tmp_path, "--config", str(config), "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert "WARNING: insecure listen" in done.stderr
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"{READ}: read\n")
    done = analyze(tmp_path, "--http", "0.0.0.0:0", "--tokens", str(tokens), "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr


# --- the collector's token ------------------------------------------------------------------


@dataclass
class Running:
    proc: subprocess.Popen[str]
    url: str
    udp: str

    def get(self, path: str, token: str = READ) -> Any:
        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"{READ}: read\n{C1}: collector:1\n{C2}: collector:2\n")
    argv = [*VSPAN, "analyze", "--http", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--tcp", "off",
            "--data-dir", str(tmp_path / "data"), "--tokens", str(tokens)]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline, seen = time.monotonic() + 120, ""
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            found = re.search(r"udp (127\.0\.0\.1:\d+);.*API on (http://127\.0\.0\.1:\d+)/", line)
            if found is not None:
                yield Running(proc, found.group(2), found.group(1))
                return
            if not line and proc.poll() is not None:
                break
        raise AssertionError(f"vspan analyze did not start:\n{seen}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def collect(
    tmp_path: Path, running: Running, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``vspan collect --replay`` of host hv01's VM ports (collector 1), with a control plane."""
    cap = generate_small(seed=5)
    write_inventory_yaml(cap, tmp_path / "inventory.yaml")
    host = cap.hosts[0]
    host_capture(cap, host.collector_id, tmp_path / "host.pcap")
    argv = [*VSPAN, "collect", "--replay", str(tmp_path / "host.pcap"),
            "--inventory", str(tmp_path / "inventory.yaml"), "--host", host.name,
            "--collector-id", str(host.collector_id), "--analyzer", running.udp,
            "--control", running.url, "--max-speed", *flags]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "VSPAN_CONTROL_TOKEN"} | (env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environ,
                          check=False)  # fmt: skip


def registered(running: Running) -> dict[int, Any]:
    return {
        h["collector_id"]: h["registered"]
        for h in running.get("/api/v1/control/inventory")["hosts"]
    }


@pytest.mark.slow
def test_a_collector_without_its_token_is_refused(tmp_path: Path, running: Running) -> None:
    done = collect(tmp_path, running)
    assert done.returncode == 0, done.stderr
    assert "HTTP 401 Unauthorized: missing bearer token" in done.stderr
    done = collect(tmp_path, running, "--control-token", C2)
    assert "HTTP 403 Forbidden: the token is collector 2's, not 1's" in done.stderr
    assert registered(running) == {}
    assert running.get("/api/v1/collectors")["collectors"] == []  # no heartbeat kept either


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_collector_with_its_token_registers_and_reports(
    tmp_path: Path, running: Running, how: str
) -> None:
    flags = ["--control-token", C1] if how == "flag" else []
    env = {"VSPAN_CONTROL_TOKEN": C1} if how == "env" else None
    done = collect(tmp_path, running, *flags, env=env)
    assert done.returncode == 0, done.stderr
    assert "control plane" not in done.stderr, done.stderr
    assert registered(running)[1] is not None
    rows = running.get("/api/v1/collectors")["collectors"]
    capture = {r["collector_id"]: r["capture"] for r in rows}[1]
    assert capture is not None
    assert capture["drops"]["kernel"] == 0


@pytest.mark.slow
def test_query_commands_send_their_token(running: Running) -> None:
    argv = [*VSPAN, "flows", "--analyzer", running.url, "--format", "json"]
    environ = {k: v for k, v in os.environ.items() if k != "VSPAN_TOKEN"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environ,
                          check=False)  # fmt: skip
    assert done.returncode == 2
    assert "the analyzer refused the query (HTTP 401): missing bearer token" in done.stderr
    for extra, env in ((["--token", READ], environ), ([], environ | {"VSPAN_TOKEN": READ})):
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120,
                              env=env, check=False)  # fmt: skip
        assert (done.returncode, json.loads(done.stdout)) == (0, []), done.stderr


def test_the_config_files_control_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``control_token`` of ``--config`` reaches the control client (flag and env win)."""
    from vspan.cli import _build_parser
    from vspan.cli.collect import _build

    config = tmp_path / "collector.yaml"
    config.write_text(
        f"collector_id: 1\nanalyzer: 127.0.0.1:47470\ncontrol: http://127.0.0.1:1\n"
        f"control_token: {C1}\nstate_dir: {tmp_path}\n"
        "discovery: {kind: bridge, bridges: [br-none]}\n"
    )
    assert CollectorFile.load(str(config)).control_token == C1
    parser = _build_parser("collect")
    for argv, env, want in (([], {}, C1), (["--control-token", C2], {}, C2),
                            ([], {"VSPAN_CONTROL_TOKEN": C2}, C2)):  # fmt: skip
        args = parser.parse_args(["collect", "--config", str(config), *argv])
        monkeypatch.delenv("VSPAN_CONTROL_TOKEN", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        collector, _ = _build(args)
        assert collector.control is not None
        assert collector.control.token == want


def test_the_token_goes_in_the_authorization_header() -> None:
    from vspan.collectors.control.client import ControlClient
    from vspan.errors import ConfigError

    assert ControlClient("http://127.0.0.1:1", 1, token=f" {C1}\n".strip()).token == C1
    with pytest.raises(ConfigError, match="empty or spans lines"):
        ControlClient("http://127.0.0.1:1", 1, token="a\r\nX-Evil: 1")


CID = 7
T0 = 1_700_000_000 * 10**9
UUID_C = "6f1c2d9e-0000-4000-8000-00000000000c"
VMS = {  # name: (port, vif, MAC, IPv4, UUID); a and b found behind a bridge, c by libvirt
    "a": ("vm-a", 1, 0x0277_0000_0101, "10.77.1.1", None),
    "b": ("vm-b", 2, 0x0277_0000_0102, "10.77.1.2", None),
    "c": ("vnet0", 3, 0x0277_0000_0103, "10.77.1.3", UUID_C),
}


def udp_frame(src: str, dst: str, sport: int, payload: int) -> bytes:
    """A VN-tagged UDP frame from VM ``src`` to VM ``dst`` as this host's collector tags it
    (both local: ``d=0``, ``svif``/``dvif`` their vifs)."""
    s, d = VMS[src], VMS[dst]
    udp = struct.pack("!HHHH", sport, 9000, 8 + payload, 0) + bytes(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(s[3]), socket.inet_aton(d[3]))  # fmt: skip
    tag = encode_vntag(VnTag(d=0, svif=s[1], dvif=d[1], ethertype=0x0800))
    return d[2].to_bytes(6, "big") + s[2].to_bytes(6, "big") + b"\x89\x26" + tag + ip + udp


def test_flows_of_vms_without_a_uuid_are_stored_and_the_exit_line_counts_rows(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    analyzer = AnalyzerProcess(
        ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0", "--data-dir", str(data)],
        stderr_path=tmp_path / "analyze.stderr",
    ).wait_started()
    # (src, dst, source port, packets): 3 flows, one of them with the VM that has a UUID
    sent = [("a", "b", 40001, 3), ("b", "a", 40002, 2), ("a", "c", 40003, 4)]
    try:
        ports = [Port(p, 0, vif, mac, name, uuid) for name, (p, vif, mac, _, uuid) in VMS.items()]
        ControlClient(analyzer.api, CID).register("hv07", ports)
        frames = [
            udp_frame(src, dst, sport, 10 + i) for src, dst, sport, n in sent for i in range(n)
        ]
        message = encode_message(
            collector_id=CID, boot_id=1, seq=0, frames=frames,
            ts_ns=[T0 + 1000 * i for i in range(len(frames))],
        )  # fmt: skip
        assert analyzer.udp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, analyzer.udp)
    finally:
        summary = analyzer.stop()  # SIGTERM: every open flow is finished and written
    with Store(data, read_only=True) as store:
        flows = store.query_flows(limit=None, order="src_port")
    assert [(f.src_vm, f.dst_vm, f.src_port, f.packets) for f in flows.itertuples()] == sent
    uuids = flows[["src_vm_uuid", "dst_vm_uuid"]].astype(object)
    assert uuids.where(uuids.notna(), None).values.tolist() == [
        [None, None], [None, None], [None, UUID_C]
    ]  # fmt: skip
    assert summary.frames == len(frames)
    assert summary.stored == len(flows) == len(sent)  # the exit line counts stored rows
    assert (summary.finished, summary.not_stored) == (len(sent), 0), summary.line


def _collect_replay(pcap: Path, inventory: Path, host: str, cid: int, udp: tuple[str, int]) -> None:
    """``vspan collect --replay`` of one host's capture, as fast as it goes, to the end."""
    done = subprocess.run(
        [*vspan_command(), "collect", "--replay", str(pcap), "--inventory", str(inventory),
         "--host", host, "--collector-id", str(cid), "--analyzer", f"{udp[0]}:{udp[1]}",
         "--max-speed"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _metric(analyzer: AnalyzerProcess, name: str) -> int:
    """The value of the sample ``name`` (with its labels, in any order) on ``/metrics``; 0
    when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    want, _, labels = name.partition("{")
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    for family in text_string_to_metric_families(analyzer.get("/metrics")):
        for sample in family.samples:
            if sample.name == want and sample.labels == wanted:
                return int(sample.value)
    return 0


def test_a_replayed_old_capture_outlives_a_restart_unless_retention_is_by_capture_time(
    tmp_path: Path,
) -> None:
    # Regression (issue 17, point 6): flows replayed from a capture of 2023 were stored, and
    # deleted by the 30-day retention (on capture time) a moment after the analyzer
    # restarted, with no log line and no counter.
    cap = generate_small(seed=3)
    assert pd.Timestamp(int(cap.frames.ts_ns.max()), tz="UTC").year == 2023
    inventory, data = tmp_path / "inventory.yaml", tmp_path / "data"
    write_inventory_yaml(cap, inventory)
    flags = ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0",
             "--data-dir", str(data), "--inventory", str(inventory), "--retention-days", "30"]  # fmt: skip

    def analyze(run: str, *extra: str) -> AnalyzerProcess:
        log = tmp_path / f"analyze-{run}.stderr"
        return AnalyzerProcess([*flags, *extra], stderr_path=log).wait_started()

    first = analyze("replay")
    try:
        assert first.udp is not None
        for host in cap.inventory().hosts:
            pcap = tmp_path / f"{host.name}.pcap"
            host_capture(cap, host.collector_id, pcap)
            _collect_replay(pcap, inventory, host.name, host.collector_id, first.udp)
        deadline = time.monotonic() + 30
        while _metric(first, "vspan_frames_total") < len(cap.frames):
            assert time.monotonic() < deadline, first.stderr()
            time.sleep(0.1)
    finally:
        stored = first.stop()
    assert stored.stored == len(cap.truth) > 0, stored.line
    with Store(data, read_only=True) as store:
        assert store.count("flows") == len(cap.truth)

    # Restarted with the default (ingest time): retention runs in the first maintenance
    # round, a second after the start, and keeps what was stored minutes ago.
    again = analyze("restart")
    try:
        time.sleep(4)
        assert _metric(again, 'vspan_store_rows_deleted_total{table="flows",reason="age"}') == 0
    finally:
        again.stop()
    assert "deleted" not in again.stderr()
    with Store(data, read_only=True) as store:
        assert store.count("flows") == len(cap.truth)

    # By capture time, as asked: deleted, counted, logged.
    by_capture = analyze("capture", "--retention-basis", "capture")
    line = re.compile(
        rf"^vspan analyze: INFO: store flows: deleted {len(cap.truth)} rows "
        r"\(retention_days, basis capture\): last_ns before (\S+)$",
        re.MULTILINE,
    )
    try:
        deadline = time.monotonic() + 30
        while (found := line.search(by_capture.stderr())) is None:
            assert time.monotonic() < deadline, by_capture.stderr()
            time.sleep(0.1)
        counted = _metric(by_capture, 'vspan_store_rows_deleted_total{table="flows",reason="age"}')
    finally:
        by_capture.stop()
    cutoff = pd.Timestamp(found.group(1))
    now = pd.Timestamp.now(tz="UTC")
    assert now - pd.Timedelta(days=30, minutes=5) < cutoff <= now - pd.Timedelta(days=30)
    assert counted == len(cap.truth)
    with Store(data, read_only=True) as store:
        assert store.count("flows") == 0


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_an_unusable_data_dir_is_an_error_naming_it(tmp_path: Path, kind: str) -> None:
    # Regression: a data dir that cannot be made ended in a traceback (exit status 1).
    afile = tmp_path / "afile"
    afile.write_text("")
    data = afile if kind == "a file" else afile / "data"
    done = subprocess.run(
        [*VSPAN, "analyze", "--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0",
         "--data-dir", str(data), "--duration", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"vspan analyze: error: data_dir: cannot use {data} as the data directory:"
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_flows_open_when_the_analyzer_is_killed_are_stored_at_its_next_start(
    tmp_path: Path,
) -> None:
    # Regression: kill -9 lost every open flow without a word (the ring still held the
    # packets; no record, no log line, no counter).
    data = tmp_path / "data"
    flags = ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0",
             "--data-dir", str(data), "--idle-timeout", "300"]  # fmt: skip
    sent = [("a", "b", 41001, 3), ("b", "a", 41002, 2)]
    first = AnalyzerProcess(flags, stderr_path=tmp_path / "first.stderr").wait_started()
    try:
        ports = [Port(p, 0, vif, mac, name, uuid) for name, (p, vif, mac, _, uuid) in VMS.items()]
        ControlClient(first.api, CID).register("hv07", ports)
        frames = [udp_frame(s, d, sport, 10 + i) for s, d, sport, n in sent for i in range(n)]
        now = time.time_ns()  # flows that stay open: the idle timeout is 300 s
        message = encode_message(collector_id=CID, boot_id=1, seq=0, frames=frames,
                                 ts_ns=[now + 1000 * i for i in range(len(frames))])  # fmt: skip
        assert first.udp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, first.udp)
        deadline = time.monotonic() + 20
        while (
            '"state":"open"' not in first.get("/api/v1/flows")
            or not (data / "open-flows.parquet").exists()
        ):
            assert time.monotonic() < deadline, first.stderr()
            time.sleep(0.1)
    finally:
        first.kill()  # nothing is flushed
    with Store(data, read_only=True) as store:
        assert store.count("flows") == 0  # they were open
    second = AnalyzerProcess(flags, stderr_path=tmp_path / "second.stderr").wait_started()
    try:
        recovered = _metric(second, "vspan_flows_recovered_total")
    finally:
        second.stop()
    assert recovered == len(sent)
    assert f"stopped without finishing {len(sent)} open flows" in second.stderr()
    with Store(data, read_only=True) as store:
        flows = store.query_flows(limit=None, order="src_port")
    got = [(f.src_vm, f.dst_vm, f.src_port, f.packets, f.state) for f in flows.itertuples()]
    assert got == [(s, d, p, n, "closed") for s, d, p, n in sent]
    # A clean stop left nothing to recover: a third start stores nothing more.
    third = AnalyzerProcess(flags, stderr_path=tmp_path / "third.stderr").wait_started()
    third.stop()
    assert "stopped without finishing" not in third.stderr()
    with Store(data, read_only=True) as store:
        assert store.count("flows") == len(sent)
