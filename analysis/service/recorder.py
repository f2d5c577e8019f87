"""``FlowRecorder``: the engine's flows, finished and open, into the store — off its thread.

The engine hands over flows as rows of its table (``flows.Finished``) with the inventory
snapshot of that moment; everything else happens on the store writer's thread
(``store.writer``), so the engine never waits on pandas, the port-profiles or DuckDB:

* **finished flows** (lane ``flows``): flow records (``records.flow_table``: VM names, hosts,
  scope), the VMs' UUIDs, the port-profiles' verdicts and hits (``policy.evaluate``), one insert
  into ``flows`` and one upsert of ``policy_hits``; then they leave the open-flow view;
* **open flows** (lane ``open_flows``, newest snapshot only): the same records and verdicts
  (no hits: a flow is counted once, when it ends), handed to ``Store.set_open_flows`` so that
  every read of flows shows them with ``state`` ``open``.

A flow keeps one ``flow_uid`` from the first snapshot that shows it open to its stored
record: a UUID (version 8, RFC 9562) made of the analyzer run's ``salt``, the flow key's
hash and the time of the frame that started it (``born_ns``, which stays when an older
frame joins and moves the flow's start back).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.flows import _kernel as kt
from vspan.analysis.flows.table import Finished
from vspan.analysis.inventory.snapshot import InventorySnapshot
from vspan.analysis.policy.evaluate import CompiledPolicy, PolicyCounters, evaluate
from vspan.analysis.records.build import RECORD_COLUMNS, HostNames, flow_table
from vspan.analysis.store.append import AppendResult
from vspan.analysis.store.persist import hit_rows, uuid_or_none
from vspan.analysis.store.store import Store
from vspan.analysis.store.writer import StoreWriter

__all__ = ["STORED_COLUMNS", "FlowRecorder", "flow_uids"]

log = logging.getLogger(__name__)

STORED_COLUMNS: Final = (
    *RECORD_COLUMNS, "flow_uid", "src_vm_uuid", "dst_vm_uuid", "policy_verdict", "policy_rule",
)  # fmt: skip
"""The columns of a flow as stored (and as the open-flow view shows it)."""

PolicyFor = Callable[[InventorySnapshot], CompiledPolicy | None]
Finishing = tuple[Finished, InventorySnapshot]
"""Finished flows and the inventory when they ended."""
Opening = tuple[Finished, InventorySnapshot]
"""Every open flow and the inventory when they were copied."""

_HASH: Final = kt.STATE.index("hash")
_BORN: Final = kt.STATE.index("born_ns")
_HEX: Final = np.frombuffer(b"0123456789abcdef", np.uint8)
_DASHES: Final = (8, 13, 18, 23)


def flow_uids(
    salt: int, hashes: npt.NDArray[np.int64], born_ns: npt.NDArray[np.int64]
) -> npt.NDArray[np.object_]:
    """The UUID text of each flow: version 8 (RFC 9562), its 122 free bits the flow key's
    hash mixed with ``salt`` (64 bits) and the time of the frame that started it (ns)."""
    n = hashes.size
    raw = np.empty((n, 16), np.uint8)
    mixed = hashes.astype(np.uint64) ^ np.uint64(salt & 0xFFFF_FFFF_FFFF_FFFF)
    raw[:, :8] = mixed.astype(">u8").view(np.uint8).reshape(n, 8)
    raw[:, 8:] = born_ns.astype(">u8").view(np.uint8).reshape(n, 8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x80  # version 8
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # variant 10
    digits = np.empty((n, 32), np.uint8)
    digits[:, 0::2], digits[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 0x0F]
    text = np.full((n, 36), ord("-"), np.uint8)
    text[:, np.setdiff1d(np.arange(36), _DASHES)] = digits
    out: npt.NDArray[np.object_] = text.view("S36").ravel().astype("U36").astype(object)
    return out


def flow_keys(rows: Finished) -> npt.NDArray[np.int64]:
    """One integer per flow that tells a flow apart from every other open or just ended
    one: its key's hash mixed with the time of the frame that started it (``born_ns``: a
    flow cut by the active timeout and its continuation share the key, not that time; and
    it stays when an older frame joins the flow and moves its start back)."""
    hashes = rows.state[:, _HASH].view(np.uint64)
    starts = rows.state[:, _BORN].view(np.uint64)
    mixed = hashes ^ (starts * np.uint64(0x9E3779B97F4A7C15))
    out: npt.NDArray[np.int64] = mixed.view(np.int64)
    return out


class FlowRecorder:
    """Writes the engine's flows on ``writer``'s thread; ``finished`` and ``opened`` are
    called on the engine's thread and never block."""

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        *,
        policy: PolicyFor,
        counters: PolicyCounters,
        salt: int,
        snapshot: Path | None = None,
    ) -> None:
        self.store, self._policy, self._counters, self._salt = store, policy, counters, salt
        self.snapshot = snapshot
        """Where each copy of the open flows is also kept (Parquet, replaced whole): what
        ``recover`` stores after the analyzer stopped without finishing them."""
        self.recovered = 0
        """Flows recovered from the snapshot at start."""
        self._next_id = 1
        self._open_keys = np.zeros(0, np.int64)
        """``flow_keys`` of the rows of the open-flow view, row for row."""
        self._finished = writer.lane("flows", self._write_finished, size=lambda item: len(item[0]))
        self._open = writer.lane(
            "open_flows", self._write_open, size=lambda item: len(item[0]), latest_only=True
        )

    def finished(self, rows: Finished, inventory: InventorySnapshot) -> bool:
        """Queue finished flows; False when the writer's queue was full (counted there)."""
        return self._finished.submit((rows, inventory))

    def opened(self, rows: Finished, inventory: InventorySnapshot) -> bool:
        """Queue a copy of every open flow (it replaces a copy still queued)."""
        return self._open.submit((rows, inventory))

    def warm_up(self, inventory: InventorySnapshot) -> None:
        """Build the records of one flow, verdicts included, and throw them away: the first
        build imports and loads what it needs (about a second), which must not happen while
        traffic waits."""
        from vspan.analysis.decode import decode_batch
        from vspan.analysis.flows.endpoints import EndpointResolver
        from vspan.analysis.flows.table import FlowTable
        from vspan.analysis.service.engine import warm_batch

        dec = decode_batch(warm_batch())
        table = FlowTable()
        table.update_rows(dec, EndpointResolver().resolve(dec))
        self.records(table.flush_rows(), inventory, numbered=False)

    # --- the writer's thread ------------------------------------------------------------

    def records(
        self, rows: Finished, inventory: InventorySnapshot, *, numbered: bool
    ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """``rows`` as stored flows (``STORED_COLUMNS``, row for row) and their policy hits
        (None without port-profiles); ``numbered`` gives them the next ``flow_id`` values."""
        cols = rows.columns()
        table = flow_table(
            cols,
            inventory=inventory,
            hosts=HostNames.from_inventory(inventory),
            first_id=self._next_id,
        )
        records = table.frame()
        if numbered:
            self._next_id += len(records)
        else:
            records["flow_id"] = pd.array([pd.NA] * len(records), dtype="Int64")
        records["flow_uid"] = flow_uids(
            self._salt, np.asarray(cols["hash"], np.int64), np.asarray(cols["born_ns"], np.int64)
        )
        uuids = {vm.name: uuid_or_none(vm.uuid) for vm in inventory.vms}
        records["src_vm_uuid"] = records["src_vm"].map(uuids)
        records["dst_vm_uuid"] = records["dst_vm"].map(uuids)
        records["policy_verdict"] = None
        records["policy_rule"] = None
        compiled = self._policy(inventory)
        hits = None
        if compiled is not None and len(records):
            result = evaluate(records.drop(columns=["policy_verdict", "policy_rule"]), compiled)
            records, hits = result.flows, result.hits
        return records[list(STORED_COLUMNS)], hits

    def _write_finished(self, items: Sequence[Finishing]) -> AppendResult:
        written = AppendResult(0)
        for rows, inventory in _by_inventory(items):
            records, hits = self.records(rows, inventory, numbered=True)
            done = self.store.append("flows", records)
            written = AppendResult(
                written.written + done.written,
                _summed(written.coerced, done.coerced),
                _summed(written.rejected, done.rejected),
            )
            if hits is not None and len(hits):
                self._counters.add(hits)
                self.store.add_policy_hits(hit_rows(hits))
            self._leave_open(flow_keys(rows))
        return written

    def _write_open(self, items: Sequence[Opening]) -> int:
        rows, inventory = items[-1]
        records, _ = self.records(rows, inventory, numbered=False)
        self.store.set_open_flows(records)
        self._open_keys = flow_keys(rows)
        if self.snapshot is not None:
            _write_atomically(records, self.snapshot)
        return len(records)

    # --- what the analyzer did not finish (its start and stop) ------------------------

    def recover(self) -> int:
        """Store the open flows of the last snapshot, if the analyzer stopped without
        finishing them (killed, crashed): their counters as of that snapshot (at most a
        snapshot interval before it stopped), those not stored since. Logged and counted
        (``recovered``); the snapshot is then removed. Call before the engine starts."""
        if self.snapshot is None or not self.snapshot.exists():
            return 0
        try:
            records = pd.read_parquet(self.snapshot)
        except (OSError, ValueError) as exc:
            log.error("open flows of the last run: cannot read %s (%s); not recovered",
                      self.snapshot, exc)  # fmt: skip
            self.snapshot.unlink(missing_ok=True)
            return 0
        uids = records["flow_uid"].astype(str)
        done = self.store.stored_flow_uids(uids.tolist())
        left = records[~uids.isin(done).to_numpy()].reset_index(drop=True)
        if len(left):
            left["flow_id"] = np.arange(self._next_id, self._next_id + len(left), dtype=np.int64)
            self._next_id += len(left)
            stored = self.store.append("flows", left).written
            when = pd.Timestamp(self.snapshot.stat().st_mtime, unit="s", tz="UTC")
            log.warning(
                "the analyzer stopped without finishing %d open flows: %d stored with their "
                "counters as of %s (packets after that were lost)",
                len(left), stored, when.isoformat(timespec="seconds"),
            )  # fmt: skip
            self.recovered += stored
        self.snapshot.unlink(missing_ok=True)
        return self.recovered

    def forget_snapshot(self) -> None:
        """Every open flow was finished and stored (a clean stop): no snapshot to recover."""
        if self.snapshot is not None:
            self.snapshot.unlink(missing_ok=True)

    def _leave_open(self, ended: npt.NDArray[np.int64]) -> None:
        """Take flows that ended out of the open-flow view (until the next snapshot)."""
        if self._open_keys.size == 0:
            return
        gone = np.isin(self._open_keys, ended)
        if gone.any():
            keep = ~gone
            self.store.set_open_flows(self.store.open_flows[keep])
            self._open_keys = self._open_keys[keep]


def _write_atomically(records: pd.DataFrame, path: Path) -> None:
    """``records`` as Parquet at ``path``, replacing it whole (a crash leaves the old one)."""
    part = path.with_name(path.name + ".part")
    records.to_parquet(part, index=False)
    os.replace(part, path)


def _summed(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def _by_inventory(items: Sequence[Finishing]) -> list[Finishing]:
    """Consecutive items of one inventory snapshot merged (one records build each)."""
    out: list[Finishing] = []
    parts: list[Finished] = []
    current: InventorySnapshot | None = None
    for rows, inventory in items:
        if current is not None and inventory is not current:
            out.append((Finished.concat(parts), current))
            parts = []
        current = inventory
        parts.append(rows)
    if current is not None:
        out.append((Finished.concat(parts), current))
    return out
