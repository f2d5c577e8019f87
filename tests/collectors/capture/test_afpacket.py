"""AF_PACKET capture on VM ports, with real traffic in a network-namespace lab.

The lab tests (root) capture in host h1's namespace on the ports of its VMs while the
test sends UDP, TCP and ICMP between VMs of h1 and across the underlay to h2; the
expected frames are derived from what the test sent. The ring walker itself is tested on
synthetic rings in ``test_tpacket.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from vspan.collectors.capture.afpacket import (
    AfPacketConfig,
    AfPacketSource,
    NoSuchInterfaceError,
)
from vspan.collectors.model import PortBatch
from vspan.errors import ConfigError
from vspan.inventory import Port
from vspan_testing.netlab import Lab, Vm, in_netns, make_lab


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"snaplen": 8}, "snaplen: 8 is not valid, expected 16..262144"),
        ({"sample": 0}, "sample: 0 is not valid, expected at least 1"),
        ({"block_size": 5000}, "block_size: 5000 is not valid, expected a power of two of pages"),
    ],
)
def test_config_is_validated(change: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        AfPacketConfig(**change).validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------- the lab

MARK = b"VSPN"
UDP_PORT = 9999


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Lab:
    return make_lab(request, "vsaf", hosts=2, vms_per_host=3)


def port_of(vm: Vm) -> Port:
    return Port(
        vm.port, vm.ifindex, vm.vif, int(vm.mac.replace(":", ""), 16), vm.name, bridge="br0"
    )


@dataclass(frozen=True)
class Seen:
    """One captured frame, decoded by the test (per-frame Python is fine here)."""

    vif: int
    from_vm: bool
    caplen: int
    origlen: int
    data: bytes

    def l3(self) -> tuple[int, int]:
        """(EtherType, offset of the L3 header), past one 802.1Q tag."""
        kind = int.from_bytes(self.data[12:14], "big")
        return (int.from_bytes(self.data[16:18], "big"), 18) if kind == 0x8100 else (kind, 14)

    def udp(self) -> tuple[int, int, bytes] | None:
        """(flow, seq, payload) of a marker datagram to ``UDP_PORT``."""
        kind, ip = self.l3()
        if kind != 0x0800 or self.data[ip + 9] != 17:
            return None
        l4 = ip + (self.data[ip] & 0x0F) * 4
        dport = int.from_bytes(self.data[l4 + 2 : l4 + 4], "big")
        payload = self.data[l4 + 8 :]
        if dport != UDP_PORT or payload[:4] != MARK:
            return None
        return payload[4], int.from_bytes(payload[5:9], "big"), payload

    def ip_len(self) -> int:
        _, ip = self.l3()
        return int.from_bytes(self.data[ip + 2 : ip + 4], "big")


class Capture:
    """An ``AfPacketSource`` polled by a thread that lives in host h1's namespace."""

    def __init__(self, lab: Lab, vms: list[str], config: AfPacketConfig | None = None) -> None:
        self.lab = lab
        self.source = AfPacketSource([port_of(lab.vm(v)) for v in vms], config=config)
        self.batches: list[PortBatch] = []
        self.error: BaseException | None = None
        self.polling = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with in_netns(self.lab.hosts["h1"]):
                self.source.start()
                self._ready.set()
                while not self._stop.is_set():
                    if self.polling.is_set() and (batch := self.source.poll(0.02)) is not None:
                        self.batches.append(batch)
                    elif not self.polling.is_set():
                        time.sleep(0.005)
        except BaseException as exc:
            self.error = exc
        finally:
            self.source.stop()
            self._ready.set()

    def __enter__(self) -> Capture:
        self.polling.set()
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None and exc[0] is None:
            raise self.error

    def seen(self) -> list[Seen]:
        out = []
        for batch in list(self.batches):
            f = batch.frames
            for i in range(len(f)):
                out.append(
                    Seen(
                        int(batch.vif[i]),
                        bool(batch.from_vm[i]),
                        int(f.caplen[i]),
                        int(f.origlen[i]),
                        f.frame(i),
                    )
                )
        return out

    def settle(self, done: Callable[[list[Seen]], bool], timeout: float = 10) -> list[Seen]:
        """The frames once ``done`` says so (or at the timeout), plus 0.2 s for stragglers."""
        deadline = time.monotonic() + timeout
        while not done(self.seen()) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        return self.seen()


def udp_flow(
    lab: Lab,
    src: str,
    dst: str,
    flow: int,
    count: int,
    *,
    dport: int = UDP_PORT,
    size: Callable[[int], int] = lambda i: 20 + (i * 37) % 1200,
) -> dict[int, int]:
    """Send ``count`` marker datagrams; {seq: payload length}."""
    a, b = lab.vm(src), lab.vm(dst)
    sent = {}
    with (
        lab.socket(a.ns, socket.AF_INET, socket.SOCK_DGRAM) as tx,
        lab.socket(b.ns, socket.AF_INET, socket.SOCK_DGRAM) as rx,
    ):
        rx.bind((b.ip, dport))
        for seq in range(count):
            head = MARK + bytes([flow]) + seq.to_bytes(4, "big")
            payload = head + bytes(max(0, size(seq) - len(head)))
            tx.sendto(payload, (b.ip, dport))
            sent[seq] = len(payload)
    return sent


def warm_up(lab: Lab, *pairs: tuple[str, str]) -> None:
    """Resolve ARP both ways first, so no datagram waits in (or falls out of) an ARP queue."""
    for src, dst in pairs:
        assert lab.ping(src, lab.vm(dst).ip, 1) == 1
        assert lab.ping(dst, lab.vm(src).ip, 1) == 1


def marker_counts(seen: list[Seen]) -> Counter[tuple[int, bool, int]]:
    return Counter((s.vif, s.from_vm, u[0]) for s in seen if (u := s.udp()) is not None)


H1 = ["h1v1", "h1v2", "h1v3"]


@pytest.mark.root
def test_udp_frames_per_port_and_direction_with_lengths(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h1v2"), ("h1v3", "h2v1"), ("h2v2", "h1v3"))
    v = {name: lab.vm(name).vif for name in lab.vms}
    with Capture(lab, H1) as cap:
        sent = {
            1: udp_flow(lab, "h1v1", "h1v2", 1, 200),  # same host
            2: udp_flow(lab, "h1v3", "h2v1", 2, 100),  # to the other host
            3: udp_flow(lab, "h2v2", "h1v3", 3, 100),  # from the other host
        }
        expected = Counter(
            {
                (v["h1v1"], True, 1): 200,
                (v["h1v2"], False, 1): 200,
                (v["h1v3"], True, 2): 100,
                (v["h1v3"], False, 3): 100,
            }
        )
        seen = cap.settle(lambda s: marker_counts(s) == expected)
    assert marker_counts(seen) == expected
    for s in seen:
        if (u := s.udp()) is not None:
            flow, seq, payload = u
            assert s.origlen == s.caplen == 14 + 20 + 8 + sent[flow][seq]
            assert len(payload) == sent[flow][seq]
    for s in seen:  # every IPv4 frame: the wire length is the Ethernet header + IP length
        if s.l3()[0] == 0x0800:
            assert s.origlen == s.l3()[1] + s.ip_len()
    counters = cap.source.counters
    assert counters.frames == len(seen)
    assert counters.bytes == sum(s.origlen for s in seen)
    assert counters.truncated == 0
    assert counters.per_port["vm-h1v1"] == sum(1 for s in seen if s.vif == v["h1v1"])


@pytest.mark.root
def test_icmp_echo_and_tcp_stream(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h2v2"), ("h1v2", "h1v1"))
    payload = bytes(range(256)) * 400  # 102400 bytes
    with Capture(lab, H1) as cap:
        assert lab.ping("h1v1", lab.vm("h2v2").ip, 10) == 10
        a, b = lab.vm("h1v2"), lab.vm("h1v1")
        with (
            lab.socket(b.ns, socket.AF_INET, socket.SOCK_STREAM) as server,
            lab.socket(a.ns, socket.AF_INET, socket.SOCK_STREAM) as client,
        ):
            server.bind((b.ip, 7777))
            server.listen(1)
            client.connect((b.ip, 7777))
            conn, _ = server.accept()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := conn.recv(65536):
                got += chunk
            conn.close()
        assert bytes(got) == payload

        def tcp_bytes(s: list[Seen], vif: int, from_vm: bool) -> int:
            total = 0
            for f in s:
                kind, ip = f.l3()
                if f.vif != vif or f.from_vm != from_vm or kind != 0x0800 or f.data[ip + 9] != 6:
                    continue
                l4 = ip + (f.data[ip] & 0x0F) * 4
                if int.from_bytes(f.data[l4 + 2 : l4 + 4], "big") == 7777:
                    total += f.ip_len() - (l4 - ip) - (f.data[l4 + 12] >> 4) * 4
            return total

        def echo(s: list[Seen], kind: int, from_vm: bool) -> int:
            return sum(
                1
                for f in s
                if f.vif == lab.vm("h1v1").vif
                and f.from_vm == from_vm
                and f.l3()[0] == 0x0800
                and f.data[23] == 1
                and f.data[34] == kind
                and b"vspan-lab-ping" in f.data
            )

        seen = cap.settle(
            lambda s: tcp_bytes(s, b.vif, False) >= len(payload) and echo(s, 0, False) == 10
        )
    assert echo(seen, 8, True) == 10  # requests the VM sent
    assert echo(seen, 0, False) == 10  # replies delivered to it from the other host
    assert tcp_bytes(seen, a.vif, True) == len(payload)  # as h1v2 sent it (GSO frames or not)
    assert tcp_bytes(seen, b.vif, False) == len(payload)  # as the bridge delivered it to h1v1


@pytest.mark.root
def test_snaplen_cuts_frames_and_keeps_the_wire_length(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h1v2"))
    with Capture(lab, H1, AfPacketConfig(snaplen=64)) as cap:
        udp_flow(lab, "h1v1", "h1v2", 4, 50, size=lambda i: 500)
        seen = cap.settle(lambda s: sum(marker_counts(s).values()) == 100)
    marked = [s for s in seen if s.udp() is not None]
    assert len(marked) == 100
    assert {(s.caplen, s.origlen) for s in marked} == {(64, 14 + 20 + 8 + 500)}
    assert all(s.caplen <= 64 for s in seen)
    assert cap.source.counters.truncated == sum(1 for s in seen if s.caplen < s.origlen) >= 100


@pytest.mark.root
def test_sampling_keeps_exactly_every_nth_frame_per_port(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h1v2"))
    config = AfPacketConfig(sample=7, bpf=f"udp port {UDP_PORT}")
    with Capture(lab, H1, config) as cap:
        udp_flow(lab, "h1v1", "h1v2", 5, 200)
        kept = len(range(0, 200, 7))
        seen = cap.settle(lambda s: sum(marker_counts(s).values()) == 2 * kept)
    for vm, from_vm in (("h1v1", True), ("h1v2", False)):
        seqs = [u[1] for s in seen if s.vif == lab.vm(vm).vif and (u := s.udp()) is not None]
        assert all(s.from_vm == from_vm for s in seen if s.vif == lab.vm(vm).vif)
        assert seqs == list(range(0, 200, 7))
    assert cap.source.counters.sampled_out == 2 * (200 - kept)


@pytest.mark.root
def test_bpf_filter_keeps_only_matching_frames(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h1v2"), ("h1v2", "h2v3"))
    with Capture(lab, H1, AfPacketConfig(bpf=f"udp port {UDP_PORT}")) as cap:
        udp_flow(lab, "h1v1", "h1v2", 6, 100)
        udp_flow(lab, "h1v1", "h1v2", 7, 100, dport=UDP_PORT - 1)
        assert lab.ping("h1v2", lab.vm("h2v3").ip, 5) == 5
        seen = cap.settle(lambda s: sum(marker_counts(s).values()) == 200)
    assert marker_counts(seen) == {
        (lab.vm("h1v1").vif, True, 6): 100,
        (lab.vm("h1v2").vif, False, 6): 100,
    }
    assert len(seen) == 200  # nothing else: no port 9998, no ICMP, no ARP, no IPv6


@pytest.mark.root
def test_ports_added_and_removed_while_running(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h1v2"))
    v1, v2 = lab.vm("h1v1").vif, lab.vm("h1v2").vif
    with Capture(lab, ["h1v1"], AfPacketConfig(bpf=f"udp port {UDP_PORT}")) as cap:
        udp_flow(lab, "h1v1", "h1v2", 8, 20)
        cap.settle(lambda s: sum(marker_counts(s).values()) == 20)
        with in_netns(lab.hosts["h1"]):
            cap.source.add_port(port_of(lab.vm("h1v2")))
        udp_flow(lab, "h1v1", "h1v2", 9, 20)
        cap.settle(lambda s: sum(marker_counts(s).values()) == 60)
        assert cap.source.remove_port("vm-h1v1")
        assert not cap.source.remove_port("vm-h1v1")
        udp_flow(lab, "h1v1", "h1v2", 10, 20)
        seen = cap.settle(lambda s: sum(marker_counts(s).values()) == 80)
        assert [p.name for p in cap.source.ports()] == ["vm-h1v2"]
    assert marker_counts(seen) == {
        (v1, True, 8): 20,
        (v1, True, 9): 20,
        (v2, False, 9): 20,
        (v2, False, 10): 20,
    }


@pytest.mark.root
def test_port_of_a_vm_that_goes_away_is_dropped(lab: Lab) -> None:
    vm = lab.add_vm("h1")
    try:
        warm_up(lab, (vm.name, "h1v1"))
        with Capture(lab, ["h1v1", vm.name], AfPacketConfig(bpf=f"udp port {UDP_PORT}")) as cap:
            udp_flow(lab, vm.name, "h1v1", 11, 10)
            cap.settle(lambda s: sum(marker_counts(s).values()) == 20)
            lab.remove_vm(vm.name)
            deadline = time.monotonic() + 5
            while vm.port in [p.name for p in cap.source.ports()] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [p.name for p in cap.source.ports()] == ["vm-h1v1"]
            udp_flow(lab, "h1v2", "h1v1", 12, 10)  # the source goes on with the others
            seen = cap.settle(lambda s: sum(marker_counts(s).values()) == 30)
        assert marker_counts(seen)[(lab.vm("h1v1").vif, False, 12)] == 10
        assert cap.source.counters.per_port[vm.port] == 10
    finally:
        if vm.name in lab.vms:
            lab.remove_vm(vm.name)


@pytest.mark.root
def test_kernel_drops_are_counted_when_the_ring_overflows(lab: Lab) -> None:
    warm_up(lab, ("h1v1", "h1v2"))
    tiny = AfPacketConfig(
        bpf=f"udp port {UDP_PORT}",
        block_size=4096,
        block_count=2,
        frame_size=256,
        block_timeout_ms=1000,
    )
    with Capture(lab, ["h1v1", "h1v2"], tiny) as cap:
        cap.polling.clear()  # nobody reads: the two blocks fill, then the kernel drops
        time.sleep(0.1)
        udp_flow(lab, "h1v1", "h1v2", 13, 200, size=lambda i: 100)
        cap.polling.set()
        seen = cap.settle(lambda s: False, timeout=1.5)
        drops = cap.source.read_kernel_stats()
    assert drops > 0
    assert len(seen) + drops == 400  # each frame is either in the batches or a counted drop
    assert cap.source.counters.kernel_drops == drops


def tagged_udp(src: Vm, dst: Vm, vid: int, seq: int) -> bytes:
    """An 802.1Q-tagged IPv4/UDP marker frame from ``src`` to ``dst`` (100-byte payload)."""
    payload = MARK + b"\x0e" + seq.to_bytes(4, "big") + bytes(91)
    udp = struct.pack("!HHHH", 40000, UDP_PORT, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        seq,
        0,
        64,
        17,
        0,
        socket.inet_aton(src.ip),
        socket.inet_aton(dst.ip),
    )
    words = sum(struct.unpack("!10H", ip))
    words = (words >> 16) + (words & 0xFFFF)
    ip = ip[:10] + struct.pack("!H", ~(words + (words >> 16)) & 0xFFFF) + ip[12:]
    return dst.mac_bytes + src.mac_bytes + struct.pack("!HH", 0x8100, vid) + b"\x08\x00" + ip + udp


@pytest.mark.root
def test_vlan_tag_the_kernel_takes_off_is_put_back(lab: Lab) -> None:
    # The kernel moves a received 802.1Q tag into the packet's metadata before the packet
    # sockets see it (and the filter runs on the untagged frame): the source puts it back.
    a, b = lab.vm("h1v1"), lab.vm("h1v2")
    with Capture(lab, ["h1v1", "h1v2"], AfPacketConfig(bpf=f"udp port {UDP_PORT}")) as cap:
        with lab.socket(a.ns, socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("eth0", 0))
            for seq in range(20):
                raw.send(tagged_udp(a, b, 100, seq))
        seen = cap.settle(lambda s: sum(marker_counts(s).values()) == 40)
    assert marker_counts(seen) == {(a.vif, True, 14): 20, (b.vif, False, 14): 20}
    assert {s.data[12:16] for s in seen} == {b"\x81\x00\x00\x64"}
    assert {(s.caplen, s.origlen) for s in seen} == {(18 + 20 + 8 + 100,) * 2}
    assert {s.data for s in seen if s.vif == a.vif} == {tagged_udp(a, b, 100, q) for q in range(20)}


@pytest.mark.root
def test_missing_interface_is_named(lab: Lab) -> None:
    source = AfPacketSource([port_of(lab.vm("h1v1"))])
    with in_netns(lab.hosts["h1"]):
        source.start()
        try:
            with pytest.raises(NoSuchInterfaceError, match=r"^no such interface: vm-nope$"):
                source.add_port(Port("vm-nope", 0, 99, 0, "nope"))
            assert [p.name for p in source.ports()] == ["vm-h1v1"]
        finally:
            source.stop()
    with pytest.raises(NoSuchInterfaceError, match=r"^no such interface: vm-h1v1$"):
        source.start()  # outside h1's namespace the port does not exist


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop CAP_NET_RAW from it")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_capture_without_cap_net_raw_says_so() -> None:
    code = (
        "from vspan.collectors.capture.afpacket import AfPacketSource, CapturePermissionError\n"
        "from vspan.inventory import Port\n"
        "try:\n    AfPacketSource([Port('lo', 1, 1, 0, 'x')]).start()\n"
        "except CapturePermissionError as exc:\n    print(exc)\n"
    )
    drop = ["setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw"]
    done = subprocess.run(
        [*drop, sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.stdout.strip() == "capturing on lo needs root or CAP_NET_RAW", done.stderr
