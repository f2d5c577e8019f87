"""Endpoint identity: tags teach MAC → (host, vif); the newest observation wins."""

from __future__ import annotations

from vspan.analysis.columns import Decoded, TagKind
from vspan.analysis.endpoints import KIND_MAC, KIND_VIF, EndpointResolver
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
