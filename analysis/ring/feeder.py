"""``RingFeeder``: the engine's batches into the packet ring on a thread of its own.

Writing pcapng segments is disk I/O; on the engine's thread a slow disk would stall decoding
and, behind it, the receivers. The feeder copies each batch's frames out of the receiver's
buffer (one copy of the span they occupy; the buffer goes back to the receiver at once),
queues it with its decode and the inventory of the moment, and a thread appends the queue
to the ring in order. The queue is bounded in bytes (``max_bytes``): a batch that would go
over is not kept — its frames are counted under ``frames_dropped{backpressure}`` and logged
(at most every 10 s) — the flows are unaffected, only the ring misses those packets.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Final

from vspan.analysis.decode.columns import Decoded
from vspan.analysis.ring.ring import PacketRing
from vspan.batch import FrameBatch
from vspan.inventory import InventoryView

__all__ = ["RingFeeder", "compact"]

log = logging.getLogger("vspan.ring")
_LOG_EVERY_S: Final = 10.0

_Item = tuple[FrameBatch, Decoded, InventoryView | None]


def compact(batch: FrameBatch) -> FrameBatch:
    """``batch`` with its frames copied into a buffer of its own: the span of the source
    buffer they occupy, in one copy."""
    if len(batch) == 0:
        return batch
    lo = int(batch.offset.min())
    hi = int((batch.offset + batch.caplen).max())
    return FrameBatch(
        data=batch.data[lo:hi].copy(),
        offset=batch.offset - lo,
        caplen=batch.caplen,
        origlen=batch.origlen,
        ts_ns=batch.ts_ns,
        linktype=batch.linktype,
        iface=batch.iface,
        host=batch.host,
        iface_names=batch.iface_names,
    )


class RingFeeder:
    """Appends submitted batches to ``ring`` from a thread; ``submit`` never blocks."""

    def __init__(self, ring: PacketRing, *, max_bytes: int = 256 << 20) -> None:
        self.ring, self.max_bytes = ring, max_bytes
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_log = -math.inf
        self.dropped = 0
        """Frames not kept because the queue was full."""
        self.batches = 0

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="vspan-ring", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Append what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, batch: FrameBatch, dec: Decoded, inventory: InventoryView | None) -> bool:
        """Queue a copy of ``batch``'s frames with their decode; False when dropped."""
        size = int(batch.caplen.sum(dtype="int64"))
        with self._lock:
            if self._queued_bytes + size > self.max_bytes and self._queued_bytes > 0:
                self.dropped += len(batch)
                now = time.monotonic()
                if now - self._last_log >= _LOG_EVERY_S:
                    self._last_log = now
                    log.warning(
                        "ring: the disk is behind (%d bytes queued); %d frames not kept so far",
                        self._queued_bytes,
                        self.dropped,
                    )
                return False
            self._queued_bytes += size
        self._queue.put((compact(batch), dec, inventory))
        return True

    def metrics(self) -> dict[str, int]:
        """``frames_dropped{backpressure}``, ``queue_bytes``."""
        with self._lock:
            return {"frames_dropped{backpressure}": self.dropped, "queue_bytes": self._queued_bytes}

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, dec, inventory = item
            try:
                self.ring.inventory = inventory
                self.ring.append(batch, dec)
                self.batches += 1
            except Exception:  # a bug: the ring counts its own I/O errors
                log.exception("ring: appending a batch of %d frames failed", len(batch))
            finally:
                with self._lock:
                    self._queued_bytes -= int(batch.caplen.sum(dtype="int64"))
