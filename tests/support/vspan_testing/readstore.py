"""A data directory as a running analyzer leaves it, for the read API and query commands.

The simulator's small datacenter is analyzed (``analyze_captures``), its flow records judged
by the example port-profiles (``docs/examples/profiles.yaml``) and stored with their
verdicts (``Store.append_flows``), with the policy hits of that evaluation
(``persist.hit_rows``, as the analyzer stores them), a few migrations and two
collector-counter samples per collector (collector 3 restarted between them). Optionally
the frames also go to a packet ring (for ``vspan export``). Everything the tests expect is
derived from the same records with pandas, or from the ground truth.
``serve`` runs an app under uvicorn on loopback for tests that speak real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from fastapi import FastAPI

from vspan.analysis.decode import decode_batch
from vspan.analysis.policy.evaluate import compile_policy, evaluate
from vspan.analysis.policy.profiles import load_policy
from vspan.analysis.records.build import RECORD_COLUMNS
from vspan.analysis.report import analyze_captures
from vspan.analysis.ring.ring import PacketRing
from vspan.analysis.store.persist import hit_rows
from vspan.analysis.store.store import Store
from vspan.api.server import HttpServer
from vspan.batch import FrameBatch
from vspan.synth import SynthCapture, generate_small, write_capture, write_inventory_yaml

PROFILES = Path(__file__).resolve().parents[3] / "docs" / "examples" / "profiles.yaml"
SECOND = 10**9


@dataclass(frozen=True, eq=False)
class ReadData:
    """What was stored, to derive expectations from."""

    cap: SynthCapture
    data_dir: Path
    inventory_yaml: Path
    records: pd.DataFrame
    """The flow records with ``policy_verdict`` and ``policy_rule``, as appended."""
    hits: pd.DataFrame
    """``PolicyResult.hits`` of the evaluation (one row per profile, rule and VM)."""
    migrations: pd.DataFrame
    counters: pd.DataFrame
    now: float
    """A ``now`` (seconds) one minute after the last flow ended."""


def _migrations(cap: SynthCapture, t0: int) -> pd.DataFrame:
    web, db = (next(v for v in cap.vms if v.name == n) for n in ("web-01", "db-01"))
    return pd.DataFrame(
        {
            "time": [t0 + k * SECOND for k in (1, 4, 6, 8)],
            "vm_uuid": [web.uuid, db.uuid, web.uuid, web.uuid],
            "vm_name": ["web-01", "db-01", "web-01", "web-01"],
            "from_host": [None, "hv01", "hv02", "hv03"],
            "to_host": ["hv02", "hv03", "hv03", "hv01"],
            "source": ["inventory", "dataplane", "inventory", "dataplane"],
        }
    )


def _counters(t0: int) -> pd.DataFrame:
    """Samples as the analyzer writes them (``persist.collector_rows``): a row per (collector,
    boot) at each sample time, the collector's rejected messages repeated on each row."""
    rows = [  # seconds, collector, boot, received, lost, kernel, missed while down, dup,
        # reordered, frames, bytes, invalid
        (0, 1, 7, 100, 0, 0, 0, 0, 0, 1000, 90_000, {}),
        (2, 1, 7, 300, 5, 0, 4, 1, 2, 3000, 270_000, {"bad_auth": 2}),
        (0, 2, 9, 50, 0, 0, 0, 0, 0, 400, 40_000, {"bad_magic": 1}),
        (4, 2, 9, 250, 0, 6, 0, 0, 0, 2400, 240_000, {"bad_magic": 1}),
        (0, 3, 1, 500, 3, 0, 0, 0, 0, 5000, 500_000, {}),
        (1, 3, 1, 500, 3, 0, 0, 0, 0, 5000, 500_000, {"unknown_collector": 4}),
        (1, 3, 2, 10, 0, 0, 0, 0, 0, 90, 9_000, {"unknown_collector": 4}),
    ]
    names = ["time", "collector_id", "boot_id", "received", "lost", "kernel",
             "missed_while_down", "duplicates", "reordered", "frames", "bytes", "invalid"]  # fmt: skip
    frame = pd.DataFrame(rows, columns=names)
    frame["time"] = t0 + frame["time"] * SECOND
    return frame


def _fill_ring(cap: SynthCapture, ring_dir: Path) -> None:
    frames, dec = cap.frames, decode_batch(cap.frames)
    ring = PacketRing(ring_dir, segment_bytes=64 << 10, inventory=cap.inventory())
    ring.start()
    for lo in range(0, len(frames), 500):
        rows = np.arange(lo, min(lo + 500, len(frames)))
        part = FrameBatch(
            data=frames.data, offset=frames.offset[rows], caplen=frames.caplen[rows],
            origlen=frames.origlen[rows], ts_ns=frames.ts_ns[rows],
            linktype=frames.linktype[rows], host=frames.host[rows],
        )  # fmt: skip
        ring.append(part, dec.take(rows))
    ring.stop()


def build(folder: Path, *, seed: int = 2, ring: bool = False) -> ReadData:
    """Fill ``folder`` (the data directory) and close the store again."""
    cap = generate_small(seed=seed)
    write_capture(cap, folder / "dc.pcapng")
    write_inventory_yaml(cap, folder / "dc.yaml")
    inventory = cap.inventory()
    flows = analyze_captures([folder / "dc.pcapng"], inventory=inventory).flows
    result = evaluate(flows, compile_policy(load_policy(str(PROFILES)), inventory))
    records = result.flows[[*RECORD_COLUMNS, "policy_verdict", "policy_rule"]].astype(
        {"policy_verdict": object, "policy_rule": object}
    )
    t0 = int(records["first_ns"].min())
    migrations, counters = _migrations(cap, t0), _counters(t0)
    with Store(folder) as store:
        store.append_flows(records, inventory=inventory)
        store.add_policy_hits(hit_rows(result.hits))
        store.append_migrations(migrations)
        store.append_collector_counters(counters)
    if ring:
        _fill_ring(cap, folder / "ring")
    now = int(records["last_ns"].max()) / SECOND + 60.0
    return ReadData(
        cap, folder, folder / "dc.yaml", records, result.hits, migrations, counters, now
    )


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a thread (the analyzer's own
    ``HttpServer``); yields its URL and stops it on the way out."""
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
    assert not server.running
