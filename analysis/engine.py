"""The live flow engine: chunks from the receivers in, finished flows out.

Per chunk: ``ingest`` (validation and decoding of every message at once) → accounting,
which drops duplicates, stale messages and replays of old boots → the frames of the
accepted messages only, through the same pipeline ``vspan report`` runs over files
(``decode_batch`` → ``usable`` → ``EndpointResolver`` → ``FlowTable``). Finished flows go
to ``on_flows(df)`` (the store) when a callback is given, else they wait for ``drain()``;
both frames have the columns of ``vspan.analysis.flows.FLOW_COLUMNS``.

The flow table is bounded: past ``max_flows`` open flows, the least recently seen are
finished early and counted as ``evicted`` (down to ``evict_to`` of the bound, so that the
cost of shedding is paid rarely, not per batch). Flow timeouts run in capture time, as in
``FlowTable``; the wall clock is read only by the receivers (``Chunk.received_at``, the
``now`` of the accounting).

Not done here: the delay between the two copies of a cross-host packet. Pairing the copies
needs a per-packet identity (IPv4 id, TCP seq) that ``Decoded`` does not carry, and a join
across batches, since the two collectors' messages arrive in different chunks.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.accounting import Accounting, AccountingConfig
from vspan.analysis.columns import Decoded
from vspan.analysis.decode import decode_batch
from vspan.analysis.endpoints import EndpointResolver, LearningConfig, NicDirectory
from vspan.analysis.flowkeys import usable
from vspan.analysis.flows import FLOW_COLUMNS, FlowConfig, FlowTable
from vspan.analysis.ingest import ingest
from vspan.analysis.receivers import Chunk
from vspan.analysis.report import undecodable
from vspan.batch import FrameBatch

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)

FlowSink = Callable[[pd.DataFrame], None]
BatchSink = Callable[[FrameBatch, Decoded], None]
InventoryGetter = Callable[[], NicDirectory | None]
RegisteredGetter = Callable[[], npt.ArrayLike]


_WARM_FRAME = bytes.fromhex(
    "".join(
        [
            "0200000000020200000000010800",  # Ethernet: MACs, IPv4
            "4500001c00004000401100000a0000010a000002",  # IPv4: UDP 10.0.0.1 -> 10.0.0.2
            "1f90003500080000",  # UDP 8080 -> 53, no payload
        ]
    )
)


def warm_batch() -> FrameBatch:
    """One UDP frame (``_WARM_FRAME``) as a batch: what ``warm_up`` runs through. Its buffer
    is writable, as the receivers' are: numba compiles (and loads) a kernel separately for
    read-only arrays."""
    return FrameBatch.from_frames([_WARM_FRAME])


def warm_up() -> None:
    """Run one frame through a throwaway engine (decode, endpoints, flow table), so that
    the compiled kernels are loaded (from numba's cache) before traffic arrives."""
    Engine().process(warm_batch())


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine settings."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    """Idle and active timeouts (capture time)."""
    max_flows: int = 1_000_000
    """Open flows kept; beyond, the least recently seen are finished as ``evicted``."""
    evict_to: float = 0.9
    """Fraction of ``max_flows`` left open after an eviction."""
    keys: Mapping[int, bytes] | None = None
    """BLAKE2b key per ``collector_id``; those collectors must authenticate."""
    require_known: bool = False
    """Accept only known collectors: those in ``keys`` and the registered ones (the
    engine's ``registered``); others are dropped as ``unknown_collector``."""
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    """Bounds of the per-collector accounting (collectors, sequences, old boots)."""
    learning: LearningConfig = field(default_factory=LearningConfig)
    """Bounds of the MAC table learned from tags."""
    max_pending_flows: int = 1_000_000
    """Finished flows kept for ``drain()`` (without ``on_flows``); older ones are dropped
    and counted as ``dropped_flows``."""
    poll_s: float = 0.1
    """How soon the engine thread notices ``stop()``."""

    def __post_init__(self) -> None:
        if self.max_flows < 1 or not 0.0 <= self.evict_to <= 1.0:
            raise ValueError(
                f"max_flows {self.max_flows} must be >= 1 and evict_to {self.evict_to} in 0..1"
            )


class Engine:
    """Consumes chunks (from ``source`` when started, or ``process_chunk`` directly)."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        source: queue.Queue[Chunk] | None = None,
        inventory: InventoryGetter | None = None,
        on_flows: FlowSink | None = None,
        on_batch: BatchSink | None = None,
        accounting: Accounting | None = None,
        registered: RegisteredGetter | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.accounting = accounting or Accounting(self.config.accounting)
        self._source = source
        self._inventory = inventory
        self._registered = registered
        self._on_flows = on_flows
        self._on_batch = on_batch
        self._resolver = EndpointResolver(learning=self.config.learning)
        self._table = FlowTable(self.config.flow)
        self._pending: list[pd.DataFrame] = []
        self._pending_rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.chunks = 0
        self.messages = 0
        """Messages ingested: valid, and not dropped by the accounting (duplicate, stale,
        old boot)."""
        self.frames = 0
        """Frames of valid messages."""
        self.bytes = 0
        """Wire bytes (``orig_len``) of those frames."""
        self.decoded = 0
        """Frames usable for flows."""
        self.undecodable: dict[str, int] = {}
        """Frames not usable for flows, by ``report.undecodable`` reason."""
        self.flows_finished = 0
        self.evicted = 0
        """Flows finished early because the table was full."""
        self.dropped_flows = 0
        """Finished flows dropped because nobody drained them."""
        self.errors = 0
        """Chunks that failed with an unexpected exception (a bug; logged)."""

    def learned_macs(
        self,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
        """MACs the tags taught, with the collector_id and vif behind which each was seen."""
        return self._resolver.learned_table()

    @property
    def open_flows(self) -> int:
        """Flows currently open."""
        return self._table.open_flows

    def counters(self) -> dict[str, int]:
        """Every counter, for metrics (undecodable reasons prefixed ``undecodable_``): valid
        messages dropped (``dropped_duplicate``, ``dropped_stale``, ``dropped_stale_boot``),
        the accounting's bounds (``streams``, ``streams_evicted``, ``collectors_tracked``,
        ``collectors_evicted``) and the learned MACs (``learned_macs``,
        ``learned_macs_evicted``)."""
        out = {
            name: int(getattr(self, name))
            for name in (
                "chunks",
                "messages",
                "frames",
                "bytes",
                "decoded",
                "flows_finished",
                "evicted",
                "dropped_flows",
                "errors",
                "open_flows",
            )
        }
        out.update({f"undecodable_{k}": v for k, v in self.undecodable.items()})
        totals = self.accounting.totals()
        for name, total in (("duplicate", "duplicates"), ("stale", "stale"),
                            ("stale_boot", "stale_boot")):  # fmt: skip
            out[f"dropped_{name}"] = totals[total]
        out.update(self.accounting.counters())
        out["learned_macs"] = self._resolver.learned
        out["learned_macs_evicted"] = self._resolver.evicted
        return out

    # --- processing (no thread, no clock) -----------------------------------------------

    def process_chunk(self, chunk: Chunk, now: float) -> None:
        """Ingest, account and process one chunk received at ``now``; releases it."""
        try:
            cfg = self.config
            registered = np.asarray(
                () if self._registered is None else self._registered(), np.int64
            )
            ing = ingest(
                chunk.data,
                chunk.offsets,
                chunk.sizes,
                keys=cfg.keys,
                require_known=cfg.require_known,
                registered=registered,
            )
            accepted = self.accounting.update(ing, now)
            for collector, reason in chunk.rejected:
                known = collector in (cfg.keys or {}) or bool(np.isin(collector, registered))
                self.accounting.add_rejected(collector, reason, now=now, known=known)
            self.chunks += 1
            self.messages += int(np.count_nonzero(accepted))
            self.process(ing.frames_of(accepted))
        finally:
            chunk.release()

    def process(self, batch: FrameBatch) -> None:
        """Decode a batch of tunnel frames and add its usable frames to the flow table."""
        if len(batch) == 0:
            return
        dec = decode_batch(batch)  # copies what it needs: the batch's buffer may be reused
        if self._on_batch is not None:  # the packet ring: while the buffer is still ours
            self._on_batch(batch, dec)
        ok = usable(dec)
        self.frames += len(dec)
        self.bytes += int(dec.wirelen.sum(dtype=np.int64))
        self.decoded += int(np.count_nonzero(ok))
        if not ok.all():
            for reason, n in undecodable(dec, ok):
                self.undecodable[reason] = self.undecodable.get(reason, 0) + n
        good = dec if ok.all() else dec.take(np.flatnonzero(ok))
        if self._inventory is not None:
            self._resolver.directory = self._inventory()
        finished = self._table.update(good, self._resolver.resolve(good))
        excess = self._table.open_flows - self.config.max_flows
        if excess > 0:
            keep = int(self.config.max_flows * self.config.evict_to)
            evicted = self._table.evict(self._table.open_flows - keep)
            self.evicted += len(evicted)
            finished = pd.concat([finished, evicted], ignore_index=True)
        self._emit(finished)

    def flush(self) -> None:
        """Finish every open flow (shutdown, end of a replay)."""
        self._emit(self._table.flush())

    def drain(self) -> pd.DataFrame:
        """The finished flows kept since the last drain (``FLOW_COLUMNS``)."""
        with self._lock:
            parts, self._pending, self._pending_rows = self._pending, [], 0
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype=np.int64) for c in FLOW_COLUMNS})
        return pd.concat(parts, ignore_index=True)

    def _emit(self, flows: pd.DataFrame) -> None:
        if not len(flows):
            return
        self.flows_finished += len(flows)
        if self._on_flows is not None:
            self._on_flows(flows)
            return
        with self._lock:
            self._pending.append(flows)
            self._pending_rows += len(flows)
            excess = self._pending_rows - self.config.max_pending_flows
            while excess > 0:  # drop the oldest rows
                head = self._pending[0]
                gone = min(excess, len(head))
                if gone == len(head):
                    self._pending.pop(0)
                else:
                    self._pending[0] = head.iloc[gone:]
                self._pending_rows -= gone
                self.dropped_flows += gone
                excess -= gone

    # --- the component ------------------------------------------------------------------

    def start(self) -> None:
        """Load the compiled kernels, then start consuming ``source`` in a thread.

        Loading takes a few tenths of a second; done here, before the receivers start, it
        does not stall the first chunks while datagrams pile up.
        """
        if self._source is None:
            raise RuntimeError("Engine.start() needs a source queue")
        warm_up()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vspan-engine", daemon=True)
        self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        """Process what is queued, stop the thread, and (``flush``) finish every open flow."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if flush:
            self.flush()

    def _run(self) -> None:
        assert self._source is not None
        while not self._stop.is_set():
            try:
                chunk = self._source.get(timeout=self.config.poll_s)
            except queue.Empty:
                continue
            self._guarded(chunk)
        for _ in range(self._source.qsize()):  # what was queued when stop() came
            try:
                chunk = self._source.get_nowait()
            except queue.Empty:
                break
            self._guarded(chunk)

    def _guarded(self, chunk: Chunk) -> None:
        try:
            self.process_chunk(chunk, chunk.received_at)
        except Exception:  # a bug: count it, keep serving
            self.errors += 1
            log.exception("engine failed on a chunk of %d datagrams", chunk.offsets.size)
