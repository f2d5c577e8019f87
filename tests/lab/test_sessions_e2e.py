"""SPAN sessions end to end: real ``vspan analyze`` and ``vspan collect`` processes in the lab.

The lab: 2 hosts × 3 VMs with the underlay and a management network (``Lab.add_mgmt``). In
the management namespace runs analyzer A, the real command::

    vspan analyze --udp 10.99.0.254:PA --tcp off --http 10.99.0.254:PH --tokens T --data-dir D

and destination B, a UDP socket the test reads (a second analyzer's tunnel port). In each
host namespace runs ``vspan collect --bridge br0 ... --analyzer 10.99.0.254:PA --control
http://10.99.0.254:PH``. Sessions are created and deleted through A's HTTP API
(``POST``/``DELETE /api/v1/sessions``, with an admin token), as a user would; each collector
prints a line when what it mirrors changes, and the test waits for it.

Ground truth: marker datagrams the test sends from the VM namespaces (a flow number and a
sequence number in the payload), the lab's inventory, and the vifs each collector assigned
(its ``vifs.json``). What reached A is read off the wire: a packet socket on each host's
management link (``WireTap``) decodes every tunnel datagram to A's port; what reached B is
what B's socket received. Checked, phase by phase:

0. no session: everything is mirrored to A;
1. a session on h1v1 with ``filter: udp port 9999``: h1 exports only h1v1's UDP port 9999
   frames (both directions, so the intra-host delivery copy too); h2, none of whose VMs is
   selected, sends no tunnel datagram at all;
2. a second session on h2v2 (rx) with ``destination: udp://10.99.0.254:PB``: B gets exactly
   h2v2's filtered frames, A none of h2's;
3. both sessions deleted: everything to A again; B gets nothing more.

And the streams: A's accounting (``/api/v1/status``) counts for each collector exactly the
messages its final stats line says it sent to A, none lost; B received one stream from h2,
seq 0..n-1 without a gap, n the messages h2's stats line says it sent to B.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from vspan.errors import DecodeError
from vspan.wire.tunnel import Message, decode_message
from vspan.wire.vntag import decode_vntag
from vspan_testing.netlab import CollectorProcess, Lab, Mgmt, Vm, in_netns, make_lab, vspan_command

pytestmark = pytest.mark.root

CID = {"h1": 11, "h2": 22}
UPLINK = {"h1": "up-h2", "h2": "up-h1"}
MARK = b"VSS1"
PORT_IN, PORT_OUT = 9999, 9998
"""The UDP port the sessions' filter accepts, and one it does not."""
FILTER = f"udp port {PORT_IN}"
TOKEN = secrets.token_hex(16)
MARGIN_S = 0.5
"""Frames captured before a change may still be in a forwarder for its 20 ms flush."""


class Point(NamedTuple):
    """Where a frame was exported: collector and tag fields."""

    cid: int
    d: int
    svif: int
    dvif: int


@dataclass(frozen=True, slots=True)
class Copy:
    """One exported frame as it reached A (off the wire) or B."""

    at_ns: int
    """Arrival time (the test's clock)."""
    message: Message
    point: Point
    frame: bytes
    """The original frame (tag taken out)."""

    def marker(self) -> tuple[int, int] | None:
        """(flow, seq) of a marker datagram."""
        udp = self.udp()
        if udp is None or not udp[2].startswith(MARK):
            return None
        return udp[2][4], int.from_bytes(udp[2][5:9], "big")

    def udp(self) -> tuple[int, int, bytes] | None:
        """(source port, destination port, payload) of an IPv4 UDP frame."""
        f = self.frame
        if f[12:14] != b"\x08\x00" or len(f) < 42 or f[23] != 17:
            return None
        l4 = 14 + (f[14] & 0x0F) * 4
        sport, dport = struct.unpack_from("!HH", f, l4)
        return sport, dport, f[l4 + 8 :]


def copies_of(message: Message, at_ns: int) -> list[Copy]:
    out = []
    for i in range(message.count):
        f = message.frame(i)
        tag = decode_vntag(f, 14)
        point = Point(message.collector_id, tag.d, tag.svif, tag.dvif)
        out.append(Copy(at_ns, message, point, f[:12] + f[18:]))
    return out


# ---------------------------------------------------------------- what reached A and B


class WireTap:
    """Every tunnel datagram a host sends to ``port`` on the management network, decoded.

    A packet socket on the host's link into ``mgmt`` (``mg-hX``): what the collector put on
    the wire, whatever the analyzer does with it.
    """

    def __init__(self, mgmt: Mgmt, host: str, port: int) -> None:
        self.source, self.port = mgmt.host_ips[host], port
        self.messages: list[tuple[int, Message]] = []
        self.undecodable = 0
        with in_netns(mgmt.ns):  # ETH_P_ALL: a bridge port takes frames before others
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._sock.bind((mgmt.links[host], 3))
        self._sock.settimeout(0.05)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ip = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.time_ns()
            ihl = (ip[0] & 0x0F) * 4
            if len(ip) < ihl + 8 or ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != self.source:
                continue
            if int.from_bytes(ip[ihl + 2 : ihl + 4], "big") != self.port:
                continue
            try:
                message = decode_message(ip[ihl + 8 :])
            except DecodeError:
                self.undecodable += 1
                continue
            with self._lock:
                self.messages.append((at, message))

    def copies(self) -> list[Copy]:
        with self._lock:
            taken = list(self.messages)
        return [c for at, m in taken for c in copies_of(m, at)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class Receiver:
    """Destination B: a UDP socket in ``mgmt``; the messages it received, decoded."""

    def __init__(self, mgmt: Mgmt) -> None:
        with in_netns(mgmt.ns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((mgmt.ip, 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self.messages: list[tuple[int, Message]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            message = decode_message(data)  # a bad message fails the test (in copies)
            with self._lock:
                self.messages.append((time.time_ns(), message))

    def copies(self) -> list[Copy]:
        with self._lock:
            taken = list(self.messages)
        return [c for at, m in taken for c in copies_of(m, at)]

    def streams(self) -> dict[tuple[int, int], list[int]]:
        """(collector_id, boot_id) → seqs, in arrival order."""
        out: dict[tuple[int, int], list[int]] = defaultdict(list)
        with self._lock:
            for _, m in self.messages:
                out[(m.collector_id, m.boot_id)].append(m.seq)
        return dict(out)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


# ---------------------------------------------------------------- analyzer A


def free_port(mgmt: Mgmt, kind: int) -> int:
    """A port free on the management address (the namespace is the lab's own)."""
    with in_netns(mgmt.ns), socket.socket(socket.AF_INET, kind) as s:
        s.bind((mgmt.ip, 0))
        return int(s.getsockname()[1])


class AnalyzerProc:
    """``vspan analyze`` in the management namespace, its API asked with an admin token."""

    def __init__(self, lab: Lab, mgmt: Mgmt, workdir: Path) -> None:
        self.mgmt = mgmt
        self.udp = free_port(mgmt, socket.SOCK_DGRAM)
        self.http = free_port(mgmt, socket.SOCK_STREAM)
        self.url = f"http://{mgmt.ip}:{self.http}"
        tokens = workdir / "tokens.yaml"
        tokens.write_text(f"{TOKEN}: admin\n")
        self.log_path = workdir / "analyze.stderr"
        self._log = self.log_path.open("w")
        argv = [
            *vspan_command(), "analyze", "--udp", f"{mgmt.ip}:{self.udp}", "--tcp", "off",
            "--http", f"{mgmt.ip}:{self.http}", "--tokens", str(tokens),
            "--data-dir", str(workdir / "analyzer"),
        ]  # fmt: skip
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
        self.proc = lab.spawn(mgmt.ns, *argv, stderr=self._log, **quiet)

    def stderr(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "vspan analyze: receiving on" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vspan analyze did not start:\n{self.stderr()}")
            time.sleep(0.05)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON) of a request from the management namespace, with the token."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with in_netns(self.mgmt.ns):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    raw, status = response.read(), response.status
            except urllib.error.HTTPError as exc:
                raw, status = exc.read(), exc.code
        return status, json.loads(raw) if raw else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def flag_supported(command: str, flag: str) -> bool:
    """Whether ``vspan COMMAND --help`` lists ``flag``."""
    argv = [*vspan_command(), command, "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return flag in done.stdout


# ---------------------------------------------------------------- collectors

STOPPED = re.compile(
    r"^vspan collect: stopped: (?P<host>\S+)(?: -> (?P<dest>\S+))?: .*?exported (?P<exported>"
    r"[\d,]+), sent (?P<frames>[\d,]+) in (?P<messages>[\d,]+) messages, .*lost: "
    r"(?P<lost>.*)$",
    re.MULTILINE,
)
SESSIONS = re.compile(r"^vspan collect: (?P<line>h\d: (?:no SPAN session|SPAN sessions).*)$", re.M)


class Collector(CollectorProcess):
    """``vspan collect --bridge br0 --control URL`` in a host namespace."""

    def __init__(self, lab: Lab, mgmt: Mgmt, host: str, a: AnalyzerProc, workdir: Path) -> None:
        extra = ["--control", a.url]
        if flag_supported("collect", "--control-token"):  # the control plane's credentials
            extra += ["--control-token", TOKEN]
        super().__init__(
            lab, mgmt, host, cid=CID[host], uplink=UPLINK[host], port=a.udp, workdir=workdir,
            extra=tuple(extra),
        )  # fmt: skip

    def sessions_line(self) -> str | None:
        """The last line the collector printed about what it mirrors."""
        found = SESSIONS.findall(self.stderr())
        return found[-1] if found else None

    def wait_line(self, want: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.sessions_line() != want:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.host}: waited for {want!r}, last {self.sessions_line()!r}:\n"
                    f"{self.stderr()}"
                )
            time.sleep(0.05)

    def sent(self) -> dict[str | None, tuple[int, int]]:
        """Final stats: destination (None: A) → (frames sent, messages sent)."""
        out: dict[str | None, tuple[int, int]] = {}
        for m in STOPPED.finditer(self.stderr()):
            assert m["host"] == self.host
            out[m["dest"]] = (
                int(m["frames"].replace(",", "")),
                int(m["messages"].replace(",", "")),
            )
        assert None in out, f"no final stats line from {self.host}:\n{self.stderr()}"
        return out


# ---------------------------------------------------------------- traffic


@contextlib.contextmanager
def sinks(lab: Lab) -> Iterator[None]:
    """Sockets bound to both ports in every VM (no ICMP port unreachable)."""
    with contextlib.ExitStack() as stack:
        for vm in lab.vms.values():
            for port in (PORT_IN, PORT_OUT):
                sock = stack.enter_context(lab.socket(vm.ns, socket.AF_INET, socket.SOCK_DGRAM))
                sock.bind((vm.ip, port))
        yield


@dataclass(frozen=True, slots=True)
class Flow:
    src: Vm
    dst: Vm
    port: int
    count: int = 20


def send(lab: Lab, flow_id: int, flow: Flow) -> None:
    """``flow.count`` marker datagrams, a little apart."""
    with lab.socket(flow.src.ns, socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for seq in range(flow.count):
            payload = MARK + bytes([flow_id]) + seq.to_bytes(4, "big") + bytes(40)
            tx.sendto(payload, (flow.dst.ip, flow.port))
            if seq % 5 == 4:
                time.sleep(0.005)


def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- the test


@pytest.fixture
def site(request: pytest.FixtureRequest) -> tuple[Lab, Mgmt]:
    lab = make_lab(request, "vsss", hosts=2, vms_per_host=3)
    mgmt = lab.add_mgmt()
    lab.wait_links_up()
    return lab, mgmt


def test_sessions_select_filter_and_route_real_traffic(
    site: tuple[Lab, Mgmt], tmp_path: Path
) -> None:
    lab, mgmt = site
    vm = lab.vm
    a = AnalyzerProc(lab, mgmt, tmp_path)
    b = Receiver(mgmt)
    dest = f"udp://{mgmt.ip}:{b.port}"
    taps = {h: WireTap(mgmt, h, a.udp) for h in CID}
    collectors: dict[str, Collector] = {}
    try:
        a.wait_ready()
        for host in CID:
            collectors[host] = Collector(lab, mgmt, host, a, tmp_path)
        for c in collectors.values():
            c.wait_line(f"{c.host}: no SPAN session: every VM port mirrored (3)", timeout=60)
        vif = {v.name: collectors[v.host].vifs()[v.port] for v in lab.vms.values()}

        def at(host: str, d: int, src: Vm | None, dst: Vm | None) -> Point:
            return Point(CID[host], d, 0 if src is None else vif[src.name],
                         0 if dst is None else vif[dst.name])  # fmt: skip

        h1v1, h1v2, h1v3 = vm("h1v1"), vm("h1v2"), vm("h1v3")
        h2v1, h2v2, h2v3 = vm("h2v1"), vm("h2v2"), vm("h2v3")
        # flow id → (flow, expected copies at A, expected copies at B)
        plan: dict[int, tuple[Flow, list[Point], list[Point]]] = {}
        windows: dict[str, tuple[int, int]] = {}

        def phase(flows: Mapping[int, tuple[Flow, list[Point], list[Point]]]) -> None:
            for flow_id, (flow, _, _) in flows.items():
                send(lab, flow_id, flow)
            plan.update(flows)

        with sinks(lab):
            # 0: no session: everything to A
            phase({
                1: (Flow(h1v1, h1v2, PORT_IN), [at("h1", 0, h1v1, h1v2)], []),
                2: (Flow(h2v1, h1v3, PORT_OUT), [at("h2", 0, h2v1, None),
                                                 at("h1", 1, None, h1v3)], []),
            })  # fmt: skip
            status, _ = a.call("POST", "/api/v1/sessions",
                               {"name": "h1-udp", "vms": [h1v1.ns], "filter": FILTER})  # fmt: skip
            assert status == 201
            collectors["h1"].wait_line(
                "h1: SPAN sessions here: h1-udp (1 on the analyzer); 1 of 3 VM ports selected"
            )
            collectors["h2"].wait_line(
                "h2: SPAN sessions here: none (1 on the analyzer); 0 of 3 VM ports selected"
            )
            quiet_from = time.time_ns() + int(MARGIN_S * 1e9)
            time.sleep(MARGIN_S)
            # 1: h1v1's UDP port 9999 frames only, both directions; h2 sends nothing
            phase({
                3: (Flow(h1v1, h1v2, PORT_IN), [at("h1", 0, h1v1, h1v2)], []),
                4: (Flow(h1v1, h1v2, PORT_OUT), [], []),  # filtered out
                5: (Flow(h1v3, h1v2, PORT_IN), [], []),  # neither VM selected
                6: (Flow(h2v1, h2v2, PORT_IN), [], []),  # h2: nothing selected
                7: (Flow(h2v3, h1v1, PORT_IN), [at("h1", 1, None, h1v1)], []),
                8: (Flow(h1v2, h1v1, PORT_IN), [at("h1", 0, h1v2, h1v1),  # rx of h1v1, and
                                                at("h1", 1, h1v2, h1v1)], []),  # both ways
            })  # fmt: skip
            time.sleep(MARGIN_S)
            windows["one"] = (quiet_from, time.time_ns())
            session = {"name": "h2-to-b", "vms": [h2v2.ns], "direction": "rx",
                       "filter": FILTER, "destination": dest}  # fmt: skip
            assert a.call("POST", "/api/v1/sessions", session)[0] == 201
            collectors["h2"].wait_line(
                f"h2: SPAN sessions here: h2-to-b -> {dest} (2 on the analyzer); "
                "1 of 3 VM ports selected"
            )
            collectors["h1"].wait_line(
                "h1: SPAN sessions here: h1-udp (2 on the analyzer); 1 of 3 VM ports selected"
            )
            b_from = time.time_ns() + int(MARGIN_S * 1e9)
            time.sleep(MARGIN_S)
            # 2: h2v2's received UDP port 9999 frames to B only
            phase({
                9: (Flow(h2v1, h2v2, PORT_IN), [], [at("h2", 0, h2v1, h2v2)]),
                10: (Flow(h2v1, h2v2, PORT_OUT), [], []),  # filtered out
                11: (Flow(h1v1, h2v2, PORT_IN), [at("h1", 0, h1v1, None)],
                     [at("h2", 1, None, h2v2)]),
                12: (Flow(h2v2, h1v1, PORT_IN), [at("h1", 1, None, h1v1)], []),  # h2v2: rx
                13: (Flow(h2v3, h2v1, PORT_IN), [], []),
            })  # fmt: skip
            time.sleep(MARGIN_S)
            windows["two"] = (b_from, time.time_ns())
            for name in ("h1-udp", "h2-to-b"):
                assert a.call("DELETE", f"/api/v1/sessions/{name}")[0] == 204
            b_until = time.time_ns()
            for c in collectors.values():
                c.wait_line(f"{c.host}: no SPAN session: every VM port mirrored (3)")
            time.sleep(MARGIN_S)
            b_seen = len(b.messages)
            # 3: no session any more: everything to A again, nothing more to B
            phase({
                14: (Flow(h2v1, h2v2, PORT_OUT), [at("h2", 0, h2v1, h2v2)], []),
                15: (Flow(h1v3, h2v3, PORT_OUT), [at("h1", 0, h1v3, None),
                                                  at("h2", 1, None, h2v3)], []),
            })  # fmt: skip
            want_a = sum(len(ats) * f.count for f, ats, _ in plan.values())
            wait_for(lambda: sum(len(markers(t.copies())) for t in taps.values()) >= want_a, 10)
            time.sleep(MARGIN_S)
        for c in collectors.values():
            c.terminate()
        for c in collectors.values():
            assert c.wait(15) == 0, c.stderr()
        sent = {host: c.sent() for host, c in collectors.items()}
        for host, tap in taps.items():  # A received all its collectors sent
            wait_for(lambda t=tap, h=host: len(t.messages) >= sent[h][None][1], 10)
        status, doc = a.call("GET", "/api/v1/status")
        assert status == 200
        accounted = {row["collector_id"]: row for row in doc["collectors"]}
    finally:
        for c in collectors.values():
            c.stop()
            print(f"----- vspan collect on {c.host}:\n{c.stderr()}")
        for tap in taps.values():
            tap.stop()
        b.stop()
        a.stop()
        print(f"----- vspan analyze:\n{a.stderr()}")

    at_a = {h: t.copies() for h, t in taps.items()}
    at_b = b.copies()
    # every marker exactly where the sessions say, whole, nowhere else
    got: dict[tuple[str, int], list[Point]] = defaultdict(list)
    for where, copies in (("A", [c for cs in at_a.values() for c in cs]), ("B", at_b)):
        for copy in copies:
            if (mark := copy.marker()) is not None:
                got[(where, mark[0])].append(copy.point)
                assert mark[0] in plan, f"{where}: a marker of flow {mark[0]} the test never sent"
    wrong = []
    for flow_id, (flow, want_a_points, want_b_points) in plan.items():
        for where, want in (("A", want_a_points), ("B", want_b_points)):
            expected = sorted(want * flow.count)
            if sorted(got.get((where, flow_id), [])) != expected:
                wrong.append((where, flow_id, sorted(set(got.get((where, flow_id), [])))))
    assert not wrong, f"markers not exported as the sessions say: {wrong}"
    # per marker: each seq once per point (no duplicate, none missing)
    for flow_id, (flow, want_a_points, _) in plan.items():
        seqs = sorted(
            m[1] for c in at_a["h1"] + at_a["h2"] if (m := c.marker()) and m[0] == flow_id
        )
        assert seqs == sorted(list(range(flow.count)) * len(want_a_points)), flow_id

    # while sessions existed, h2 (no VM selected, then one to B only) sent nothing to A
    lo, hi = windows["one"][0], windows["two"][1]
    assert [c for c in at_a["h2"] if lo <= c.at_ns <= hi] == []
    # and everything h1 sent A then is h1v1's, UDP port 9999 (the filter, on all traffic)
    macs = {h1v1.mac_bytes}
    for copy in (c for c in at_a["h1"] if lo <= c.at_ns <= hi):
        udp = copy.udp()
        assert udp is not None, copy
        assert PORT_IN in udp[:2], copy
        assert macs & {copy.frame[:6], copy.frame[6:12]}, copy
    # B: only h2v2's received UDP port 9999 frames, only while its session existed
    assert at_b
    for copy in at_b:
        udp = copy.udp()
        assert udp is not None, copy
        assert udp[1] == PORT_IN, copy
        assert copy.frame[:6] == h2v2.mac_bytes, copy
        assert b_from - int(MARGIN_S * 1e9) <= copy.at_ns <= b_until + int(MARGIN_S * 1e9)
    assert len(b.messages) == b_seen, "B got messages after its session was deleted"

    # the streams: no loss, no gap, counts as the collectors say
    (stream, seqs), *others = b.streams().items()
    assert not others, b.streams().keys()
    assert stream[0] == CID["h2"]
    assert seqs == list(range(len(seqs)))
    assert (len(at_b), len(seqs)) == sent["h2"][dest]
    for host, cid in CID.items():
        row = accounted[cid]
        frames, messages = sent[host][None]
        assert (row["received"], row["lost"], row["duplicates"]) == (messages, 0, 0), row
        assert len(taps[host].messages) == messages
        assert len(at_a[host]) == frames
        assert {m.boot_id for _, m in taps[host].messages} == {row["boot_id"]}
        assert taps[host].undecodable == 0


def markers(copies: list[Copy]) -> list[tuple[int, int]]:
    return [m for c in copies if (m := c.marker()) is not None]
