"""The analyzer: receivers, the live flow engine, policies, store, packet ring and HTTP.

::

    receivers ──chunks──► Engine ──finished, open flows──► FlowRecorder ─┐
                            └──batches──► RingFeeder ─► PacketRing ─index─┼─► StoreWriter ─► store
    InventoryState ─────────────────── history, migrations ───────────────┘   (DuckDB file)
      ▲ control plane (HTTP) ◄── collectors
    maintenance thread: data-plane MACs, collector counters, retention, ring age

Each part is a component of its own; this one owns their configuration, order of start and
stop, and the glue between them. No thread waits on another's slow work: the receivers stop
reading (the kernel's socket buffer holds the datagrams) only when every chunk buffer is in
use; the engine hands frames to the ring's thread and flows to the store writer's thread,
both through bounded queues that count what they cannot take; the store writer is the one
thread that writes to the database (flows, policy hits, open-flow view, ring index,
inventory history, migrations, counters, retention).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vspan.analysis import warmup
from vspan.analysis.decode.columns import Decoded
from vspan.analysis.flows.endpoints import LearningConfig
from vspan.analysis.flows.table import Finished, FlowConfig
from vspan.analysis.ingest.accounting import AccountingConfig
from vspan.analysis.ingest.receivers import Chunk, ReceiverConfig, TcpReceiver, UdpReceiver
from vspan.analysis.inventory.snapshot import InventoryEvent, InventorySnapshot, Migration
from vspan.analysis.inventory.state import InventoryState
from vspan.analysis.policy.acl import format_rule
from vspan.analysis.policy.evaluate import CompiledPolicy, PolicyCounters, compile_policy
from vspan.analysis.policy.profiles import PolicySet, load_policy
from vspan.analysis.ring.feeder import RingFeeder
from vspan.analysis.ring.ring import PacketRing
from vspan.analysis.service._lanes import RingIndex, run_calls
from vspan.analysis.service.config import AnalyzerConfig, load_keys
from vspan.analysis.service.engine import Engine, EngineConfig, warm_up
from vspan.analysis.service.recorder import FlowRecorder
from vspan.analysis.store.persist import (
    collector_rows,
    history_rows,
    identity_change,
    migration_rows,
    saved_streams,
)
from vspan.analysis.store.store import Store
from vspan.analysis.store.writer import StoreWriter
from vspan.batch import FrameBatch
from vspan.errors import ConfigError
from vspan.inventory import Host, Inventory, Vm
from vspan.yamlconf import parse_address

__all__ = ["Analyzer"]

log = logging.getLogger(__name__)

RING_CLOCK_SKEW_S = 60.0
"""How far ahead of the analyzer's clock capture time may age the packet ring."""


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
            self.data_dir,
            retention_days=config.retention_days,
            max_bytes=config.max_store_bytes,
            retention_basis=config.retention_basis,
            clock=clock,
        )
        self.writer = StoreWriter(max_rows=config.store_queue_rows)
        self.recorder = FlowRecorder(
            self.store,
            self.writer,
            policy=self._policy_for,
            counters=self.policy_counters,
            salt=secrets.randbits(64),
            snapshot=self.data_dir / "open-flows.parquet",
        )
        self._recovery = self.writer.lane("flows_recovered", run_calls)
        self._history = self.writer.lane("inventory_history", run_calls)
        self._migrations = self.writer.lane("migrations", run_calls)
        self._counters = self.writer.lane("collector_counters", run_calls)
        self._retention = self.writer.lane("retention", run_calls)
        self._flows_order = threading.Lock()
        """Held from reading the inventory to queueing flows, and while queueing a VM's
        new key (``_on_flows``, ``_on_event``)."""
        self.state = InventoryState(history_sink=self._on_event, migration_sink=self._on_move)
        self.ring = PacketRing(
            self.data_dir / "ring",
            segment_bytes=config.ring_segment_bytes,
            max_bytes=config.ring_max_bytes,
            max_age_s=config.ring_max_age,
            store=RingIndex(self.store, self.writer),
            clock_from_frames=False,  # the maintenance thread's trim moves it, bounded
        )
        self.feeder = RingFeeder(self.ring, max_bytes=config.ring_queue_bytes)
        self.engine: Engine | None = None
        self.receivers: list[UdpReceiver | TcpReceiver] = []
        self.http: Any = None
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
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
        try:
            os.makedirs(self.data_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot use {self.data_dir} as the data directory: {exc.strerror or exc}",
                field="data_dir",
            ) from exc
        self.store.start()
        self.writer.start()
        self._recovery.submit(self.recorder.recover)
        self.writer.flush()
        self.ring.start()
        self.feeder.start()
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
                    idle_timeout_s=cfg.idle_timeout,
                    active_timeout_s=cfg.active_timeout,
                    pair_window_s=cfg.pair_window,
                    max_pending_copies=cfg.max_pending_copies,
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
            on_open=self._on_open,
            on_batch=self._on_batch,
            clock=self.clock,
            registered=registered,
            warm=self._warm_kernels,
        )
        self._guard("restore_streams", lambda: self._restore_streams(set(keys or ()), now))
        self.engine.start()
        rcfg = ReceiverConfig(
            rcvbuf=cfg.udp_rcvbuf,
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

    def _warm_kernels(self) -> None:
        """The engine thread's first job: compile the kernels if this machine never did
        (logged; about half a minute), load them, and build one flow's records (pandas,
        the port-profiles) — all before it takes the first chunk."""
        warmup.warm(log.warning)
        warm_up()
        self.recorder.warm_up(self.state.snapshot())

    def ready(self) -> bool:
        """Whether the analyzer processes what it receives (its engine is warm)."""
        return self.engine is not None and self.engine.ready.is_set()

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
        self.feeder.stop()
        self.ring.stop()
        self.writer.stop()
        self.recorder.forget_snapshot()  # every open flow was finished and written
        self.store.stop()

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Where the receivers listen (with the ports the kernel chose for port 0)."""
        return {("udp" if isinstance(r, UdpReceiver) else "tcp"): r.address for r in self.receivers}

    def _restore_streams(self, keyed: set[int], now: float) -> None:
        """Give the accounting each collector's sequence as last saved (and each keyed
        collector's boot, so that a replay of an older one is refused from the start): the
        first message after this start reveals what was sent while the analyzer was down."""
        assert self.engine is not None
        newest = self.store.query(
            "SELECT * FROM collector_counters QUALIFY rank() OVER "
            '(PARTITION BY "collector_id" ORDER BY "time" DESC) = 1'
        )
        restored = self.engine.accounting.restore(saved_streams(newest, keyed), now, keyed=keyed)
        if restored:
            log.info("tunnel: %d collector sequences resumed where the last run saved them",
                     restored)  # fmt: skip

    def registered_collectors(self) -> npt.NDArray[np.int64]:
        """collector_ids of the inventory's hosts (file or control plane): what
        ``require_known`` accepts besides the collectors with a key (any thread)."""
        snapshot = self.state.snapshot()
        cached, ids = self._registered_ids
        if cached is not snapshot:
            ids = np.array([h.collector_id for h in snapshot.hosts], np.int64)
            self._registered_ids = (snapshot, ids)
        return ids

    def stored_flows(self) -> int:
        """Flow records the store writer has written so far (what the store holds from this
        run, before retention)."""
        return self.writer.written("flows")

    # --- the engine's callbacks (engine thread; they only queue) ---------------------------

    def _on_batch(self, batch: FrameBatch, dec: Decoded) -> None:
        self.feeder.submit(batch, dec, self.state.snapshot())

    def _on_flows(self, rows: Finished) -> None:
        with self._flows_order:  # policy hits under a VM's old key queued before its rekey
            self.recorder.finished(rows, self.state.snapshot())

    def _on_open(self, rows: Finished, at_ns: int) -> None:
        self.recorder.opened(rows, self.state.snapshot())

    def _policy_for(self, snapshot: InventorySnapshot) -> CompiledPolicy | None:
        if self.policy is None:
            return None
        compiled = self._compiled
        if compiled is None or compiled[0] is not snapshot:
            compiled = self._compiled = (snapshot, compile_policy(self.policy, snapshot))
        return compiled[1]

    # --- inventory sinks (any thread, under the state's lock; they only queue) ----------

    def _on_event(self, event: InventoryEvent) -> None:
        rows, change = history_rows([event]), identity_change(event)
        if change is not None:  # the VM's earlier rows follow its new UUID or name
            # The snapshot with the new key is in place: flows queued from here on read
            # it; those that read the one before were queued before this move of the rows.
            with self._flows_order:
                self._history.submit(functools.partial(self.store.rekey_vm, *change))
        if len(rows):
            self._history.submit(lambda: self.store.append_inventory_events(rows))

    def _on_move(self, move: Migration) -> None:
        rows = migration_rows([move])
        if len(rows):
            self._migrations.submit(lambda: self.store.append_migrations(rows))

    # --- control plane providers ---------------------------------------------------------

    def profile_of(self, vm: Vm) -> str | None:
        """The port-profile the analyzer's profiles file binds ``vm`` to (None: none)."""
        if self.policy is None:
            return None
        compiled = self._policy_for(self.state.snapshot())
        return None if compiled is None else compiled.bindings.profile_of(vm.name)

    def profiles_for(self, host: Host, vms: Sequence[Vm]) -> list[dict[str, Any]]:
        """The port-profiles bound to ``vms``, as the control plane serves them."""
        if self.policy is None:
            return []
        wanted = {self.profile_of(vm) for vm in vms}
        return [
            {"name": p.name, "default": str(p.default), "rules": [format_rule(r) for r in p.rules]}
            for p in self.policy.profiles
            if p.name in wanted
        ]

    # --- maintenance --------------------------------------------------------------------

    def _maintain(self, every_s: float = 1.0) -> None:
        last_counters, last_retention = self.clock(), -math.inf
        while not self._stop.wait(every_s):
            now = self.clock()
            self._guard("dataplane", functools.partial(self._observe_dataplane, now))
            self._guard("ring_trim", functools.partial(self._trim_ring, now))
            if now - last_counters >= 10.0:
                last_counters = now
                self._save_counters()
            if now - last_retention >= 600.0:
                last_retention = now
                self._retention.submit(
                    functools.partial(self.store.apply_retention, int(now * 1e9))
                )

    def _trim_ring(self, now: float) -> None:
        """Delete ring segments past the age bound at the capture clock's time (which goes
        on while the network is quiet), but never past the analyzer's own clock (plus
        ``RING_CLOCK_SKEW_S``): a frame stamped in the future (a collector's clock far ahead,
        or a forged message) must not age out what the ring holds."""
        at = None if self.engine is None else self.engine.capture_now(now)
        if at is not None:
            self.ring.trim(min(at, int((now + RING_CLOCK_SKEW_S) * 1e9)))

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
            self.state.observe_dataplane(
                {m: h for m, (h, _) in fresh.items()},
                now,
                vif_of_mac={m: v for m, (_, v) in fresh.items()},
            )

    def _save_counters(self) -> None:
        if self.engine is None:
            return
        acc = self.engine.accounting
        rows = collector_rows(acc.streams(), acc.invalid(), self.clock())
        if len(rows):
            self._counters.submit(lambda: self.store.append_collector_counters(rows))

    def counters(self) -> dict[str, Any]:
        """Everything counted, for metrics and the CLI. ``drops`` says where frames and
        messages went missing, each under its cause: ``lost`` (messages the collectors' sequences
        say the network lost), ``kernel`` (datagrams the analyzer's socket dropped: its buffer
        was full), ``missed_while_down`` (messages sent while the analyzer was stopped, found
        at its restart), ``backpressure`` (frames the packet ring and flows the store did not keep
        because their queue was full)."""
        out: dict[str, Any] = {"errors": dict(self.errors)}
        kernel = sum(r.counters().get("kernel_drops", 0) for r in self.receivers)
        writer = self.writer.metrics()
        feeder = self.feeder.metrics()
        out["receivers"] = [
            {"receiver": "udp" if isinstance(r, UdpReceiver) else "tcp", **r.counters()}
            for r in self.receivers
        ]
        out["store_writer"] = writer
        out["store"] = self.store.counters()
        out["recorder"] = {"recovered": self.recorder.recovered}
        out["ring"] = {**self.ring.metrics(), **feeder}
        out["inventory"] = dict(self.state.counters)
        totals = dict.fromkeys(("lost", "missed_while_down"), 0)
        if self.engine is not None:
            out["engine"] = self.engine.counters()
            out["collectors"] = self.engine.accounting.collectors().to_dict(orient="records")
            totals = self.engine.accounting.totals()
        out["drops"] = {
            "lost": totals["lost"],
            "kernel": kernel,
            "missed_while_down": totals["missed_while_down"],
            "backpressure": {
                "ring_frames": feeder["frames_dropped{backpressure}"],
                "store_flows": writer.get("dropped{flows}", 0),
            },
        }
        return out

    def _guard(self, kind: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:  # a failing step must not stop the analyzer; it is counted
            self._count(kind)
            log.exception("analyzer: %s failed", kind)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
