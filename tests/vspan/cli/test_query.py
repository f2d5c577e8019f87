"""The query commands against a live analyzer API (uvicorn on 127.0.0.1) and against its
data directory: the same output either way, pages continued by cursor, errors that say what
to do (a store held by a running analyzer included); and ``vspan export`` read back by
tshark against the simulator's ground truth."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vspan.analysis.store.store import Store
from vspan.api.app import create_read_app
from vspan.api.deps import get_now
from vspan.cli import main
from vspan_testing.readstore import SECOND, ReadData, build, serve
from vspan_testing.tshark import fields, needs_tshark


@dataclass
class Setup:
    url: str
    data: ReadData

    @property
    def dir(self) -> str:
        return str(self.data.data_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    data = build(tmp_path_factory.mktemp("data"), ring=True)
    with Store(data.data_dir, read_only=True) as store:  # read-only: the CLI may open it too
        app = create_read_app(store)
        app.dependency_overrides[get_now] = lambda: data.now
        with serve(app) as url:
            yield Setup(url, data)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


QUERIES = [
    ["flows", "--vm", "web-01"],
    ["flows", "--scope", "cross-host", "--proto", "tcp", "--sort=-bytes", "--limit", "5"],
    ["flows", "--ip", "10.1.0.1", "--since", "2023-11-14T22:13:23Z", "--until", "1700000008"],
    ["policy", "hits", "--profile", "web"],
    ["policy", "violations", "--vm", "db-01", "--limit", "4"],
    ["migrations", "--vm", "web-01"],
    ["collectors"],
]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
@pytest.mark.parametrize("query", QUERIES, ids=lambda q: "-".join(q[:2]))
def test_the_analyzer_and_the_data_dir_print_the_same(
    setup: Setup, capsys: pytest.CaptureFixture[str], query: list[str], fmt: str
) -> None:
    remote = run([*query, "--analyzer", setup.url, "--format", fmt], capsys)
    local = run([*query, "--data-dir", setup.dir, "--format", fmt], capsys)
    assert remote[0] == 0, remote[2]
    assert remote == local
    rows = len(json.loads(remote[1])) if fmt == "json" else remote[1].count("\n") - 1
    assert rows >= 1


def test_flows_json_are_the_stored_records(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(["flows", "--data-dir", setup.dir, "--vm", "app-01", "--format",
                          "json", "--limit", "1000"], capsys)  # fmt: skip
    rec = setup.data.records
    want = rec[(rec.src_vm == "app-01") | (rec.dst_vm == "app-01")]
    rows = json.loads(out)
    assert status == 0
    assert sorted(r["flow_id"] for r in rows) == sorted(want["flow_id"].tolist())
    assert all(r["last"].endswith("Z") for r in rows)


def test_a_page_from_the_analyzer_continues_from_the_data_dir(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    head = ["flows", "--sort", "first", "--limit", "25", "--format", "json"]
    status, out, err = run([*head, "--analyzer", setup.url], capsys)
    assert status == 0
    prefix = "vspan flows: more rows: --cursor "
    assert err.startswith(prefix)
    cursor = err.strip().removeprefix(prefix)
    first = json.loads(out)
    status, out, err = run([*head, "--data-dir", setup.dir, "--cursor", cursor], capsys)
    second = json.loads(out)
    status, out, err = run([*head, "--analyzer", setup.url, "--cursor", err.split()[-1]], capsys)
    third = json.loads(out)
    assert err == ""  # the last page
    walked = [r["first_ns"] for r in first + second + third]
    assert walked == sorted(setup.data.records["first_ns"].tolist())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["flows", "--data-dir", "/nonexistent/vspan"],
         "vspan flows: error: no such data directory: /nonexistent/vspan"),
        (["flows", "--data-dir", "{dir}", "--since", "yesterday"],
         "vspan flows: error: since: cannot read 'yesterday' as a time: expected ISO 8601"),
        (["flows", "--analyzer", "{url}", "--since", "yesterday"],
         "vspan flows: error: the analyzer refused the query (HTTP 422): since: cannot read "
         "'yesterday' as a time"),
        (["policy", "violations", "--analyzer", "{url}", "--limit", "0"],
         "vspan policy: error: the analyzer refused the query (HTTP 422): limit: expected "
         "1..10000, got 0"),
        (["collectors", "--analyzer", "http://127.0.0.1:{closed}"],
         "vspan collectors: error: cannot reach the analyzer at http://127.0.0.1:{closed}: "),
        (["migrations", "--analyzer", "ftp://analyzer"],
         "vspan migrations: error: --analyzer: expected a URL like http://127.0.0.1:8080, got "
         "'ftp://analyzer'"),
        (["export", "-o", "x.pcapng", "--data-dir", "/nonexistent/vspan"],
         "vspan export: error: no packet ring in /nonexistent/vspan"),
    ],
)  # fmt: skip
def test_errors_exit_2_and_say_why(
    setup: Setup, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    port = closed_port()
    values = {"dir": setup.dir, "url": setup.url, "closed": port}
    status, out, err = run([a.format(**values) for a in argv], capsys)
    assert status == 2
    assert out == ""
    assert err.startswith(message.format(**values))


def test_a_store_held_by_a_running_analyzer_points_to_the_api(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "vspan.duckdb").write_bytes((setup.data.data_dir / "vspan.duckdb").read_bytes())
    holder = (
        "import sys; from vspan.analysis.store.store import Store; s = Store(sys.argv[1]); s.start(); "
        "print('open', flush=True); sys.stdin.read(); s.stop()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as analyzer:  # fmt: skip
        assert analyzer.stdout is not None
        assert analyzer.stdin is not None
        assert analyzer.stdout.readline() == "open\n"
        status, _, err = run(["flows", "--data-dir", str(tmp_path)], capsys)
        analyzer.stdin.close()
        assert analyzer.wait(timeout=30) == 0
    assert status == 2
    assert err == (
        f"vspan flows: error: {tmp_path}: the store is in use by a running analyzer; "
        "use --analyzer URL\n"
    )
    assert run(["flows", "--data-dir", str(tmp_path), "--limit", "1"], capsys)[0] == 0  # after


# --- vspan export -----------------------------------------------------------------------------


def truth_frames(data: ReadData, vm: str) -> np.ndarray:
    truth = data.cap.truth
    flows = np.flatnonzero(((truth.src_vm == vm) | (truth.dst_vm == vm)).to_numpy())
    return np.flatnonzero(np.isin(data.cap.flow, flows))


@pytest.mark.tshark
@needs_tshark
def test_export_by_vm_holds_its_frames(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "web.pcapng"
    status, text, _ = run(["export", "--vm", "web-01", "-o", str(out), "--data-dir", setup.dir,
                           "--inventory", str(setup.data.inventory_yaml)], capsys)  # fmt: skip
    rows = fields(out, ["frame.interface_name", "frame.comment", "eth.src", "eth.dst"])
    web = next(v for v in setup.data.cap.vms if v.name == "web-01")
    assert status == 0
    assert len(rows) == len(truth_frames(setup.data, "web-01")) > 50
    assert all(web.mac in (r[2], r[3]) for r in rows)
    assert all("web-01" in r[1] for r in rows)
    segments = len(list((setup.data.data_dir / "ring").glob("*.pcapng")))
    scanned = text.split("(")[1].split()[0]
    assert text == (
        f"vspan export: {len(rows):,} frames written to {out} ({scanned} segments scanned, "
        f"{segments - int(scanned)} skipped)\n"
    )


@pytest.mark.tshark
@needs_tshark
def test_export_of_a_flow_with_its_tags_stripped(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, _ = run(["flows", "--data-dir", setup.dir, "--proto", "tcp", "--scope",
                          "cross-host", "--sort=-packets", "--limit", "1", "--format", "json"],
                         capsys)  # fmt: skip
    record = json.loads(out)[0]
    pcap = tmp_path / "flow.pcap"
    status, text, _ = run(["export", "--flow", record["flow_uid"], "--format", "pcap",
                           "--strip-tag", "-o", str(pcap), "--data-dir", setup.dir], capsys)  # fmt: skip
    rows = fields(pcap, ["vntag.src", "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport"])
    assert status == 0
    assert len(rows) == record["copies"]
    assert {r[0] for r in rows} == {""}  # no VN-Tag left
    ends = {
        (record["src_ip"], str(record["src_port"])),
        (record["dst_ip"], str(record["dst_port"])),
    }
    assert all({(r[1], r[3]), (r[2], r[4])} == ends for r in rows)
    assert text.startswith(f"vspan export: {len(rows):,} frames written to {pcap} (")
    by_id = tmp_path / "by-id.pcap"
    status, _, _ = run(["export", "--flow", str(record["flow_id"]), "--format", "pcap",
                        "--strip-tag", "-o", str(by_id), "--data-dir", setup.dir], capsys)  # fmt: skip
    assert by_id.read_bytes() == pcap.read_bytes()


@pytest.mark.tshark
@needs_tshark
def test_export_by_host_and_time(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "hv02.pcapng"
    t0 = 1_700_000_002
    status, _, _ = run(["export", "--host", "hv02", "--since", str(t0), "--until",
                        "2023-11-14T22:13:25Z", "-o", str(out), "--data-dir", setup.dir,
                        "--inventory", str(setup.data.inventory_yaml)], capsys)  # fmt: skip
    frames = setup.data.cap.frames
    ts, host = frames.ts_ns, frames.host
    want = (host == 2) & (ts >= t0 * SECOND) & (ts < 1_700_000_005 * SECOND)
    rows = fields(out, ["frame.interface_name"])
    assert status == 0
    assert len(rows) == int(want.sum()) > 50
    assert {r[0].split("/")[0] for r in rows} == {"hv02"}
