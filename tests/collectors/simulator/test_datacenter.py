"""The datacenter simulator: deterministic, valid frames on the right ports, daily rhythm,
traffic the example profiles deny, and live migrations that move a VM's port."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import Status
from vspan.analysis.policy.evaluate import compile_policy, evaluate
from vspan.analysis.policy.profiles import load_policy
from vspan.analysis.report import analyze_captures
from vspan.collectors.mirror import Mirror, read_macs
from vspan.collectors.model import CaptureSource, PortBatch, PortDirectory
from vspan.collectors.simulator.datacenter import (
    DEFAULT_START_NS,
    SimulatedDatacenter,
    SimulatorConfig,
)
from vspan.errors import ConfigError
from vspan.pcap.write import PcapngWriter

PROFILES = Path(__file__).resolve().parents[3] / "docs" / "examples" / "profiles.yaml"
HOUR_NS = 3600 * 10**9


def _dc(**overrides: object) -> SimulatedDatacenter:
    base: dict[str, object] = {"hosts": 3, "vms_per_host": 4, "seed": 7, "rate": 2000.0}
    base.update(overrides)
    return SimulatedDatacenter(SimulatorConfig(**base))  # type: ignore[arg-type]


def test_same_seed_same_datacenter_and_frames() -> None:
    a, b = _dc(migration_every_s=60.0), _dc(migration_every_s=60.0)
    for k in range(30):
        wa, wb = a.window(k), b.window(k)
        assert np.array_equal(wa.frames.data, wb.frames.data)
        assert np.array_equal(wa.frames.ts_ns, wb.frames.ts_ns)
        assert np.array_equal(wa.vif, wb.vif)
        assert np.array_equal(wa.from_vm, wb.from_vm)
    assert a.migrations == b.migrations
    assert a.truth_matrix().equals(b.truth_matrix())
    assert _dc(seed=8).window(3).frames.data.tobytes() != _dc().window(3).frames.data.tobytes()


def test_frames_decode_and_sit_on_their_vms_ports() -> None:
    dc = _dc(migration_every_s=None, time_scale=3600.0)
    win = dc.window(56)  # 14:00 of the first day (15 min a window)
    dec = decode_batch(win.frames)
    assert len(win.frames) > 300  # about rate × tick = 500 at the peak hour
    assert (dec.status == Status.OK).all()
    assert set(np.unique(dec.ip_version).tolist()) == {4, 6}
    assert set(np.unique(dec.ip_proto).tolist()) >= {6, 17}
    dst, src = read_macs(win.frames, np.arange(len(win.frames), dtype=np.int64))
    for h in range(dc.config.hosts):
        rows = np.arange(win.bounds[h], win.bounds[h + 1])
        assert (win.frames.host_column()[rows] == h + 1).all()
        mac_of = {p.vif: p.mac for p in dc.ports(h, 56)}
        port_mac = np.array([mac_of[int(v)] for v in win.vif[rows]], dtype=np.uint64)
        sent = win.from_vm[rows]
        assert (src[rows][sent] == port_mac[sent]).all()  # the VM sent it
        assert (dst[rows][~sent] == port_mac[~sent]).all()  # the vswitch delivered it
        assert (np.diff(win.frames.ts_ns[rows]) >= 0).all()


def test_sources_implement_capture_source_and_port_directory() -> None:
    dc = _dc(migration_every_s=None)
    clock = [0.0]
    naps: list[float] = []
    source = dc.source("hv02", now=lambda: clock[0], sleep=naps.append)
    as_source: CaptureSource = source  # the protocols are checked statically (mypy)
    as_directory: PortDirectory = source
    assert as_source.counters.frames == 0
    assert as_directory.ports() == source.ports()
    assert {p.vm_name for p in source.ports()} == {
        dc.vms.names[i] for i in np.flatnonzero(dc.placement(0)[0] == 1)
    }
    with pytest.raises(RuntimeError, match="before start"):
        source.poll(0.0)
    source.start()
    assert source.poll(0.1) is None  # window 0 ends at tick_s = 0.25 s
    assert naps == [0.1]
    clock[0] = 0.6
    got = [source.poll(0.0), source.poll(0.0)]
    assert source.poll(0.0) is None  # window 2 is not due yet
    batches = [b for b in got if b is not None]
    assert batches
    assert all(isinstance(b, PortBatch) for b in batches)
    assert source.counters.frames == sum(len(b.frames) for b in batches)
    assert sum(source.counters.per_port.values()) == source.counters.frames
    source.stop()


def test_daily_and_weekly_rhythm_in_the_generated_rates() -> None:
    day = _dc(time_scale=3600.0, migration_every_s=None, burst_chance=0.0)  # 15 min a window
    frames = np.array([len(day.window(k).frames) for k in range(96)])  # Monday, 00:00–24:00
    night, afternoon = frames[4:20].mean(), frames[48:64].mean()  # 01–05 h, 12–16 h
    assert afternoon > 2.5 * night
    expected = day.expected_frames(DEFAULT_START_NS + (np.arange(96) * 900 + 450) * 10**9)
    hourly = np.corrcoef(frames.reshape(24, 4).sum(axis=1), expected.reshape(24, 4).sum(axis=1))
    assert hourly[0, 1] > 0.85  # the frames follow the model's curve, hour by hour
    saturday = _dc(time_scale=3600.0, migration_every_s=None, burst_chance=0.0,
                   start_ns=DEFAULT_START_NS + 5 * 24 * HOUR_NS)  # fmt: skip
    weekend = np.array([len(saturday.window(k).frames) for k in range(48, 64)]).mean()
    assert afternoon > 1.6 * weekend


def _mirrored_capture(dc: SimulatedDatacenter, windows: range, path: Path) -> int:
    """What the collectors export for ``windows``, as one pcapng (an interface per host);
    returns the packets of those windows (each counted once)."""
    packets = 0
    with path.open("wb") as fh:
        out = PcapngWriter(fh)
        for name in dc.host_names:
            out.add_interface(name=name)
        for k in windows:
            win = dc.window(k)
            packets += win.truth.shape[0]
            for h in range(dc.config.hosts):
                rows = slice(int(win.bounds[h]), int(win.bounds[h + 1]))
                f = win.frames
                batch = PortBatch(
                    type(f)(data=f.data, offset=f.offset[rows], caplen=f.caplen[rows],
                            origlen=f.origlen[rows], ts_ns=f.ts_ns[rows],
                            linktype=f.linktype[rows]),
                    win.vif[rows], win.from_vm[rows],
                )  # fmt: skip
                mirror = Mirror()
                mirror.set_ports(dc.ports(h, k))
                tagged = mirror.process(batch).frames
                out.write_batch(tagged, iface=h)
    return packets


def test_some_traffic_violates_the_example_profiles(tmp_path: Path) -> None:
    dc = _dc(migration_every_s=None, time_scale=600.0)
    packets = _mirrored_capture(dc, range(40, 60), tmp_path / "dc.pcapng")
    inventory = dc.inventory()
    report = analyze_captures([tmp_path / "dc.pcapng"], inventory=inventory)
    flows = evaluate(report.flows, compile_policy(load_policy(str(PROFILES)), inventory)).flows
    verdict = flows["policy_verdict"].astype(str)
    denied, permitted = flows[verdict == "deny"], flows[verdict == "permit"]
    assert len(permitted) > 10 * len(denied) > 0
    # What is denied is the model's violations: ssh from outside to backup, 5432 from the
    # web or cache tier, app servers to the internet.
    src = denied["src_vm"].fillna("").str.split("-").str[0]
    dst = denied["dst_vm"].fillna("").str.split("-").str[0]
    expected = (
        ((denied["dst_port"] == 22) & (dst == "backup"))
        | ((denied["dst_port"] == 5432) & src.isin(["web", "cache"]))
        | ((src == "app") & (dst == ""))
    )
    assert expected.all(), denied[~expected][["src_vm", "dst_vm", "dst_port"]]
    # Every packet reached a flow, each counted once.
    assert int((flows["packets"] + flows["packets_rev"]).sum()) == packets


def test_a_live_migration_moves_a_vms_port_to_another_host() -> None:
    dc = _dc(migration_every_s=30.0)  # 15 s windows: a migration every other window or so
    clock = [0.0]
    sources = [dc.source(h, now=lambda: clock[0], sleep=lambda _: None) for h in range(3)]
    for s in sources:
        s.start()
    before = {s.name: {p.mac: p for p in s.ports()} for s in sources}
    assert all(s.poll(0.0) is None for s in sources)  # the first poll starts the clock at 0
    polled: dict[tuple[str, int], PortBatch | None] = {}
    ports: dict[tuple[str, int], set[int]] = {}
    for k in range(12):
        clock[0] = (k + 1) * dc.config.tick_s
        for s in sources:
            polled[s.name, k] = s.poll(0.0)
            ports[s.name, k] = {p.mac for p in s.ports()}
    assert dc.migrations
    move = dc.migrations[0]
    mac = int(dc.vms.mac[dc.vms.names.index(move.vm)])
    old = before[move.from_host][mac]
    assert old.vif == move.from_vif
    # From the migration on, the port is on the new host (same MAC, VM and UUID).
    assert mac in ports[move.from_host, move.window - 1]
    assert mac not in ports[move.from_host, move.window]
    assert mac in ports[move.to_host, move.window]
    new = next(p for p in sources[dc.host_names.index(move.to_host)].datacenter.ports(
        dc.host_names.index(move.to_host), move.window) if p.mac == mac)  # fmt: skip
    assert (new.vm_name, new.vm_uuid, new.vif) == (old.vm_name, old.vm_uuid, move.to_vif)
    # Its frames follow it: in that window they are on the new host's ports only.
    for name in dc.host_names:
        batch = polled[name, move.window]
        if batch is None:
            continue
        dst, src = read_macs(batch.frames, np.arange(len(batch.frames), dtype=np.int64))
        own = (np.where(batch.from_vm, src, dst) == mac).any()
        assert not own or name == move.to_host
    truth = dc.truth_matrix()
    seen = set(truth.loc[truth["src_vm"] == move.vm, "src_host"])
    assert {move.from_host, move.to_host} <= seen
    for s in sources:
        s.stop()


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match=r"simulator: hosts must be 1\.\.64, got 0"):
        SimulatedDatacenter(SimulatorConfig(hosts=0))
    with pytest.raises(ConfigError, match="migration_every_s must be positive"):
        SimulatedDatacenter(SimulatorConfig(migration_every_s=0.0))
