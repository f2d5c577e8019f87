"""Endpoint identity: tags teach MAC → (host, vif); the newest observation wins."""

from __future__ import annotations

import gc
import queue
import socket
import time
import tracemalloc

import numpy as np

from vspan.analysis.decode.columns import Decoded, TagKind
from vspan.analysis.flows.endpoints import (
    KIND_MAC,
    KIND_NIC,
    KIND_VIF,
    EndpointResolver,
    LearningConfig,
)
from vspan.analysis.ingest.receivers import Chunk, ReceiverConfig, TcpReceiver
from vspan.analysis.inventory.state import InventoryState, PortInfo
from vspan.analysis.service.engine import Engine, EngineConfig
from vspan.wire.tunnel import encode_message
from vspan.wire.vntag import VnTag, encode_vntag
from vspan_testing.decoded import decoded

A, B, C = 0x525400000001, 0x525400000002, 0x525400000003
BROADCAST = 0xFFFFFFFFFFFF


def vif_ep(host: int, vif: int) -> int:
    return int(KIND_VIF) | host << 20 | vif


def sender_copies(hosts: list[int], svifs: list[int], macs: list[int], dst: int = C) -> Decoded:
    """Frames whose tags name a local source vif (d = 0), one per (host, svif, MAC)."""
    n = len(hosts)
    return decoded(
        n, tag_kind=TagKind.VNTAG, host=hosts, svif=svifs, dvif=0, tag_d=0,
        src_mac=macs, dst_mac=dst, src_ip="10.0.0.1", dst_ip="10.0.0.2", ip_proto=17,
    )  # fmt: skip


def test_a_mac_seen_behind_a_tagged_vif_resolves_to_it_elsewhere() -> None:
    r = EndpointResolver()
    r.resolve(sender_copies([1], [7], [A]))
    # The receiver copy at host 2 names A only by MAC: it resolves to (1, 7).
    rx = decoded(1, tag_kind=TagKind.VNTAG, host=2, svif=0, dvif=9, tag_d=1, src_mac=A, dst_mac=C)
    eps = r.resolve(rx)
    assert eps.src.tolist() == [vif_ep(1, 7)]
    assert eps.dst.tolist() == [vif_ep(2, 9)]
    assert r.learned == 2  # A behind (1, 7), C behind (2, 9)


def test_a_mac_the_inventory_lacks_resolves_to_the_vnic_it_was_learned_behind() -> None:
    """A VM behind a Linux bridge port is registered without a MAC (not learned yet), or
    sends from a second MAC (a macvlan): the copy of its packet at the receiver's host names
    it by that MAC only. It is the vNIC of the vif the MAC was learned behind, as the
    sender's copy (by its tag) is — one endpoint, so both copies make one flow (on main the
    receiver's copy was a VIF endpoint, another flow)."""
    state = InventoryState()
    state.register(1, "hv01", [PortInfo("vm-a", 7, 0, None, None, "tap7")], now=1.0)
    state.register(2, "hv02", [PortInfo("vm-b", 9, B, None, None, "tap9")], now=1.0)
    r = EndpointResolver(state)
    a_nic = int(state.resolve_vifs([1], [7])[0])
    sent = r.resolve(sender_copies([1, 1], [7, 7], [A, C], dst=B))
    assert sent.src.tolist() == [int(KIND_NIC) | a_nic] * 2
    rx = decoded(2, tag_kind=TagKind.VNTAG, host=2, svif=0, dvif=9, tag_d=1, src_mac=[A, C],
                 dst_mac=B)  # fmt: skip
    assert r.resolve(rx).src.tolist() == sent.src.tolist()
    # A MAC the inventory gives a VM wins over where it was learned.
    state.register(2, "hv02", [PortInfo("vm-b", 9, B, None, None, "tap9"),
                               PortInfo("vm-c", 10, C, None, None, "tap10")], now=2.0)  # fmt: skip
    c_nic = int(state.resolve_macs([C])[0])
    assert r.resolve(rx).src.tolist() == [int(KIND_NIC) | a_nic, int(KIND_NIC) | c_nic]


def test_the_newest_frame_of_a_mac_wins_within_a_batch_and_across_batches() -> None:
    r = EndpointResolver()
    # A moves from (1, 7) to (2, 5) inside one batch; B stays at (1, 8).
    r.resolve(sender_copies([1, 1, 2, 1], [7, 8, 5, 8], [A, B, A, B]))
    macs, host, vif = r.learned_table()
    learned = {int(m): (int(h), int(v)) for m, h, v in zip(macs, host, vif, strict=True)}
    assert learned[A] == (2, 5)
    assert learned[B] == (1, 8)
    # A later batch moves A back to (1, 7).
    r.resolve(sender_copies([1], [7], [A]))
    macs, host, vif = r.learned_table()
    learned = {int(m): (int(h), int(v)) for m, h, v in zip(macs, host, vif, strict=True)}
    assert learned[A] == (1, 7)
    assert learned[B] == (1, 8)


def test_group_macs_and_untagged_frames_teach_nothing() -> None:
    r = EndpointResolver()
    r.resolve(sender_copies([1], [7], [BROADCAST]))
    untagged = decoded(1, src_mac=A, dst_mac=B, src_ip="10.0.0.1", dst_ip="10.0.0.2")
    eps = r.resolve(untagged)
    assert r.learned == 0
    assert eps.src.tolist() == [int(KIND_MAC) | A]
    assert eps.dst.tolist() == [int(KIND_MAC) | B]


# --- the learned table is bounded -------------------------------------------------------------


def learned(r: EndpointResolver) -> dict[int, tuple[int, int]]:
    macs, host, vif = r.learned_table()
    return {int(m): (int(h), int(v)) for m, h, v in zip(macs, host, vif, strict=True)}


def test_macs_behind_one_vif_are_capped_least_recently_seen_first() -> None:
    r = EndpointResolver(learning=LearningConfig(max_macs_per_vif=3))
    for mac in (A, B, C):
        r.resolve(sender_copies([1], [7], [mac]))
    r.resolve(sender_copies([2], [9], [0x525400000009]))  # another vif: its own budget
    r.resolve(sender_copies([1], [7], [A]))  # A seen again: now the most recent
    r.resolve(sender_copies([1], [7], [0x52540000000D]))  # a 4th MAC behind (1, 7)
    table = learned(r)
    assert sorted(m for m, hv in table.items() if hv == (1, 7)) == [A, C, 0x52540000000D]
    assert table[0x525400000009] == (2, 9)
    assert r.evicted == 1  # B, the least recently seen behind (1, 7)


def test_learned_macs_are_capped_in_all() -> None:
    r = EndpointResolver(learning=LearningConfig(max_macs=2))
    for i, mac in enumerate([A, B, C]):
        r.resolve(sender_copies([1], [i + 1], [mac]))
    assert sorted(learned(r)) == [B, C]
    assert r.evicted == 1


def test_a_vm_spoofing_source_macs_through_a_real_collector_path_stays_bounded() -> None:
    """A VM behind vif 5 of collector 1 sends from 100,000 distinct source MACs, over a real
    TCP receiver into the engine: the learned table keeps 1,024 MACs for that vif (the
    default bound) and counts the rest as forgotten, and the engine's memory stays under
    1 MB (unbounded, the table alone held 100,000 MACs: 1.6 MB, growing with every spoofed
    MAC; the flows are bounded by max_flows and handed away)."""
    n, per_message = 100_000, 250
    sink: queue.Queue[Chunk] = queue.Queue()
    engine = Engine(EngineConfig(max_flows=500), source=sink, on_flows=lambda flows: None)
    receiver = TcpReceiver(("127.0.0.1", 0), sink=sink, config=ReceiverConfig(poll_s=0.05))
    template = np.frombuffer(spoofed_frame(0), np.uint8)
    engine.start()
    receiver.start()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with socket.create_connection(receiver.address) as conn:
            for seq, lo in enumerate(range(0, n, per_message)):
                frames = np.tile(template, (per_message, 1))
                macs = np.arange(lo, lo + per_message, dtype=">u8").view(np.uint8)
                frames[:, 6:12] = macs.reshape(per_message, 8)[:, 2:]
                frames[:, 6] = 0x02  # unicast, locally administered
                conn.sendall(encode_message(collector_id=1, boot_id=1, seq=seq,
                                            frames=[f.tobytes() for f in frames],
                                            ts_ns=[seq] * per_message))  # fmt: skip
        deadline = time.monotonic() + 60
        while engine.frames < n:
            assert time.monotonic() < deadline, engine.counters()
            time.sleep(0.05)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        receiver.stop()
        engine.stop(flush=False)
    macs, hosts, vifs = engine.learned_macs()
    assert (macs.size, set(hosts.tolist()), set(vifs.tolist())) == (1024, {1}, {5})
    counters = engine.counters()
    assert counters["learned_macs"] == 1024
    assert counters["learned_macs_evicted"] == n - 1024
    assert grown < 1 << 20, f"the engine grew by {grown / 1e6:.1f} MB"


def spoofed_frame(mac: int) -> bytes:
    """A VN-tagged UDP frame from ``mac`` behind vif 5 (d=0) to 02:00:00:00:00:02."""
    ip = bytes.fromhex("4500001c00004000401100000a0000010a000002")
    return (b"\x02" + bytes(4) + b"\x02" + mac.to_bytes(6, "big") + b"\x89\x26"
            + encode_vntag(VnTag(d=0, svif=5, dvif=0, ethertype=0x0800)) + ip
            + bytes.fromhex("1f90003500080000"))  # fmt: skip
