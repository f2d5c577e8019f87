"""The live flow engine: chunks from the receivers in, finished and open flows out.

Per chunk: ``ingest`` (validation and decoding of every message at once) → accounting,
which drops duplicates, stale messages and replays of old boots → the frames of the
accepted messages only, through the same pipeline ``vspan report`` runs over files
(``decode_batch`` → ``usable`` → ``EndpointResolver`` → ``FlowTable``). Everything the
engine hands on goes through callbacks that must not block (the analyzer's put them on
queues): the frames of each batch (``on_batch``, the packet ring), finished flows
(``on_flows``, as ``Finished`` rows: no pandas on this thread) and, every ``open_every_s``, a
copy of the open flows (``on_open``). Without ``on_flows`` finished flows wait for
``drain()``.

Flow time is capture time, as in ``FlowTable``, by a clock per observing host; but a quiet
host sends no frames to move its clock on, so the engine gives the table the analyzer's time
with every batch (``received_ns``) and the table moves each host's clock on by the analyzer's
time passed since that host's newest frame arrived. ``tick(now)`` — the engine thread calls
it whenever no chunk came for ``poll_s`` and after chunks, at most every ``tick_s`` — moves
every host's clock to ``now`` that way, so flows idle out on a quiet network as they would
had one more frame arrived, each by its own host's time: a replay of an old capture, or a
collector whose clock is behind, ends its flows ``idle_timeout`` after its last frame like
any other. ``capture_now(now)`` is the newest capture time of any host at ``now``. The tick
also publishes the open flows when due. The thread loop reads the analyzer's clock
(``clock``) and passes it down; nothing below it reads a clock.

The flow table is bounded: past ``max_flows`` open flows, the least recently seen are
finished early and counted as ``evicted`` (down to ``evict_to`` of the bound, so that the
cost of shedding is paid rarely, not per batch).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.decode import decode_batch
from vspan.analysis.decode.columns import Decoded
from vspan.analysis.flows.endpoints import EndpointResolver, LearningConfig, NicDirectory
from vspan.analysis.flows.keys import usable
from vspan.analysis.flows.table import FLOW_COLUMNS, Finished, FlowConfig, FlowTable
from vspan.analysis.ingest.accounting import Accounting, AccountingConfig
from vspan.analysis.ingest.messages import ingest
from vspan.analysis.ingest.receivers import Chunk
from vspan.analysis.report import undecodable
from vspan.batch import FrameBatch

__all__ = ["Engine", "EngineConfig", "warm_batch", "warm_up"]

log = logging.getLogger(__name__)

FlowSink = Callable[[Finished], None]
"""Takes finished flows (rows of ``FLOW_COLUMNS``); must not block."""
OpenSink = Callable[[Finished, int], None]
"""Takes a copy of every open flow and the capture time (ns) it was taken at."""
BatchSink = Callable[[FrameBatch, Decoded], None]
"""Takes each batch with its decode, while the batch's buffer is still valid."""
InventoryGetter = Callable[[], NicDirectory | None]
RegisteredGetter = Callable[[], npt.ArrayLike]
Clock = Callable[[], float]

_NS = 1_000_000_000

_WARM_FRAME = bytes.fromhex(
    "".join(
        [
            "0200000000020200000000010800",  # Ethernet: MACs, IPv4
            "4500001c00004000401100000a0000010a000002",  # IPv4: UDP 10.0.0.1 -> 10.0.0.2
            "1f90003500080000",  # UDP 8080 -> 53, no payload
        ]
    )
)


def _ns(seconds: float) -> int:
    """The analyzer's time in ns, as the flow table takes it."""
    return int(seconds * _NS)


def warm_batch() -> FrameBatch:
    """One UDP frame (``_WARM_FRAME``) as a batch: what ``warm_up`` runs through. Its buffer
    is writable, as the receivers' are: numba compiles (and loads) a kernel separately for
    read-only arrays."""
    return FrameBatch.from_frames([_WARM_FRAME])


def warm_up() -> None:
    """Run one frame through a throwaway engine (decode, endpoints, flow table), so that
    the compiled kernels are loaded (from numba's cache) before traffic arrives."""
    engine = Engine()
    engine.process(warm_batch())
    engine.flush()


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
    """How long the thread waits for a chunk before it ticks (and notices ``stop()``)."""
    tick_s: float = 0.5
    """While chunks keep coming, tick at most this often."""
    open_every_s: float = 2.0
    """Publish the open flows (``on_open``) this often, in the analyzer's time; 0: never.
    With many open flows less often: at least a second per ``open_per_s`` of them (each
    copy is turned into records on the store writer's thread)."""
    open_per_s: int = 50_000
    """Open flows the store writer is asked to turn into records per second, at most."""

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
        on_open: OpenSink | None = None,
        on_batch: BatchSink | None = None,
        accounting: Accounting | None = None,
        clock: Clock = time.time,
        registered: RegisteredGetter | None = None,
        warm: Callable[[], None] = warm_up,
    ) -> None:
        self.config = config or EngineConfig()
        self._warm = warm
        self.ready = threading.Event()
        """Set once the engine thread has its kernels loaded (compiled, on a machine's
        first run) and consumes ``source``."""
        self.accounting = accounting or Accounting(self.config.accounting)
        self._source = source
        self._inventory = inventory
        self._registered = registered
        self._on_flows = on_flows
        self._on_open = on_open
        self._on_batch = on_batch
        self._clock = clock
        self._resolver = EndpointResolver(learning=self.config.learning)
        self._table = FlowTable(self.config.flow)
        self._pending: list[Finished] = []
        self._pending_rows = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_tick = 0.0
        self._last_open = 0.0
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
        self.idled = 0
        """Flows finished by a tick: idle for the idle timeout while no frame came."""
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
                "idled",
                "evicted",
                "dropped_flows",
                "errors",
                "open_flows",
            )
        }
        out.update({f"undecodable_{k}": v for k, v in self.undecodable.items()})
        out.update(self._table.counters())
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
            accepted = self.accounting.update(ing, now, kernel_drops=chunk.kernel_drops)
            for collector, reason in chunk.rejected:
                known = collector in (cfg.keys or {}) or bool(np.isin(collector, registered))
                self.accounting.add_rejected(collector, reason, now=now, known=known)
            self.chunks += 1
            self.messages += int(np.count_nonzero(accepted))
            self.process(ing.frames_of(accepted), now=now)
        finally:
            chunk.release()

    def process(self, batch: FrameBatch, *, now: float | None = None) -> None:
        """Decode a batch of tunnel frames and add its usable frames to the flow table;
        ``now`` (the analyzer's time, s) is when they arrived: each host's clock goes on
        from there (``tick``, ``capture_now``)."""
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
        received = None if now is None else _ns(now)
        finished = self._table.update_rows(good, self._resolver.resolve(good), received_ns=received)
        excess = self._table.open_flows - self.config.max_flows
        if excess > 0:
            keep = int(self.config.max_flows * self.config.evict_to)
            evicted = self._table.evict_rows(self._table.open_flows - keep)
            self.evicted += len(evicted)
            finished = Finished.concat([finished, evicted])
        self._emit(finished)

    def capture_now(self, now: float) -> int | None:
        """Capture time (ns) at the analyzer's time ``now``: the newest of the hosts'
        clocks, each its newest capture time moved on by the time since that frame arrived;
        None before any frame."""
        return self._table.capture_time(_ns(now))

    def tick(self, now: float) -> None:
        """Move each host's clock to the analyzer's time ``now`` (``capture_now``): finish
        the flows idle since; publish the open flows when ``open_every_s`` has passed."""
        self._last_tick = now
        at = self.capture_now(now)
        if at is None:
            return
        idled = self._table.advance_rows(received_ns=_ns(now))
        self.idled += len(idled)
        self._emit(idled)
        cfg = self.config
        every = max(cfg.open_every_s, self._table.open_flows / max(cfg.open_per_s, 1))
        if self._on_open is not None and cfg.open_every_s > 0 and now - self._last_open >= every:
            self._last_open = now
            self._on_open(self._table.open_rows(), at)

    def flush(self) -> None:
        """Finish every open flow (shutdown, end of a replay)."""
        self._emit(self._table.flush_rows())

    def drain(self) -> pd.DataFrame:
        """The finished flows kept since the last drain (``FLOW_COLUMNS``)."""
        with self._lock:
            parts, self._pending, self._pending_rows = self._pending, [], 0
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype=np.int64) for c in FLOW_COLUMNS})
        return Finished.concat(parts).frame()

    def _emit(self, flows: Finished) -> None:
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
                    self._pending[0] = head.rows(np.arange(gone, len(head)))
                self._pending_rows -= gone
                self.dropped_flows += gone
                excess -= gone

    # --- the component ------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread: it runs ``warm`` (loads the compiled kernels — a few
        tenths of a second, or compiles them on a machine's first run), sets ``ready``, then
        consumes ``source``. Until then what arrives waits in ``source`` and, when that is
        full, in the receivers' socket buffers (counted as ``kernel`` drops beyond)."""
        if self._source is None:
            raise RuntimeError("Engine.start() needs a source queue")
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
        try:
            self._warm()
        except Exception:  # the kernels still compile on their first call
            self.errors += 1
            log.exception("engine: warming up the kernels failed")
        self.ready.set()
        tick_s = self.config.tick_s
        while not self._stop.is_set():
            try:
                chunk = self._source.get(timeout=self.config.poll_s)
            except queue.Empty:
                self._guarded_tick(self._clock())
                continue
            self._guarded(chunk)
            now = self._clock()
            if now - self._last_tick >= tick_s:
                self._guarded_tick(now)
        for _ in range(self._source.qsize()):  # what was queued when stop() came
            try:
                chunk = self._source.get_nowait()
            except queue.Empty:
                break
            self._guarded(chunk)

    def _guarded(self, chunk: Chunk) -> None:
        try:
            self.process_chunk(chunk, self._clock())
        except Exception:  # a bug: count it, keep serving
            self.errors += 1
            log.exception("engine failed on a chunk of %d datagrams", chunk.offsets.size)

    def _guarded_tick(self, now: float) -> None:
        try:
            self.tick(now)
        except Exception:  # a bug: count it, keep serving
            self.errors += 1
            log.exception("engine tick failed")
