"""The analyzer: receivers, the live flow engine, policies, store, packet ring and HTTP.

::

    UDP/TCP receivers ──chunks──► Engine ──flows──► records ─► policy ─► StoreWriter ─► store
                                    └──batches──► PacketRing                (DuckDB file)
    InventoryState ◄── control plane (HTTP) ── collectors      history, migrations ─► store
    maintenance thread: collector counters, retention, ring trimming, idle flows

Each part is a component of its own; this one owns their configuration, order of start and
stop, and the glue between them. The receive loops never wait on the store or the API:
the receivers hand chunks to a bounded queue, the engine thread hands flow records to the
store writer's queue.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.accounting import AccountingConfig
from vspan.analysis.columns import Decoded
from vspan.analysis.config import AnalyzerConfig, load_keys, parse_address
from vspan.analysis.endpoints import LearningConfig
from vspan.analysis.engine import Engine, EngineConfig
from vspan.analysis.flows import FlowConfig
from vspan.analysis.inventory_snapshot import InventoryEvent, InventorySnapshot, Migration
from vspan.analysis.inventory_state import InventoryState
from vspan.analysis.persist import collector_rows, history_rows, hit_rows, migration_rows
from vspan.analysis.policy import PolicySet, load_policy
from vspan.analysis.policy_acl import format_rule
from vspan.analysis.policy_eval import CompiledPolicy, PolicyCounters, compile_policy, evaluate
from vspan.analysis.receivers import Chunk, ReceiverConfig, TcpReceiver, UdpReceiver
from vspan.analysis.records import RECORD_COLUMNS, HostNames, flow_records
from vspan.analysis.ring import PacketRing
from vspan.analysis.store import Store
from vspan.analysis.store_writer import StoreWriter
from vspan.batch import FrameBatch
from vspan.inventory import Host, Inventory, Vm

__all__ = ["Analyzer"]

log = logging.getLogger(__name__)

_STORED = (*RECORD_COLUMNS, "src_vm_uuid", "dst_vm_uuid", "policy_verdict", "policy_rule")


class Analyzer:
    """``vspan analyze`` as one component: ``start()``, ``stop()``, and its parts."""

    def __init__(self, config: AnalyzerConfig, *, clock: Callable[[], float] = time.time):
        config.validate()
        self.config = config
        self.clock = clock
        self.data_dir = Path(config.resolved_data_dir())
        self.policy: PolicySet | None = None
        self.policy_counters = PolicyCounters()
        self._compiled: tuple[InventorySnapshot | None, CompiledPolicy] | None = None
        self.chunks: queue.Queue[Chunk] = queue.Queue(maxsize=64)
        self.store = Store(
            self.data_dir, retention_days=config.retention_days, max_bytes=config.max_store_bytes
        )
        self.flow_writer = StoreWriter(self.store, table="flows")
        self.state = InventoryState(history_sink=self._on_event, migration_sink=self._on_move)
        self.ring = PacketRing(
            self.data_dir / "ring",
            segment_bytes=config.ring_segment_bytes,
            max_bytes=config.ring_max_bytes,
            max_age_s=config.ring_max_age,
            store=self.store,
        )
        self.engine: Engine | None = None
        self.receivers: list[UdpReceiver | TcpReceiver] = []
        self.http: Any = None
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._next_flow_id = 1
        self._seen_macs: dict[int, tuple[int, int]] = {}
        self._registered_ids: tuple[InventorySnapshot | None, npt.NDArray[np.int64]] = (
            None,
            np.zeros(0, np.int64),
        )
        self.errors: dict[str, int] = {}

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the store and ring, load inventory and profiles, start receiving and serving."""
        cfg, now = self.config, self.clock()
        os.makedirs(self.data_dir, exist_ok=True)
        self.store.start()
        self.flow_writer.start()
        self.ring.start()
        if cfg.inventory:
            self.state.add_static(Inventory.load(cfg.inventory), now)
        if cfg.profiles:
            self.policy = load_policy(cfg.profiles)
        keys = load_keys(cfg.keys) if cfg.keys else None
        known_only = cfg.require_known or bool(keys)  # spec/tunnel.md: keys mean known only
        registered = self.registered_collectors if cfg.require_known else None
        if known_only:
            log.info(
                "tunnel: only known collectors accepted: %d with a key%s",
                len(keys or {}), ", and registered ones" if cfg.require_known else "",
            )  # fmt: skip
        self.engine = Engine(
            EngineConfig(
                flow=FlowConfig(
                    idle_timeout_s=cfg.idle_timeout, active_timeout_s=cfg.active_timeout
                ),
                max_flows=cfg.max_flows,
                keys=keys,
                require_known=known_only,
                accounting=AccountingConfig(
                    max_collectors=cfg.max_collectors,
                    max_streams=cfg.max_streams,
                    boot_grace_s=cfg.boot_grace,
                ),
                learning=LearningConfig(
                    max_macs_per_vif=cfg.max_macs_per_vif, max_macs=cfg.max_learned_macs
                ),
            ),
            source=self.chunks,
            inventory=lambda: self.state,
            on_flows=self._on_flows,
            on_batch=self._on_batch,
            registered=registered,
        )
        if keys:
            self._guard("restore_boots", lambda: self._restore_boots(set(keys), now))
        self.engine.start()
        rcfg = ReceiverConfig(
            max_message=cfg.tcp_max_message,
            tcp_max_connections=cfg.tcp_max_connections,
            tcp_idle_timeout_s=cfg.tcp_idle_timeout,
        )
        if cfg.udp:
            udp = UdpReceiver(parse_address(cfg.udp), sink=self.chunks, config=rcfg)
            self.receivers.append(udp)
        if cfg.tcp:
            tcp = TcpReceiver(
                parse_address(cfg.tcp),
                sink=self.chunks,
                keys=keys,
                require_known=known_only,
                registered=registered,
                config=rcfg,
            )
            self.receivers.append(tcp)
        for receiver in self.receivers:
            receiver.start()
        self._stop.clear()
        self._maintenance = threading.Thread(
            target=self._maintain, name="vspan-maintenance", daemon=True
        )
        self._maintenance.start()

    def stop(self) -> None:
        """Stop receiving, finish every flow, write everything out, close the store."""
        self._stop.set()
        for receiver in self.receivers:
            receiver.stop()
        if self.engine is not None:
            self.engine.stop(flush=True)
        if self._maintenance is not None:
            self._maintenance.join()
        self._save_counters()
        self.flow_writer.stop()
        self.ring.stop()
        self.store.stop()

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Where the receivers listen (with the ports the kernel chose for port 0)."""
        return {("udp" if isinstance(r, UdpReceiver) else "tcp"): r.address for r in self.receivers}

    def _restore_boots(self, keyed: set[int], now: float) -> None:
        """Give the accounting each keyed collector's boot of the last counters saved, so
        that a replay of an older boot is refused from the start (see ``accounting``)."""
        assert self.engine is not None
        rows = self.store.query(
            "SELECT c.collector_id, c.boot_id FROM collector_counters c JOIN ("
            "SELECT collector_id, max(time) AS t FROM collector_counters GROUP BY collector_id"
            ") m ON c.collector_id = m.collector_id AND c.time = m.t"
        )
        newest: dict[int, int] = {}
        for cid, boot in zip(rows["collector_id"].tolist(), rows["boot_id"].tolist(), strict=True):
            if cid in keyed:  # the newest of the boots of that sample, in serial order
                old = newest.get(cid)
                if old is None or 0 < (boot - old) % (1 << 32) < 1 << 31:
                    newest[cid] = boot
        self.engine.accounting.restore_boots(newest, now)

    def registered_collectors(self) -> npt.NDArray[np.int64]:
        """collector_ids of the inventory's hosts (file or control plane): what
        ``require_known`` accepts besides the collectors with a key (any thread)."""
        snapshot = self.state.snapshot()
        cached, ids = self._registered_ids
        if cached is not snapshot:
            ids = np.array([h.collector_id for h in snapshot.hosts], np.int64)
            self._registered_ids = (snapshot, ids)
        return ids

    # --- the engine's callbacks (engine thread) -------------------------------------------

    def _on_batch(self, batch: FrameBatch, dec: Decoded) -> None:
        self.ring.inventory = self.state.snapshot()
        self.ring.append(batch, dec)

    def _on_flows(self, flows: pd.DataFrame) -> None:
        snapshot = self.state.snapshot()
        records = flow_records(
            flows,
            inventory=snapshot,
            hosts=HostNames.from_inventory(snapshot),
            first_id=self._next_flow_id,
        )
        self._next_flow_id += len(records)
        uuids = {vm.name: vm.uuid for vm in snapshot.vms}
        records["src_vm_uuid"] = records["src_vm"].map(uuids)
        records["dst_vm_uuid"] = records["dst_vm"].map(uuids)
        records["policy_verdict"] = None
        records["policy_rule"] = None
        compiled = self._policy_for(snapshot)
        if compiled is not None:
            result = evaluate(records.drop(columns=["policy_verdict", "policy_rule"]), compiled)
            records = result.flows
            self.policy_counters.add(result.hits)
            try:
                self.store.add_policy_hits(hit_rows(result.hits))
            except Exception:  # the store counts and logs its own failures; keep serving
                self._count("policy_hits")
                log.exception("storing policy hits failed")
        self.flow_writer.submit(records[list(_STORED)])

    def _policy_for(self, snapshot: InventorySnapshot) -> CompiledPolicy | None:
        if self.policy is None:
            return None
        if self._compiled is None or self._compiled[0] is not snapshot:
            self._compiled = (snapshot, compile_policy(self.policy, snapshot))
        return self._compiled[1]

    # --- inventory sinks (any thread, under the state's lock) ---------------------------

    def _on_event(self, event: InventoryEvent) -> None:
        rows = history_rows([event])
        if len(rows):
            self._guard("history", lambda: self.store.append_inventory_events(rows))

    def _on_move(self, move: Migration) -> None:
        rows = migration_rows([move])
        if len(rows):
            self._guard("migrations", lambda: self.store.append_migrations(rows))

    # --- control plane providers ---------------------------------------------------------

    def profiles_for(self, host: Host, vms: Sequence[Vm]) -> list[dict[str, Any]]:
        """The port-profiles bound to ``vms``, as the control plane serves them."""
        if self.policy is None:
            return []
        compiled = self._policy_for(self.state.snapshot())
        assert compiled is not None
        wanted = {compiled.bindings.profile_of(vm.name) for vm in vms}
        return [
            {"name": p.name, "default": str(p.default), "rules": [format_rule(r) for r in p.rules]}
            for p in self.policy.profiles
            if p.name in wanted
        ]

    # --- maintenance --------------------------------------------------------------------

    def _maintain(self, every_s: float = 1.0) -> None:
        last_counters = last_retention = 0.0
        while not self._stop.wait(every_s):
            now = self.clock()
            self._observe_dataplane(now)
            if now - last_counters >= 10.0:
                last_counters = now
                self._save_counters()
            if now - last_retention >= 600.0:
                last_retention = now
                now_ns = int(now * 1e9)
                self._guard("retention", functools.partial(self.store.apply_retention, now_ns))

    def _observe_dataplane(self, now: float) -> None:
        """Tell the inventory where the tags saw each VM MAC since the last time: a VM behind
        another host's vif has migrated there (the data plane's view of migrations)."""
        if self.engine is None:
            return
        macs, hosts, vifs = self.engine.learned_macs()
        seen = dict(
            zip(macs.tolist(), zip(hosts.tolist(), vifs.tolist(), strict=True), strict=True)
        )
        fresh = {m: hv for m, hv in seen.items() if self._seen_macs.get(m) != hv}
        self._seen_macs = seen
        if fresh:
            self._guard(
                "dataplane",
                lambda: self.state.observe_dataplane(
                    {m: h for m, (h, _) in fresh.items()},
                    now,
                    vif_of_mac={m: v for m, (_, v) in fresh.items()},
                ),
            )

    def _save_counters(self) -> None:
        if self.engine is None:
            return
        acc = self.engine.accounting
        rows = collector_rows(acc.streams(), acc.invalid(), self.clock())
        if len(rows):
            self._guard("counters", lambda: self.store.append_collector_counters(rows))

    def counters(self) -> dict[str, Any]:
        """Everything counted, for metrics and the CLI."""
        out: dict[str, Any] = {"errors": dict(self.errors)}
        if self.engine is not None:
            out["engine"] = self.engine.counters()
            out["collectors"] = self.engine.accounting.collectors().to_dict(orient="records")
        out["receivers"] = [r.counters() for r in self.receivers]
        out["store_writer"] = self.flow_writer.metrics()
        out["ring"] = self.ring.metrics()
        out["inventory"] = dict(self.state.counters)
        return out

    def _guard(self, kind: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # a failing write must not stop the analyzer; it is counted
            self._count(kind)
            log.exception("analyzer: %s failed", kind)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
