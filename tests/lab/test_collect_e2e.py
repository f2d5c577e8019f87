"""``vspan collect`` end to end: real collectors in a namespace lab, a real receiver, real traffic.

The lab: 2 hosts × 3 VMs with the underlay (``vspan_testing.netlab``), plus a management
network (``Lab.add_mgmt``): namespace ``mgmt`` with bridge ``brm`` at 10.99.0.254, and in
every host an interface ``mgmt0`` (10.99.0.N) outside ``br0``. In each host namespace the
test runs the real command::

    ip netns exec HOST vspan collect --bridge br0 --uplink up-hX --uplink mgmt0 \\
        --analyzer 10.99.0.254:47470 --collector-id N --state-dir DIR --stats-interval 1

and the receiver is the analyzer's own code (``UdpReceiver``/``TcpReceiver`` → ``ingest`` →
``Accounting``), its socket bound inside ``mgmt`` from a thread switched with ``in_netns``.
Traffic comes from sockets the test opens inside the VM namespaces; the expected exports
are derived from what the test sent and from the lab's inventory (which VM has which MAC
on which host). The vif of each VM port is the collector's own assignment, read from
``vifs.json`` in its ``--state-dir`` (the bridge source knows no VM UUID, so its identities
are ``port:<port name>``); it is read once the collector is up and again after it stopped.

Checked against that ground truth: exactly-once export per the mirroring rules (markers),
per-pair counts, TCP payload bytes per direction per observation point, ICMP echo,
broadcast ARP copies, the tag rule of every frame received (frames from a bridge itself,
its IGMP reports at start-up, count as from outside), collector ids, vifs, and the
tunnel's sequence accounting against the collectors' final stats lines: no loss under
moderate load; while the receiver is down, a gap of exactly the messages sent meanwhile
(cross-checked with a packet socket on the management link); AUTH over TCP. Collector
stderr (the stats lines) is printed, so a failing test shows it.

The lab waits for its links to be up (``Lab.wait_links_up``) before any traffic: the
kernel enables a new link up to a second later and drops what is sent through it before.
"""

from __future__ import annotations

import contextlib
import queue
import re
import secrets
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from vspan.analysis.ingest.accounting import Accounting, StreamStats
from vspan.analysis.ingest.messages import ingest
from vspan.analysis.ingest.receivers import Chunk, ReceiverConfig, TcpReceiver, UdpReceiver
from vspan.wire.tunnel import decode_message
from vspan.wire.vntag import decode_vntag
from vspan_testing.netlab import CollectorProcess, Lab, Mgmt, Vm, in_netns, make_lab

pytestmark = pytest.mark.root

PORT = 47470
CID = {"h1": 11, "h2": 22}
"""Collector id of each host."""
UPLINK = {"h1": "up-h2", "h2": "up-h1"}
"""Each host's underlay port on br0."""
MARK = b"VSE2"
MARK_PORT = 9999
PING = b"vspan-lab-ping"  # the lab's echo payload
BROADCAST = b"\xff" * 6
STOP_TIMEOUT = 15.0


class Point(NamedTuple):
    """Where and how a frame was exported: collector and tag fields."""

    cid: int
    d: int
    svif: int
    dvif: int


@dataclass(frozen=True, slots=True)
class Obs:
    """One exported frame as the receiver got it (the tag taken out again)."""

    cid: int
    boot: int
    seq: int
    point: Point
    ts_ns: int
    cap_len: int
    orig_len: int
    frame: bytes
    """The original frame: the tagged one without 0x8926 and the 4-byte tag."""

    @property
    def dst(self) -> bytes:
        return self.frame[:6]

    @property
    def src(self) -> bytes:
        return self.frame[6:12]

    @property
    def ethertype(self) -> int:
        return int.from_bytes(self.frame[12:14], "big")

    def ipv4(self) -> tuple[int, str, str, int] | None:
        """(protocol, source, destination, offset of L4) of an IPv4 frame."""
        if self.ethertype != 0x0800 or len(self.frame) < 34:
            return None
        ihl = (self.frame[14] & 0x0F) * 4
        src, dst = socket.inet_ntoa(self.frame[26:30]), socket.inet_ntoa(self.frame[30:34])
        return self.frame[23], src, dst, 14 + ihl

    def marker(self) -> tuple[int, int, int] | None:
        """(flow, seq, payload length) of a marker datagram."""
        ip = self.ipv4()
        if ip is None or ip[0] != 17:
            return None
        l4 = ip[3]
        if int.from_bytes(self.frame[l4 + 2 : l4 + 4], "big") != MARK_PORT:
            return None
        payload = self.frame[l4 + 8 :]
        if payload[:4] != MARK:
            return None
        return payload[4], int.from_bytes(payload[5:9], "big"), len(payload)

    def tcp(self) -> tuple[str, int, str, int, int, int, int] | None:
        """(src, sport, dst, dport, seq, flags, payload length) of a TCP segment."""
        ip = self.ipv4()
        if ip is None or ip[0] != 6:
            return None
        l4 = ip[3]
        sport, dport, seq = struct.unpack_from("!HHI", self.frame, l4)
        doff, flags = self.frame[l4 + 12] >> 4, self.frame[l4 + 13]
        total = int.from_bytes(self.frame[16:18], "big")  # IP length: right for GSO frames too
        return ip[1], sport, ip[2], dport, seq, flags, total - (l4 - 14) - doff * 4

    def echo(self) -> tuple[str, str, int] | None:
        """(src, dst, type) of the lab's ICMP echo requests and replies."""
        ip = self.ipv4()
        if ip is None or ip[0] != 1 or PING not in self.frame[ip[3] + 8 :]:
            return None
        return ip[1], ip[2], self.frame[ip[3]]

    def arp(self) -> tuple[int, bytes, str, str] | None:
        """(operation, sender MAC, sender IP, target IP) of an ARP frame."""
        if self.ethertype != 0x0806 or len(self.frame) < 42:
            return None
        op = int.from_bytes(self.frame[20:22], "big")
        sender, target = socket.inet_ntoa(self.frame[28:32]), socket.inet_ntoa(self.frame[38:42])
        return op, self.frame[22:28], sender, target


# ---------------------------------------------------------------- the receiver


class LabReceiver:
    """The analyzer's receiver, ingest and accounting, listening inside ``mgmt``.

    Valid messages are kept (bytes, in arrival order) for the test to decode; ``pause``
    closes the socket (the analyzer is down) and ``resume`` opens a new one on the same
    address, with the same accounting.
    """

    def __init__(
        self,
        mgmt: Mgmt,
        *,
        transport: str = "udp",
        keys: Mapping[int, bytes] | None = None,
    ) -> None:
        self.mgmt = mgmt
        self.transport = transport
        self.keys = dict(keys) if keys else None
        self.accounting = Accounting()
        self.messages: list[bytes] = []
        self.authenticated: list[bool] = []
        self.kernel_drops = 0
        self._sink: queue.Queue[Chunk] = queue.Queue()
        self._receiver: UdpReceiver | TcpReceiver | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._consumer = threading.Thread(target=self._consume, daemon=True)
        self._decoded: list[Obs] = []
        self._n_decoded = 0

    def start(self) -> LabReceiver:
        self._consumer.start()
        self.resume()
        return self

    def resume(self) -> None:
        """Open the socket (again) inside the management namespace."""
        config = ReceiverConfig(rcvbuf=16 << 20, buffer_bytes=1 << 20, buffers=4, poll_s=0.05)
        addr = (self.mgmt.ip, PORT)
        receiver: UdpReceiver | TcpReceiver
        if self.transport == "udp":
            receiver = UdpReceiver(addr, sink=self._sink, config=config)
        else:
            receiver = TcpReceiver(
                addr, sink=self._sink, keys=self.keys, require_known=True, config=config
            )
        with in_netns(self.mgmt.ns):
            receiver.start()
        self._receiver = receiver

    def pause(self) -> None:
        """Close the socket; returns once everything it received is accounted."""
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        if isinstance(receiver, UdpReceiver):
            self.kernel_drops += max(0, receiver.kernel_drops() or 0)
        receiver.stop()
        self._sink.join()
        self._check()

    def stop(self) -> None:
        self.pause()
        self._done.set()
        self._consumer.join(10)
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"the receiver's consumer failed: {self._error!r}")

    def _consume(self) -> None:
        while not self._done.is_set():
            try:
                chunk = self._sink.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                if self._error is None:
                    self._take(chunk)
            except BaseException as exc:  # reported by _check in the test's thread
                self._error = exc
            finally:
                chunk.release()
                self._sink.task_done()

    def _take(self, chunk: Chunk) -> None:
        keys = self.keys
        ing = ingest(chunk.data, chunk.offsets, chunk.sizes, keys=keys, require_known=bool(keys))
        with self._lock:
            self.accounting.update(ing, time.monotonic())
            for cid, reason in chunk.rejected:
                self.accounting.add_rejected(cid, reason)
            for i in np.flatnonzero(ing.valid).tolist():
                start = int(chunk.offsets[i])
                self.messages.append(bytes(chunk.data[start : start + int(chunk.sizes[i])]))
                self.authenticated.append(bool(ing.authenticated[i]))

    def count(self) -> int:
        """Valid messages so far."""
        with self._lock:
            return len(self.messages)

    def observations(self) -> list[Obs]:
        """Every frame of every valid message so far, decoded (incrementally)."""
        with self._lock:
            raw = self.messages[self._n_decoded :]
            self._n_decoded += len(raw)
        for data in raw:
            m = decode_message(data, keys=self.keys)
            for i in range(m.count):
                f = m.frame(i)
                tag = decode_vntag(f, 14)
                assert (tag.p, tag.l, tag.r, tag.version) == (0, 0, 0, 0), tag
                self._decoded.append(
                    Obs(
                        m.collector_id,
                        m.boot_id,
                        m.seq,
                        Point(m.collector_id, tag.d, tag.svif, tag.dvif),
                        int(m.ts_ns[i]),
                        int(m.cap_len[i]),
                        int(m.orig_len[i]),
                        f[:12] + f[18:],
                    )
                )
        return list(self._decoded)

    def seqs(self, cid: int) -> list[int]:
        """``seq`` of the valid messages of collector ``cid``, in arrival order."""
        with self._lock:
            messages = list(self.messages)
        return [
            int.from_bytes(m[16:20], "big")
            for m in messages
            if int.from_bytes(m[8:12], "big") == cid
        ]


SO_TIMESTAMPNS = 35  # Linux asm-generic/socket.h (not exported by the socket module)


class WireTap:
    """Tunnel datagrams on one link into ``mgmt`` (a packet socket), with kernel timestamps.

    What the collector put on the wire, independently of any receiver being up.
    """

    def __init__(self, mgmt: Mgmt, host: str) -> None:
        self.link = mgmt.links[host]
        self.seen: list[tuple[int, int, int]] = []
        """(arrival, ns since the epoch; collector_id; seq) of every tunnel datagram."""
        # ETH_P_ALL: a bridge port hands its frames to the bridge before per-protocol sockets
        with in_netns(mgmt.ns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._sock.bind((self.link, 3))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ip, ancillary, _, addr = self._sock.recvmsg(65535, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            except OSError:
                return
            ihl = (ip[0] & 0x0F) * 4
            inbound = addr[:2] == (self.link, 0x0800) and addr[2] != socket.PACKET_OUTGOING
            if not inbound or ip[9] != 17 or len(ip) < ihl + 8 + 24:
                continue
            msg = ip[ihl + 8 :]
            if int.from_bytes(ip[ihl + 2 : ihl + 4], "big") != PORT or msg[:2] != b"VS":
                continue
            stamp = [
                c
                for lvl, kind, c in ancillary
                if (lvl, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)
            ]
            sec, nsec = struct.unpack("=qq", stamp[0]) if stamp else (0, time.time_ns())
            cid, _, seq = struct.unpack_from("!III", msg, 8)
            self.seen.append((sec * 1_000_000_000 + nsec, cid, seq))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


# ---------------------------------------------------------------- the collectors

STOPPED = re.compile(
    r"^vspan collect: stopped: (?P<host>\S+): (?P<ports>\d+) ports, captured (?P<captured>[\d,]+) "
    r"frames, exported (?P<exported>[\d,]+), sent (?P<frames_sent>[\d,]+) in "
    r"(?P<messages_sent>[\d,]+) messages, waiting (?P<waiting>[\d,]+), truncated "
    r"(?P<truncated>[\d,]+), lost: (?P<lost>.*?), not mirrored: (?P<not_mirrored>[^;]*)(?:; .*)?$",
    re.MULTILINE,
)
_REASON = re.compile(r"(?P<reason>\w+) (?P<frames>[\d,]+)(?: \((?P<messages>[\d,]+) messages\))?")


@dataclass(frozen=True, slots=True)
class Stats:
    """A collector's final stats line."""

    exported: int
    frames_sent: int
    messages_sent: int
    lost: dict[str, int]
    """Non-zero frames lost by cause (``kernel``: the capture ring, ``send_error``, ...)."""
    lost_messages: dict[str, int]
    """Messages lost by the sender, by cause (the part in parentheses)."""
    not_mirrored: dict[str, int]
    """Non-zero frames left out on purpose by reason, e.g. ``duplicates``."""


def _number(text: str) -> int:
    return int(text.replace(",", ""))


class CollectorProc(CollectorProcess):
    """The e2e test's collector: UDP port ``PORT``, its start line and final stats."""

    def __init__(
        self, lab: Lab, mgmt: Mgmt, host: str, workdir: Path, extra: tuple[str, ...] = ()
    ) -> None:
        super().__init__(
            lab,
            mgmt,
            host,
            cid=CID[host],
            uplink=UPLINK[host],
            port=PORT,
            workdir=workdir,
            extra=extra,
        )

    def wait_ready(self, deadline: float) -> None:
        """Until the start line says its 3 VM ports are captured."""
        ready = re.compile(rf"collector {self.cid}\) -> .*, 3 VM ports$", re.MULTILINE)
        while not ready.search(self.stderr()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"vspan collect on {self.host} did not start (exit {self.proc.poll()}):\n"
                    f"{self.stderr()}"
                )
            time.sleep(0.02)

    def read_vifs(self) -> dict[str, int]:
        """Port name → vif, from the collector's state file."""
        return self.vifs()

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return super().wait(timeout)

    def stats(self) -> Stats:
        found = list(STOPPED.finditer(self.stderr()))
        assert found, f"no final stats line from {self.host}:\n{self.stderr()}"
        m = found[-1]
        lost, lost_messages, not_mirrored = {}, {}, {}
        for part in m["lost"].split(", ") if m["lost"] != "none" else []:
            r = _REASON.fullmatch(part)
            assert r is not None, (part, m[0])
            lost[r["reason"]] = _number(r["frames"])
            if r["messages"]:
                lost_messages[r["reason"]] = _number(r["messages"])
        for part in m["not_mirrored"].split(", ") if m["not_mirrored"] != "none" else []:
            reason, _, count = part.rpartition(" ")
            not_mirrored[reason] = _number(count)
        return Stats(
            _number(m["exported"]),
            _number(m["frames_sent"]),
            _number(m["messages_sent"]),
            lost,
            lost_messages,
            not_mirrored,
        )


@contextlib.contextmanager
def collectors(
    site: Site, workdir: Path, hosts: list[str], extra: Mapping[str, tuple[str, ...]] | None = None
) -> Iterator[dict[str, CollectorProc]]:
    """Start a collector per host and wait until each captures; always stop and print stderr."""
    procs: dict[str, CollectorProc] = {}
    try:
        for host in hosts:
            procs[host] = CollectorProc(
                site.lab, site.mgmt, host, workdir, (extra or {}).get(host, ())
            )
        deadline = time.monotonic() + 30
        for proc in procs.values():
            proc.wait_ready(deadline)
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            with contextlib.suppress(AssertionError):
                proc.wait()
            print(f"----- vspan collect on {proc.host} (collector {proc.cid}), stderr:")
            print(proc.stderr())


def stop_all(procs: Mapping[str, CollectorProc]) -> dict[str, Stats]:
    """SIGTERM every collector at once (they flush), wait, and read their final stats."""
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        assert proc.wait() == 0, f"vspan collect on {proc.host} failed:\n{proc.stderr()}"
    return {host: proc.stats() for host, proc in procs.items()}


# ---------------------------------------------------------------- ground truth


class Inventory:
    """Which VM has which MAC on which host, and the vif its host's collector gave it."""

    def __init__(self, lab: Lab, vifs: Mapping[str, Mapping[str, int]]) -> None:
        self.lab = lab
        self.vifs = {host: dict(table) for host, table in vifs.items()}
        self.by_mac = {vm.mac_bytes: vm for vm in lab.vms.values()}
        self.host_of = {cid: host for host, cid in CID.items()}
        for host, table in self.vifs.items():
            ports = {vm.port for vm in lab.vms.values() if vm.host == host}
            assert set(table) == ports, f"{host}: vifs for {sorted(table)}, VM ports {ports}"
            assert len(set(table.values())) == len(table), f"{host}: vifs not distinct: {table}"
            assert all(1 <= v <= 4095 for v in table.values()), table

    def vif(self, vm: Vm) -> int:
        return self.vifs[vm.host][vm.port]

    def points(self, src: Vm, dst: Vm) -> list[Point]:
        """Where a unicast frame from ``src`` to ``dst`` is exported, per the mirroring rules."""
        if src.host == dst.host:  # intra-host: once, at the sender, both vifs known
            return [Point(CID[src.host], 0, self.vif(src), self.vif(dst))]
        return [
            Point(CID[src.host], 0, self.vif(src), 0),  # sent into the vswitch
            Point(CID[dst.host], 1, 0, self.vif(dst)),  # delivered from the uplink
        ]

    def broadcast_points(self, src: Vm) -> list[Point]:
        """A broadcast from ``src``: once at its host, once per VM of every other host."""
        out = [Point(CID[src.host], 0, self.vif(src), 0)]
        for host, table in self.vifs.items():
            if host != src.host:
                out += [Point(CID[host], 1, 0, vif) for vif in sorted(table.values())]
        return out

    def rule_violation(self, o: Obs) -> str | None:
        """Why ``o``'s tag breaks the mirroring rules for its collector, or None."""
        host = self.host_of.get(o.cid)
        if host is None or host not in self.vifs:
            return f"collector {o.cid} is not one the test started"
        src = self.by_mac.get(o.src)
        if src is not None and src.host == host:  # sent by a local VM
            dst = None if o.dst[0] & 1 else self.by_mac.get(o.dst)
            dvif = self.vif(dst) if dst is not None and dst.host == host else 0
            want = Point(o.cid, 0, self.vif(src), dvif)
            return None if o.point == want else f"sent by {src.name}: {o.point}, expected {want}"
        # from outside: another host's VM, or a bridge itself (its IGMP reports at start-up)
        if o.point.d == 1 and o.point.svif == 0 and o.point.dvif in self.vifs[host].values():
            return None
        sender = o.src.hex(":") if src is None else f"{src.name} on {src.host}"
        return f"from {sender}, seen on {host}: {o.point}, expected d=1 svif=0 and a local dvif"


# ---------------------------------------------------------------- traffic


@contextlib.contextmanager
def udp_sinks(lab: Lab) -> Iterator[None]:
    """A socket bound to the marker port in every VM (no ICMP port unreachable)."""
    with contextlib.ExitStack() as stack:
        for vm in lab.vms.values():
            sock = stack.enter_context(lab.socket(vm.ns, socket.AF_INET, socket.SOCK_DGRAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((vm.ip, MARK_PORT))
        yield


def send_markers(
    lab: Lab,
    src: Vm,
    dst: Vm,
    flow: int,
    count: int,
    *,
    burst: int = 10,
    gap_s: float = 0.002,
    size: Callable[[int], int] = lambda i: 20 + (i * 97) % 1150,
) -> dict[int, int]:
    """``count`` marker datagrams, ``burst`` at a time; {seq: payload length}."""
    sent = {}
    with lab.socket(src.ns, socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for seq in range(count):
            head = MARK + bytes([flow]) + seq.to_bytes(4, "big")
            payload = head + bytes(max(0, size(seq) - len(head)))
            tx.sendto(payload, (dst.ip, MARK_PORT))
            sent[seq] = len(payload)
            if (seq + 1) % burst == 0:
                time.sleep(gap_s)
    return sent


def total_retrans(sock: socket.socket) -> int:
    """``tcpi_total_retrans`` of ``struct tcp_info`` (8 bytes of u8, then u32 fields)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("=I", info, 8 + 23 * 4)[0])


@dataclass
class TcpExchange:
    """A client uploads ``up`` bytes, the server answers ``down`` bytes, both close."""

    client: Vm
    server: Vm
    up: int
    down: int
    client_port: int = 0
    server_port: int = 0
    retrans: dict[str, int] = field(default_factory=dict)
    """``client``/``server`` → segments retransmitted (read at ``finish``)."""
    _socks: list[socket.socket] = field(default_factory=list)

    def run(self, lab: Lab, port: int) -> None:
        up, down = bytes(range(256)) * (self.up // 256 + 1), bytes(range(255, -1, -1))
        up, down = up[: self.up], (down * (self.down // 256 + 1))[: self.down]
        listener = lab.socket(self.server.ns, socket.AF_INET, socket.SOCK_STREAM)
        client = lab.socket(self.client.ns, socket.AF_INET, socket.SOCK_STREAM)
        self._socks += [listener, client]
        listener.settimeout(10)
        client.settimeout(10)
        listener.bind((self.server.ip, port))
        listener.listen(1)
        got: dict[str, Any] = {}

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                self._socks.append(conn)
                conn.settimeout(10)
                n = 0
                while chunk := conn.recv(65536):
                    n += len(chunk)
                got["server"] = n
                conn.sendall(down)
                conn.shutdown(socket.SHUT_WR)
            except OSError as exc:
                got["error"] = exc

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client.connect((self.server.ip, port))
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)
        n = 0
        while chunk := client.recv(65536):
            n += len(chunk)
        server.join(10)
        assert (got.get("server"), n) == (self.up, self.down), f"the lab lost TCP data: {got}"
        self.client_port, self.server_port = client.getsockname()[1], port

    def finish(self) -> None:
        """Read the retransmission counters (once traffic settled) and close; idempotent."""
        if len(self._socks) == 3:
            _, client, conn = self._socks
            self.retrans = {"client": total_retrans(client), "server": total_retrans(conn)}
        for sock in self._socks:
            sock.close()
        self._socks.clear()


def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    """Poll ``done`` until true or ``timeout``; whether it became true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def markers(obs: list[Obs]) -> dict[tuple[int, int], list[Obs]]:
    """(flow, seq) → the exported copies of that marker datagram."""
    out: dict[tuple[int, int], list[Obs]] = defaultdict(list)
    for o in obs:
        if (m := o.marker()) is not None:
            out[(m[0], m[1])].append(o)
    return out


# ---------------------------------------------------------------- the lab


@dataclass(frozen=True, slots=True)
class Site:
    lab: Lab
    mgmt: Mgmt


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest) -> Site:
    """2 hosts × 3 VMs, the underlay and a management network; skips unless root with ip."""
    lab = make_lab(request, "vsce", hosts=2, vms_per_host=3)
    mgmt = lab.add_mgmt()
    lab.wait_links_up()  # else the first frames through a new link are dropped
    return Site(lab, mgmt)


# ---------------------------------------------------------------- checks


def check_rules(obs: list[Obs], inv: Inventory) -> None:
    """Every frame received carries the tag the mirroring rules give it at its collector."""
    bad = [f"{o.cid}/{o.seq}: {why}" for o in obs if (why := inv.rule_violation(o))]
    assert not bad, f"{len(bad)} frames break the mirroring rules, e.g.:\n" + "\n".join(bad[:10])


def check_markers(
    obs: list[Obs], flows: Mapping[int, tuple[Vm, Vm, dict[int, int]]], inv: Inventory
) -> Counter[tuple[str, str, Point]]:
    """Each marker sent is exported exactly at its points, whole; none other arrives.

    Returns the copies counted per (sender, receiver, point), checked against what was sent.
    """
    got = markers(obs)
    counted = Counter(
        (flows[flow][0].name, flows[flow][1].name, o.point)
        for (flow, _), copies in got.items()
        if flow in flows
        for o in copies
    )
    wrong = {}
    for flow, (src, dst, sent) in flows.items():
        want = sorted(inv.points(src, dst))
        for seq, length in sent.items():
            copies = got.pop((flow, seq), [])
            if sorted(o.point for o in copies) != want:
                wrong[(flow, seq)] = (sorted(o.point for o in copies), want)
            for o in copies:  # whole: 14 + 20 + 8 + payload, plus the 6 tag bytes
                assert o.cap_len == o.orig_len == 6 + 42 + length, (flow, seq, o)
                assert o.marker() == (flow, seq, length)
    assert not wrong, f"{len(wrong)} markers not exported exactly per the rules, e.g. " + str(
        list(wrong.items())[:5]
    )
    assert not got, f"markers the test did not send: {sorted(got)[:10]}"
    expected: Counter[tuple[str, str, Point]] = Counter()
    for src, dst, sent in flows.values():
        for point in inv.points(src, dst):
            expected[(src.name, dst.name, point)] += len(sent)
    assert counted == expected
    return counted


def check_tcp(obs: list[Obs], exchanges: list[TcpExchange], inv: Inventory) -> dict[str, int]:
    """Payload bytes each way at each observation point are exactly what was sent.

    Per point and direction the segments' sequence ranges (relative to the SYN) must cover
    exactly ``[0, sent)``; bytes seen twice are only allowed when that sender's kernel
    retransmitted (``tcpi_total_retrans``). Returns bytes per direction and point.
    """
    report = {}
    for x in exchanges:
        c, s = x.client, x.server
        ways = {
            (c.ip, x.client_port, s.ip, x.server_port): ("client", c, s, x.up),
            (s.ip, x.server_port, c.ip, x.client_port): ("server", s, c, x.down),
        }
        segs: dict[tuple[str, Point], list[tuple[int, int, int]]] = defaultdict(list)
        for o in obs:
            if (t := o.tcp()) is not None and (way := ways.get(t[:4])) is not None:
                segs[(way[0], o.point)].append((t[4], t[5], t[6]))
        for who, src, dst, sent in ways.values():
            points = sorted(p for w, p in segs if w == who)
            assert points == sorted(inv.points(src, dst)), (src.name, dst.name, points)
            for point in points:
                seen = segs[(who, point)]
                syn = [seq for seq, flags, _ in seen if flags & 0x02]
                assert syn, f"{src.name}->{dst.name} at {point}: no SYN"
                assert any(flags & 0x01 for _, flags, _ in seen), f"{point}: no FIN"
                ranges = sorted(((seq - syn[0] - 1) % 2**32, n) for seq, flags, n in seen if n > 0)
                covered, total = 0, 0
                for start, n in ranges:
                    assert start <= covered, f"{src.name}->{dst.name} at {point}: hole at {covered}"
                    covered = max(covered, start + n)
                    total += n
                assert covered == sent, f"{src.name}->{dst.name} at {point}: {covered} of {sent}"
                assert total == sent or x.retrans[who] > 0, (
                    f"{src.name}->{dst.name} at {point}: {total} payload bytes for {sent} sent, "
                    "without a retransmission"
                )
                report[f"{src.name}->{dst.name} {point}"] = covered
    return report


def check_echo(obs: list[Obs], pings: list[tuple[Vm, Vm, int]], inv: Inventory) -> None:
    """ICMP echo requests and replies, counted at each of their points."""
    want: Counter[tuple[Point, str, str, int]] = Counter()
    for a, b, n in pings:
        for p in inv.points(a, b):
            want[(p, a.ip, b.ip, 8)] += n
        for p in inv.points(b, a):
            want[(p, b.ip, a.ip, 0)] += n
    got = Counter((o.point, *e) for o in obs if (e := o.echo()) is not None)
    assert got == want


def check_copies(obs: list[Obs], inv: Inventory, window: tuple[int, int]) -> int:
    """Every non-TCP unicast frame between VMs is exported at its points, as often at each;
    a broadcast once at the sender's host and once per VM of the other host. Frames first
    seen in ``window`` (ns) count (the lab is quiet before and after); returns how many."""
    copies: dict[bytes, list[Obs]] = defaultdict(list)
    for o in obs:
        if o.src in inv.by_mac and o.tcp() is None and (o.dst == BROADCAST or not o.dst[0] & 1):
            copies[o.frame].append(o)
    checked, bad = 0, []
    for frame, seen in copies.items():
        if not window[0] <= min(o.ts_ns for o in seen) < window[1]:
            continue
        src, dst = inv.by_mac[seen[0].src], inv.by_mac.get(seen[0].dst)
        if dst is None and seen[0].dst != BROADCAST:
            bad.append(f"{src.name} -> unknown unicast {seen[0].dst.hex(':')}")
            continue
        where = inv.broadcast_points(src) if dst is None else inv.points(src, dst)
        got = Counter(o.point for o in seen)
        k = got.get(where[0], 0)
        if got != Counter(dict.fromkeys(where, k)):
            bad.append(f"{src.name}->{dst.name if dst else 'all'} {frame[:42].hex()}: {got}")
        checked += 1
    assert not bad, f"{len(bad)} frames with wrong copies, e.g.:\n" + "\n".join(bad[:5])
    return checked


def check_arp(obs: list[Obs], pings: list[tuple[Vm, Vm, int]], inv: Inventory) -> None:
    """After a flush each pinger asked by broadcast and got an answer, seen where due."""
    for a, b, _ in pings:
        requests = {
            o.point for o in obs if o.arp() == (1, a.mac_bytes, a.ip, b.ip) and o.dst == BROADCAST
        }
        assert requests == set(inv.broadcast_points(a)), (a.name, b.ip, requests)
        replies = {o.point for o in obs if o.arp() == (2, b.mac_bytes, b.ip, a.ip)}
        assert replies == set(inv.points(b, a)), (b.name, a.ip, replies)


def stream_of(receiver: LabReceiver, cid: int) -> StreamStats:
    """The accounting of collector ``cid``'s one sequence (it never restarted)."""
    col = receiver.accounting.collector(cid)
    assert col is not None, f"nothing from collector {cid}"
    assert (len(col.boots), col.restarts) == (1, 0), col
    assert col.boot_id is not None
    stream = receiver.accounting.stream(cid, col.boot_id)
    assert stream is not None
    return stream


def check_sequences(receiver: LabReceiver, stats: Mapping[str, Stats]) -> None:
    """One sequence per collector, complete: seq 0..n-1, n = messages the collector sent."""
    streams = receiver.accounting.streams()
    assert sorted(streams.collector_id) == sorted(CID[h] for h in stats)  # one boot each
    for host, st in stats.items():
        cid = CID[host]
        row = stream_of(receiver, cid)
        counts = {k: getattr(row, k) for k in ("lost", "duplicates", "reordered", "stale")}
        assert counts == dict.fromkeys(counts, 0), (host, counts)
        assert (row.received, row.frames) == (st.messages_sent, st.frames_sent), host
        seqs = receiver.seqs(cid)
        assert sorted(seqs) == list(range(st.messages_sent)), (host, seqs[:20])
        # only delivery copies of intra-host frames (frames cut to fit a message, such as GSO
        # segments of the TCP streams, were sent: they count as truncated, not dropped)
        assert set(st.not_mirrored) <= {"duplicates"}, (host, st.not_mirrored)
        assert st.lost == {}, (host, st.lost)  # the kernel's capture ring included


# ---------------------------------------------------------------- the tests


def test_collectors_export_real_traffic_once_per_the_mirroring_rules(
    site: Site, tmp_path: Path
) -> None:
    """Both hosts' collectors, UDP: markers intra-host and across both ways, ICMP echo, ARP
    after a flush, two TCP connections; every frame checked against the rules and the
    inventory, every marker and TCP byte counted at each point, no message lost."""
    lab = site.lab
    vm = lab.vm
    pairs = [  # two intra-host pairs, two across the underlay
        (vm("h1v1"), vm("h1v2")),
        (vm("h2v2"), vm("h2v3")),
        (vm("h1v3"), vm("h2v1")),
        (vm("h2v3"), vm("h1v1")),
    ]
    receiver = LabReceiver(site.mgmt).start()
    try:
        with collectors(site, tmp_path, ["h1", "h2"]) as procs:
            vifs = {host: proc.read_vifs() for host, proc in procs.items()}
            inv = Inventory(lab, vifs)
            for v in lab.vms.values():  # so that ARP happens in front of the collectors
                lab.run(v.ns, "ip", "neigh", "flush", "all")
            t0 = time.time_ns()
            pings = [(a, b, 3) for a, b in pairs]
            for a, b, n in pings:
                assert lab.ping(a.name, b.ip, n) == n
            flows: dict[int, tuple[Vm, Vm, dict[int, int]]] = {}
            with udp_sinks(lab):
                for a, b in pairs:
                    for src, dst in ((a, b), (b, a)):
                        flow = len(flows) + 1
                        flows[flow] = (src, dst, send_markers(lab, src, dst, flow, 40))
            exchanges = [
                TcpExchange(vm("h1v2"), vm("h2v2"), 100_000, 30_000),  # across
                TcpExchange(vm("h2v1"), vm("h2v3"), 50_000, 20_000),  # within h2
            ]
            try:
                for port, x in enumerate(exchanges, 7001):
                    x.run(lab, port)
                want = sum(len(inv.points(s, d)) * len(sent) for s, d, sent in flows.values())
                wait_for(
                    lambda: sum(map(len, markers(receiver.observations()).values())) >= want, 10
                )
                time.sleep(0.3)
                t1 = time.time_ns()
            finally:
                for x in exchanges:
                    x.finish()
            time.sleep(0.3)
            stats = stop_all(procs)
            assert {host: proc.read_vifs() for host, proc in procs.items()} == vifs
        sent = sum(st.messages_sent for st in stats.values())
        wait_for(lambda: receiver.count() >= sent, 10)
    finally:
        receiver.stop()

    obs = receiver.observations()
    assert {o.cid for o in obs} == set(CID.values())
    assert len({(o.cid, o.boot) for o in obs}) == 2
    check_rules(obs, inv)
    per_pair = check_markers(obs, flows, inv)
    check_echo(obs, pings, inv)
    check_arp(obs, pings, inv)
    checked = check_copies(obs, inv, (t0, t1))
    tcp_bytes = check_tcp(obs, exchanges, inv)
    check_sequences(receiver, stats)
    assert receiver.accounting.invalid().empty
    assert receiver.kernel_drops == 0
    assert sum(st.exported for st in stats.values()) == len(obs)
    print(f"markers per (src, dst, point): {dict(per_pair)}")
    print(f"TCP payload bytes: {tcp_bytes}; retransmissions: {[x.retrans for x in exchanges]}")
    print(f"{len(obs)} frames in {receiver.count()} messages; {checked} checked copy by copy")


def test_loss_while_the_receiver_is_down_is_counted_exactly(site: Site, tmp_path: Path) -> None:
    """Stop the receiver (UDP), send, restart, send: the accounting's loss is exactly the
    messages the collector sent meanwhile, which a packet socket on the link also saw."""
    lab, cid = site.lab, CID["h1"]
    a, b = lab.vm("h1v1"), lab.vm("h1v2")
    receiver = LabReceiver(site.mgmt).start()
    tap = WireTap(site.mgmt, "h1")

    def copies(flow: int) -> int:
        return sum(len(c) for (f, _), c in markers(receiver.observations()).items() if f == flow)

    try:
        with collectors(site, tmp_path, ["h1"]) as procs:
            inv = Inventory(lab, {"h1": procs["h1"].read_vifs()})
            assert lab.ping(a.name, b.ip, 1) == 1
            with udp_sinks(lab):
                flows = {1: (a, b, send_markers(lab, a, b, 1, 20))}
                assert wait_for(lambda: copies(1) == 20, 10)
                time.sleep(0.2)
                down_from = time.time_ns()
                receiver.pause()  # the analyzer is down
                down_since = time.time_ns()
                before = receiver.seqs(cid)
                down = send_markers(lab, a, b, 2, 25, burst=1, gap_s=0.03)
                time.sleep(0.3)
                down_until = time.time_ns()
                receiver.resume()
                down_to = time.time_ns()
                flows[3] = (a, b, send_markers(lab, a, b, 3, 20))
                assert wait_for(lambda: copies(3) == 20, 10)
            time.sleep(0.3)
            stats = stop_all(procs)["h1"]
        refused = stats.lost_messages.get("send_error", 0)  # ICMP port unreachable while down
        produced = stats.messages_sent + refused  # every seq the collector used
        wait_for(lambda: max(receiver.seqs(cid), default=-1) == produced - 1, 10)
    finally:
        receiver.stop()
        tap.stop()

    seqs = receiver.seqs(cid)
    after = seqs[len(before) :]
    assert before == list(range(len(before))), "lost before the receiver stopped"
    assert after == list(range(after[0], produced)), "lost after the receiver restarted"
    missing = set(range(before[-1] + 1, after[0]))
    assert missing, "no message was sent while the receiver was down"
    row = stream_of(receiver, cid)
    assert row.lost == len(missing) == produced - len(seqs)
    assert (row.duplicates, row.reordered, row.stale) == (0, 0, 0)
    # the wire: every message the collector sent reached the link, and those the receiver
    # missed are exactly those sent while it was down, plus the ones the kernel refused
    wire = {seq: t for t, c, seq in tap.seen if c == cid}
    assert len(wire) == stats.messages_sent == len(tap.seen)
    assert set(seqs) <= set(wire)
    assert all(down_from <= wire[s] <= down_to for s in set(wire) - set(seqs))
    assert {s for s, t in wire.items() if down_since < t < down_until} <= missing
    assert set(wire) - set(seqs) <= missing
    assert len(missing - set(wire)) == refused
    obs = receiver.observations()
    check_rules(obs, inv)
    assert not any(f == 2 for f, _ in markers(obs)), "a marker sent while down arrived"
    check_markers([o for o in obs if (m := o.marker()) and m[0] != 2], flows, inv)
    print(
        f"{len(down)} markers while down: {len(missing)} messages lost ({refused} refused by the "
        f"kernel), seqs received {seqs}"
    )


def test_tcp_transport_with_auth(site: Site, tmp_path: Path) -> None:
    """TCP with AUTH: h2's messages verify and arrive complete; h1, with a key that is not
    its own, is refused as ``bad_auth``."""
    lab, h1, h2 = site.lab, CID["h1"], CID["h2"]
    keys = {cid: secrets.token_bytes(32) for cid in CID.values()}
    good, wrong = tmp_path / "good.key", tmp_path / "wrong.key"
    good.write_text(keys[h2].hex() + "\n")
    wrong.write_text(secrets.token_bytes(32).hex() + "\n")
    tcp = ("--transport", "tcp")
    extra = {"h1": (*tcp, "--key-file", str(wrong)), "h2": (*tcp, "--key-file", str(good))}
    receiver = LabReceiver(site.mgmt, transport="tcp", keys=keys).start()
    a, b, c, d = lab.vm("h2v1"), lab.vm("h2v2"), lab.vm("h1v1"), lab.vm("h2v3")

    def rejected(cid: int) -> dict[str, int]:
        col = receiver.accounting.collector(cid)
        return {} if col is None else dict(col.invalid)

    try:
        with collectors(site, tmp_path, ["h1", "h2"], extra) as procs:
            inv = Inventory(lab, {host: proc.read_vifs() for host, proc in procs.items()})
            assert lab.ping(a.name, b.ip, 1) == 1
            assert lab.ping(c.name, d.ip, 1) == 1
            with udp_sinks(lab):
                flows = {
                    1: (a, b, send_markers(lab, a, b, 1, 30)),  # within h2
                    2: (c, d, send_markers(lab, c, d, 2, 30)),  # h1 -> h2
                }
            wait_for(lambda: sum(map(len, markers(receiver.observations()).values())) >= 60, 10)
            wait_for(lambda: bool(rejected(h1)), 5)
            time.sleep(0.3)
            stats = stop_all(procs)
        wait_for(lambda: receiver.count() >= stats["h2"].messages_sent, 10)
    finally:
        receiver.stop()

    assert receiver.messages
    assert all(receiver.authenticated)
    check_sequences(receiver, {"h2": stats["h2"]})
    assert receiver.seqs(h1) == []  # every message under the wrong key was refused
    assert set(rejected(h1)) == {"bad_auth"}
    assert rejected(h2) == {}
    obs = receiver.observations()
    check_rules(obs, inv)
    # only h2's copies: the intra-host one, and the delivery of h1v1's datagrams to h2v3
    h2_only = {f: (s, dst, sent) for f, (s, dst, sent) in flows.items()}
    got = markers(obs)
    for flow, (src, dst, sent) in h2_only.items():
        want = [p for p in inv.points(src, dst) if p.cid == h2]
        for seq in sent:
            assert sorted(o.point for o in got.pop((flow, seq), [])) == want, (flow, seq)
    assert not got
    print(f"refused from h1: {rejected(h1)}; h2 sent {stats['h2'].messages_sent} messages")
