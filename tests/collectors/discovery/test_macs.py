"""Tests of vspan.collectors.discovery.macs: which source MAC of a port is its VM's, when it
changes, and that a port whose MAC flaps changes it at most once per hold time. Frames are
built by the test (its truth: which MAC each frame was sent from, and when)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from vspan.batch import FrameBatch
from vspan.collectors.discovery.macs import MacLearner, MacLearningConfig
from vspan.collectors.model import PortBatch

VM, MACVLAN, NESTED, NEW = 0x020000000001, 0x020000000002, 0x020000000003, 0x020000000004
OTHER_PORT = 0x0200000000AA


def frame(src: int, dst: int = 0xFFFFFFFFFFFF) -> bytes:
    return dst.to_bytes(6, "big") + src.to_bytes(6, "big") + b"\x08\x06" + bytes(28)


def batch(*sent: tuple[int, int], delivered: tuple[int, int] | None = None) -> PortBatch:
    """Frames (vif, source MAC) the VMs sent, and one frame delivered to a VM."""
    rows = [(vif, src, True) for vif, src in sent]
    if delivered is not None:
        rows.append((*delivered, False))
    return PortBatch(
        FrameBatch.from_frames([frame(src) for _, src, _ in rows]),
        np.array([vif for vif, _, _ in rows], np.uint16),
        np.array([from_vm for _, _, from_vm in rows]),
    )


LEARNING = {3: "tap3", 4: "tap4"}


def test_the_first_mac_a_vm_sends_from_is_its_mac_and_others_do_not_replace_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    learner = MacLearner(MacLearningConfig(hold_s=60.0))
    caplog.set_level(logging.INFO, "vspan.collectors.discovery")
    # a frame delivered to the VM, a group source MAC, a port that does not learn: not taken
    assert learner.observe(batch((7, VM), delivered=(3, NEW)), 0.0, LEARNING) == {}
    assert learner.observe(batch((3, 0x030000000001)), 0.0, LEARNING) == {}
    assert learner.observe(batch((3, VM), (3, MACVLAN), (4, OTHER_PORT)), 1.0, LEARNING) == {
        "tap3": VM,
        "tap4": OTHER_PORT,
    }
    for t in range(2, 200):  # the VM keeps using its MAC beside a macvlan and a nested VM
        sent = [(3, MACVLAN), (3, NESTED), (3, MACVLAN)] + ([(3, VM)] if t % 50 == 0 else [])
        assert learner.observe(batch(*sent), float(t), LEARNING) == {}
    assert (learner.mac("tap3"), learner.mac("tap4"), learner.mac("tap9")) == (VM, OTHER_PORT, 0)
    assert learner.counters == {"learned": 2, "changed": 0, "other_mac_frames": 1 + 198 * 3}
    several = [r.getMessage() for r in caplog.records if "several MACs" in r.getMessage()]
    assert several == [
        "port tap3: its VM sends from several MACs (02:00:00:00:00:02 besides "
        "02:00:00:00:00:01); 02:00:00:00:00:01 stays its MAC (the first it sent from) while "
        "it is in use"
    ]  # once per port, however many frames
    learned = [r.getMessage() for r in caplog.records if "learned" in r.getMessage()]
    assert learned == [
        "port tap3: VM MAC 02:00:00:00:00:01 learned from its traffic",
        "port tap4: VM MAC 02:00:00:00:00:aa learned from its traffic",
    ]


def test_a_mac_not_used_for_the_hold_time_gives_way_to_the_new_one() -> None:
    learner = MacLearner(MacLearningConfig(hold_s=60.0))
    learner.observe(batch((3, VM)), 0.0, LEARNING)
    assert learner.observe(batch((3, NEW)), 30.0, LEARNING) == {}  # too early
    assert learner.observe(batch((3, NEW)), 59.0, LEARNING) == {}
    assert learner.observe(batch((3, NEW)), 60.0, LEARNING) == {"tap3": NEW}
    assert learner.observe(batch((3, VM)), 61.0, LEARNING) == {}  # the old one is the other now
    assert learner.counters["changed"] == 1
    learner.keep({"tap4"})  # tap3 went away: forgotten, learned afresh if it comes back
    assert learner.mac("tap3") == 0
    assert learner.observe(batch((3, MACVLAN)), 62.0, LEARNING) == {"tap3": MACVLAN}


def test_a_port_whose_mac_flaps_changes_it_at_most_once_per_hold_time() -> None:
    """A VM that sends from a new random MAC every second (a spoofer), and one that flips
    between two MACs: the first changes at most once a minute, the second never."""
    rng = random.Random(17)
    learner = MacLearner(MacLearningConfig(hold_s=60.0))
    changes: dict[str, int] = {"tap3": 0, "tap4": 0}
    for t in range(3600):
        spoofed = (rng.getrandbits(46) << 2) | 0x020000000000  # unicast, locally administered
        sent = [(3, spoofed), (4, VM if t % 2 else MACVLAN)]
        for name in learner.observe(batch(*sent), float(t), LEARNING):
            changes[name] += 1
    assert changes["tap3"] <= 1 + 3600 // 60  # the first learned, then one per minute at most
    assert changes["tap3"] >= 30  # it does follow a VM whose MAC changed
    assert changes["tap4"] == 1  # learned once; both MACs stay in use
    assert learner.mac("tap4") == MACVLAN
