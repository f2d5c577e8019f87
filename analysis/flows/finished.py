"""Finished flows: rows of the flow table's arrays, and their columns (private to ``flows``).

The table hands out flows as rows (``Finished``: its ``keys`` and ``state`` arrays, copied),
cheap to queue; ``columns`` and ``frame`` unpack them into ``FLOW_COLUMNS`` — key words into
endpoints, addresses and ports, ``bits`` into flags — and add the totals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vspan.analysis.flows import _kernel as kt
from vspan.analysis.flows.keys import KEY_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FLOW_COLUMNS", "Columns", "Finished", "Rows"]

_UNPACKED = ("tcp_flags", "tcp_flags_rev", "first_rev", "tagged")
_STATE = (*KEY_COLUMNS, *(c for c in kt.STATE if c != "bits"), *_UNPACKED)
_TOTALS = ("packets", "bytes", "packets_rev", "bytes_rev", "delay_ns")
FLOW_COLUMNS = (*_STATE, *_TOTALS)
"""Columns of the finished-flow frames the table returns (A/B oriented: ``_rev`` counters
are B → A; ``first_rev`` says the first packet went B → A). ``packets``/``bytes`` are
``max(sender copies, receiver copies) + other copies`` per direction; ``pairs`` the packets
whose two copies were paired, ``delay_sum_ns`` their delays added up, and ``delay_ns`` their
mean (NaN without a pair): the time from a packet's sender copy to its receiver copy, the
two observation points of cross-host traffic."""

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
_U32, _U16 = np.uint64(32), np.uint64(16)
_LOW16, _LOW32 = np.uint64(0xFFFF), np.uint64(0xFFFFFFFF)


Columns = dict[str, npt.NDArray[np.int64] | npt.NDArray[np.float64]]


def _add_totals(cols: Columns) -> None:
    """Add the packet and byte totals and the delay (see ``FLOW_COLUMNS``) to ``cols``."""
    for what in ("packets", "bytes"):
        for d in kt.DIRECTIONS:
            s, r, o = (cols[f"{what}{d}_{role}"] for role in kt.ROLES)
            cols[f"{what}{d}"] = np.maximum(s, r) + o
    pairs = cols["pairs"]
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["delay_ns"] = np.where(pairs > 0, cols["delay_sum_ns"] / pairs, np.nan)


def _frame(keys: U64, state: I64) -> pd.DataFrame:
    """Rows of the table's arrays as a flow frame (``FLOW_COLUMNS``)."""
    import pandas as pd  # here: ``vspan report`` runs without it

    return pd.DataFrame(_columns(keys, state), columns=list(FLOW_COLUMNS), copy=True)


def _columns(keys: U64, state: I64) -> Columns:
    """Rows of the table's arrays as named columns (``FLOW_COLUMNS``)."""
    cols: Columns = {}
    for w, name in enumerate(kt.KEY_WORDS[:6]):
        cols[name] = keys[:, w].view(np.int64)
    ports, misc = keys[:, 6], keys[:, 7]
    cols["port_a"] = (ports >> _U32).astype(np.int64)
    cols["port_b"] = (ports & _LOW32).astype(np.int64)
    cols["proto"] = (misc >> _U32).astype(np.int64)
    cols["vlan"] = ((misc >> _U16) & _LOW16).astype(np.int64)
    cols["ethertype"] = (misc & _LOW16).astype(np.int64)
    for c, name in enumerate(kt.STATE):
        if name != "bits":
            cols[name] = state[:, c]
    bits = state[:, kt.STATE.index("bits")]
    cols["tcp_flags"] = bits & 0xFFFF
    cols["tcp_flags_rev"] = (bits >> 16) & 0xFFFF
    cols["first_rev"] = (bits >> kt.FIRST_REV_BIT) & 1
    cols["tagged"] = (bits >> kt.TAGGED_BIT) & 1
    _add_totals(cols)
    return cols


@dataclass(frozen=True, slots=True)
class Finished:
    """Finished flows as rows of the table's arrays; ``frame()`` makes the flow frame."""

    keys: U64
    state: I64

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def frame(self) -> pd.DataFrame:
        """The flows as a frame with ``FLOW_COLUMNS``."""
        return _frame(self.keys, self.state) if len(self) else _none()

    def columns(self) -> Columns:
        """The flows as ``FLOW_COLUMNS`` arrays."""
        cols = _columns(self.keys, self.state)
        return {name: cols[name] for name in FLOW_COLUMNS}

    def rows(self, index: npt.NDArray[np.integer[Any]]) -> Finished:
        """The rows ``index``, in that order."""
        return Finished(self.keys[index], self.state[index])

    @staticmethod
    def concat(parts: list[Finished]) -> Finished:
        """The rows of ``parts``, in order."""
        if len(parts) <= 1:
            return parts[0] if parts else Rows(0).finished(0)
        return Finished(
            np.concatenate([p.keys for p in parts]), np.concatenate([p.state for p in parts])
        )


@functools.cache
def _empty() -> pd.DataFrame:
    return _frame(*Rows(0).arrays)


def _none() -> pd.DataFrame:
    """No finished flows (a new empty frame with ``FLOW_COLUMNS``)."""
    return _empty().copy(deep=False)


class Rows:
    """Growable rows of ``KEY_WORDS`` uint64 and ``STATE`` int64."""

    def __init__(self, capacity: int) -> None:
        self.keys = np.zeros((capacity, len(kt.KEY_WORDS)), np.uint64)
        self.state = np.zeros((capacity, len(kt.STATE)), np.int64)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def arrays(self) -> tuple[U64, I64]:
        return self.keys, self.state

    def grown(self, n: int, capacity: int) -> Rows:
        """A copy of the first ``n`` rows with room for ``capacity``."""
        out = Rows(capacity)
        out.keys[:n], out.state[:n] = self.keys[:n], self.state[:n]
        return out

    def finished(self, n: int) -> Finished:
        """A copy of the first ``n`` rows, as finished flows."""
        return Finished(self.keys[:n].copy(), self.state[:n].copy())

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.state.nbytes
