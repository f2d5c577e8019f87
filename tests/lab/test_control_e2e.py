"""The control plane as a deployment lives it: collectors that outlive the analyzer, host
names that collide, an administrator who corrects the inventory — real ``vspan analyze`` and
``vspan collect`` processes in the namespace lab, with tokens.

The lab: 2 hosts × 2 VMs, the underlay and a management network (``Lab.add_mgmt``). The
analyzer runs in the management namespace on fixed ports (so that it can be started again at
the same address)::

    vspan analyze --udp 10.99.0.254:PU --tcp off --http 10.99.0.254:PH --tokens T --data-dir D

and a collector in each host namespace::

    vspan collect --bridge br0 --uplink up-hX --uplink mgmt0 --analyzer 10.99.0.254:PU \\
        --control http://10.99.0.254:PH --control-token TOKEN --collector-id N --host-name hX

What the test knows on its own: the lab (which VM is on which host, their namespaces, which
VM names a bridge collector gives: the namespaces'), the traffic it sends from the VM
namespaces, the processes it started (their pids), and the sessions it creates.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vspan_testing.analyzer_proc import AnalyzerProcess
from vspan_testing.netlab import CollectorProcess, Lab, Mgmt, in_netns, make_lab, vspan_command

pytestmark = pytest.mark.root

CID = {"h1": 11, "h2": 22}
UPLINK = {"h1": "up-h2", "h2": "up-h1"}
ADMIN = "control-e2e-admin-0123456789"
READ = "control-e2e-read-0123456789"
TOKEN = {11: "control-e2e-collector-11-0123", 22: "control-e2e-collector-22-0123"}
LOSSES = {"kernel", "runts", "queue_full", "send_error", "stopped", "unsent"}
"""The causes a collector's capture drops may have: losses only."""


# ---------------------------------------------------------------- the analyzer and its API


def free_port(mgmt: Mgmt, kind: int) -> int:
    with in_netns(mgmt.ns), socket.socket(socket.AF_INET, kind) as s:
        s.bind((mgmt.ip, 0))
        return int(s.getsockname()[1])


@dataclass
class Site:
    lab: Lab
    mgmt: Mgmt
    folder: Path
    udp: int
    http: int

    @property
    def url(self) -> str:
        return f"http://{self.mgmt.ip}:{self.http}"

    def analyzer(self, name: str) -> AnalyzerProcess:
        """``vspan analyze`` on the site's fixed ports and data directory."""
        tokens = self.folder / "tokens.yaml"
        tokens.write_text(
            f"{ADMIN}: admin\n{READ}: read\n"
            + "".join(f"{t}: collector:{cid}\n" for cid, t in TOKEN.items())
        )
        args = ["--udp", f"{self.mgmt.ip}:{self.udp}", "--tcp", "off",
                "--http", f"{self.mgmt.ip}:{self.http}", "--tokens", str(tokens),
                "--data-dir", str(self.folder / "data"), "--idle-timeout", "2"]  # fmt: skip
        proc = AnalyzerProcess(
            args, stderr_path=self.folder / f"analyze-{name}.stderr",
            spawn=lambda argv, **popen: self.lab.spawn(self.mgmt.ns, *argv, **popen),
        )  # fmt: skip
        return proc.wait_started(120)

    def call(self, method: str, path: str, token: str = ADMIN, body: Any = None) -> Any:
        """(status, JSON) of a request from the management namespace."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with in_netns(self.mgmt.ns):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    raw, status = response.read(), response.status
            except urllib.error.HTTPError as exc:
                raw, status = exc.read(), exc.code
        return status, json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        status, doc = self.call("GET", path, READ)
        assert status == 200, (path, status, doc)
        return doc

    def collector(self, host: str, *, cid: int | None = None, name: str | None = None,
                  tag: str = "") -> Collector:  # fmt: skip
        return Collector(self, host, cid=cid or CID[host], name=name or host, tag=tag)


def wait_for(what: str, done: Callable[[], Any], timeout: float, *logs: Any) -> Any:
    """``done()``'s first true value; an ``AssertionError`` naming ``what`` (and showing the
    logs) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := done()):
        if time.monotonic() > deadline:
            shown = "\n".join(f"----- {log.proc.args}:\n{log.stderr()}" for log in logs)
            raise AssertionError(f"waited {timeout} s for {what}\n{shown}")
        time.sleep(0.1)
    return value


# ---------------------------------------------------------------- collectors

SESSIONS = re.compile(r"^vspan collect: (?P<line>h\d: (?:no SPAN session|SPAN sessions).*)$", re.M)


class Collector(CollectorProcess):
    """``vspan collect --bridge br0 --control URL --control-token T`` in a host namespace."""

    def __init__(self, site: Site, host: str, *, cid: int, name: str, tag: str) -> None:
        extra = ("--control", site.url, "--control-token", TOKEN[cid], "--host-name", name)
        workdir = site.folder / f"collect-{host}{tag}"
        workdir.mkdir()
        super().__init__(site.lab, site.mgmt, host, cid=cid, uplink=UPLINK[host],
                         port=site.udp, workdir=workdir, extra=extra)  # fmt: skip

    def running(self) -> bool:
        return self.proc.poll() is None

    def sessions_line(self) -> str | None:
        found = SESSIONS.findall(self.stderr())
        return found[-1] if found else None

    def wait_line(self, want: str, timeout: float = 30) -> None:
        wait_for(f"{self.host}: {want!r}", lambda: self.sessions_line() == want, timeout, self)

    def wait_started(self, ports: int) -> None:
        wait_for(f"{self.host} to capture", lambda: f", {ports} VM ports" in self.stderr(),
                 30, self)  # fmt: skip


def registered(site: Site, after: float = 0.0) -> dict[str, float]:
    """Host name → the analyzer's time of its registration, for hosts registered after
    ``after`` (epoch seconds)."""
    hosts = site.get("/api/v1/control/inventory")["hosts"]
    return {h["name"]: h["registered"] for h in hosts if (h["registered"] or 0) > after}


# ---------------------------------------------------------------- traffic and flows


def udp_flow(lab: Lab, src: str, dst: str, port: int, count: int = 5) -> None:
    """``count`` datagrams from VM ``src`` to VM ``dst``:``port`` (a socket is bound there)."""
    a, b = lab.vms[src], lab.vms[dst]
    with (
        lab.socket(b.ns, socket.AF_INET, socket.SOCK_DGRAM) as rx,
        lab.socket(a.ns, socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((b.ip, port))
        rx.settimeout(5)
        for _ in range(count):
            tx.sendto(b"vspan-control-e2e", (b.ip, port))
            rx.recv(2048)


def named_flow(site: Site, port: int, *logs: Any, copies: int = 10) -> dict[str, Any]:
    """The flow to ``port`` once the analyzer shows it (open or closed) with all its
    ``copies`` (5 datagrams, each seen by both hosts): the two collectors send on their
    own, so a flow first shown with one host's copies only names that host as observer
    until the other's, with the earlier capture times, arrive."""

    def find() -> dict[str, Any] | None:
        flows = site.get(f"/api/v1/flows?port={port}&limit=10")["flows"]
        return next((f for f in flows if f["dst_port"] == port and f["copies"] >= copies), None)

    return dict(wait_for(f"the flow to port {port}", find, 20, *logs))


def check_named(site: Site, src: str, dst: str, port: int, *logs: Any, copies: int = 10) -> None:
    """A new flow has its VMs' names and the observing host's (not ``collector-N``)."""
    lab = site.lab
    udp_flow(lab, src, dst, port)
    flow = named_flow(site, port, *logs, copies=copies)
    a, b = lab.vms[src], lab.vms[dst]
    got = {k: flow[k] for k in ("src_vm", "dst_vm", "host", "src_host", "dst_host")}
    assert got == {"src_vm": a.ns, "dst_vm": b.ns, "host": a.host, "src_host": a.host,
                   "dst_host": b.host}, flow  # fmt: skip


# ---------------------------------------------------------------- the tests


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    lab = make_lab(request, "vsct", hosts=2, vms_per_host=2)
    mgmt = lab.add_mgmt()
    lab.wait_links_up()
    return Site(lab, mgmt, tmp_path, free_port(mgmt, socket.SOCK_DGRAM),
                free_port(mgmt, socket.SOCK_STREAM))  # fmt: skip


def test_collectors_started_first_register_when_the_analyzer_comes(site: Site) -> None:
    """Collectors started before the analyzer (their first registration: connection
    refused) register once it is up, without being restarted: the hosts are known, flows
    are named, a session created on the analyzer takes effect."""
    lab = site.lab
    collectors = {h: site.collector(h) for h in CID}
    analyzers: list[AnalyzerProcess] = []
    try:
        for c in collectors.values():
            c.wait_started(2)
            wait_for(f"{c.host}'s first registration to fail",
                     lambda c=c: "connection refused" in c.stderr(), 30, c)  # fmt: skip
        analyzers.append(site.analyzer("first"))
        logs = (*collectors.values(), *analyzers)
        wait_for("both hosts registered", lambda: len(registered(site)) == 2, 60, *logs)
        assert len(site.get("/api/v1/control/inventory")["vms"]) == 4
        assert {h["name"] for h in site.get("/api/v1/hosts")["hosts"]} >= set(CID)
        check_named(site, "h1v1", "h2v1", 7101, *logs)
        session = {"name": "h2v2-only", "vms": [lab.vms["h2v2"].ns]}
        assert site.call("POST", "/api/v1/sessions", body=session)[0] == 201
        collectors["h1"].wait_line(
            "h1: SPAN sessions here: none (1 on the analyzer); 0 of 2 VM ports selected"
        )
        collectors["h2"].wait_line(
            "h2: SPAN sessions here: h2v2-only (1 on the analyzer); 1 of 2 VM ports selected"
        )
        assert all(c.running() for c in collectors.values())
    finally:
        stop_all(collectors, analyzers)


def test_collectors_register_again_after_the_analyzer_restarts(site: Site) -> None:
    """The analyzer killed with SIGKILL and started again at the same address knows no host:
    the collectors, never restarted, register again — the hosts are known, new flows are
    named, the session it kept is applied and, deleted, stops applying — and their
    heartbeats say what they lost apart from what they left out on purpose."""
    lab = site.lab
    analyzers = [site.analyzer("first")]
    collectors = {h: site.collector(h) for h in CID}
    pids = {h: c.proc.pid for h, c in collectors.items()}
    try:
        logs = (*collectors.values(), *analyzers)
        wait_for("both hosts registered", lambda: len(registered(site)) == 2, 60, *logs)
        # a session: h1v1's UDP port 7300 only
        session = {"name": "h1v1-7300", "vms": [lab.vms["h1v1"].ns], "filter": "udp port 7300"}
        assert site.call("POST", "/api/v1/sessions", body=session)[0] == 201
        collectors["h1"].wait_line(
            "h1: SPAN sessions here: h1v1-7300 (1 on the analyzer); 1 of 2 VM ports selected"
        )
        collectors["h2"].wait_line(
            "h2: SPAN sessions here: none (1 on the analyzer); 0 of 2 VM ports selected"
        )
        # kill -9 and start again at the same address: it knows no host
        analyzers[-1].kill()
        restarted = time.time()
        analyzers.append(site.analyzer("second"))
        logs = (*collectors.values(), analyzers[-1])
        wait_for("both hosts registered again",
                 lambda: len(registered(site, after=restarted)) == 2, 60, *logs)  # fmt: skip
        # the session kept (sessions.json): h1v1's ports only, so h1's copies only
        check_named(site, "h1v1", "h2v2", 7300, *logs, copies=5)
        # the session deleted on the restarted analyzer: every VM mirrored again
        assert site.call("DELETE", "/api/v1/sessions/h1v1-7300")[0] == 204
        for c in collectors.values():
            c.wait_line(f"{c.host}: no SPAN session: every VM port mirrored (2)")
        check_named(site, "h2v2", "h1v2", 7102, *logs)
        assert all(c.running() for c in collectors.values())
        assert {h: c.proc.pid for h, c in collectors.items()} == pids
        check_capture_counters(site, logs)
        check_collectors_command(site, lab)
    finally:
        stop_all(collectors, analyzers)


def stop_all(collectors: dict[str, Collector], analyzers: list[AnalyzerProcess]) -> None:
    for c in collectors.values():
        c.stop()
        print(f"----- vspan collect on {c.host}:\n{c.stderr()}")
    for a in analyzers:
        a.kill()
        print(f"----- vspan analyze:\n{a.stderr()}")


def check_capture_counters(site: Site, logs: tuple[Any, ...]) -> None:
    """40 broadcasts from h1v1 reach h1v2's port too: delivery copies of frames exported at
    their sender, left out on purpose — in the heartbeat's ``not_mirrored``, not its drops,
    in ``/api/v1/collectors`` and in ``/metrics``."""
    lab = site.lab
    sent_at = time.time()
    with lab.socket(lab.vms["h1v1"].ns, socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for _ in range(40):
            tx.sendto(b"vspan-broadcast", ("10.77.255.255", 7400))

    def beat() -> dict[str, Any] | None:  # h1's heartbeat sent after the broadcasts
        rows = site.get("/api/v1/collectors")["collectors"]
        cap = next((r["capture"] for r in rows if r["collector_id"] == 11), None)
        if cap is None or _epoch(cap["time"]) < sent_at + 0.5:
            return None
        return dict(cap)

    capture = wait_for("a heartbeat from h1", beat, 30, *logs)
    assert set(capture["drops"]) <= LOSSES, capture
    assert capture["drops"] == dict.fromkeys(capture["drops"], 0), capture  # nothing lost
    assert capture["not_mirrored"]["duplicates"] >= 40, capture
    assert capture["frames"] == (
        capture["exported"] + sum(capture["not_mirrored"].values())
        + capture["drops"].get("runts", 0)
    ), capture  # fmt: skip
    metrics = _metrics(site)
    drops = metrics["vspan_collector_capture_drops_total"]
    causes = {labels["cause"] for labels, _ in drops if labels["collector_id"] == "11"}
    assert causes, drops
    assert causes <= LOSSES, drops
    left_out = {
        labels["reason"]: value
        for labels, value in metrics.get("vspan_collector_frames_not_mirrored_total", [])
        if labels["collector_id"] == "11"
    }
    assert left_out.get("duplicates", 0) >= 40, left_out


def check_collectors_command(site: Site, lab: Lab) -> None:
    """``vspan collectors``: a table without Python reprs, JSON with ISO 8601 times."""
    argv = [*vspan_command(), "collectors", "--analyzer", site.url, "--token", READ]
    table = lab.run(site.mgmt.ns, *argv).stdout
    assert "{" not in table, table
    assert "'" not in table, table
    header = table.splitlines()[0].split()
    assert {"captured", "capture_drops", "not_mirrored"} <= set(header), table
    assert re.search(r"duplicates=\d", table), table
    rows = json.loads(lab.run(site.mgmt.ns, *argv, "--format", "json").stdout)
    for row in rows:
        assert _epoch(row["time"]) > 0
        if row["capture"] is not None:
            assert _epoch(row["capture"]["time"]) > 0, row
            assert _epoch(row["capture"]["received"]) > 0, row


def _epoch(text: object) -> float:
    """An ISO 8601 UTC time of the API (``2024-05-01T12:00:00.123456Z``) as epoch seconds;
    anything else fails the test."""
    assert isinstance(text, str), text
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _metrics(site: Site) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` read with a token and parsed by ``prometheus_client``: samples by name."""
    request = urllib.request.Request(site.url + "/metrics")
    request.add_header("Authorization", f"Bearer {READ}")
    with in_netns(site.mgmt.ns), urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out
