"""Placement advice: VM moves that cut cross-host traffic without breaking constraints.

Greedy steepest descent on a dense VM × VM traffic matrix ``W`` (bytes per bin, both
directions summed; traffic to ``EXTERNAL`` crosses the uplink wherever a VM runs, so it does
not count). With ``G = W · A`` (``A`` the VM → host one-hot assignment), moving VM ``v``
from host ``p`` to ``h`` saves ``G[v, h] − G[v, p]`` bytes per bin of cross-host traffic.
Each step takes the feasible move with the largest saving (ties: VM name, then host name),
applies it and updates two columns of ``G``; it stops when no feasible move saves more than
``min_saving`` or after ``max_moves``. Cross-host traffic strictly falls at each step, so the
search ends; the result is deterministic.

A move is feasible when the VM is not pinned, the target host is under every capacity
limit after the move (VM count; CPU and memory when both the VMs' demands and the hosts'
capacities are given), and no VM of an anti-affinity group the VM belongs to runs there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.records.matrix import EXTERNAL

__all__ = ["MOVE_COLUMNS", "Constraints", "advise", "cross_host_bytes"]

MOVE_COLUMNS: Final = (
    "step",
    "vm",
    "from_host",
    "to_host",
    "saving",
    "cross_before",
    "cross_after",
)
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Constraints:
    """What a placement must respect."""

    max_vms_per_host: int | None = None
    """At most this many VMs on a host (None: no limit)."""
    pinned: frozenset[str] = frozenset()
    """VMs that must not move."""
    anti_affinity: tuple[frozenset[str], ...] = ()
    """Groups of VMs of which no two may share a host."""
    vm_cpu: Mapping[str, float] = field(default_factory=dict)
    """CPU demand per VM (used with ``host_cpu``)."""
    host_cpu: Mapping[str, float] = field(default_factory=dict)
    """CPU capacity per host."""
    vm_memory: Mapping[str, float] = field(default_factory=dict)
    """Memory demand per VM (used with ``host_memory``)."""
    host_memory: Mapping[str, float] = field(default_factory=dict)
    """Memory capacity per host."""


def _symmetric(vm_pairs: pd.DataFrame, vms: Sequence[str]) -> F64:
    index = {v: i for i, v in enumerate(vms)}
    src = vm_pairs["src"].map(index)
    dst = vm_pairs["dst"].map(index)
    keep = (src.notna() & dst.notna() & (src != dst)).to_numpy()
    i = src[keep].to_numpy(dtype=np.int64)
    j = dst[keep].to_numpy(dtype=np.int64)
    w = np.zeros((len(vms), len(vms)))
    np.add.at(w, (i, j), vm_pairs["bytes"].to_numpy(dtype=np.float64)[keep])
    return w + w.T


def cross_host_bytes(vm_pairs: pd.DataFrame, placement: Mapping[str, str]) -> float:
    """Bytes (per bin) between VMs on different hosts under ``placement``."""
    src = vm_pairs["src"].map(placement)
    dst = vm_pairs["dst"].map(placement)
    wire = (src.notna() & dst.notna() & (src != dst)).to_numpy()
    return float(vm_pairs["bytes"].to_numpy(dtype=np.float64)[wire].sum())


def _capacity(demand: Mapping[str, float], capacity: Mapping[str, float], vms: Sequence[str],
              hosts: Sequence[str]) -> tuple[F64, F64] | None:  # fmt: skip
    if not demand or not capacity:
        return None
    need = np.array([float(demand.get(v, 0.0)) for v in vms])
    cap = np.array([float(capacity.get(h, np.inf)) for h in hosts])
    return need, cap


def advise(
    vm_pairs: pd.DataFrame,
    placement: Mapping[str, str],
    constraints: Constraints = Constraints(),
    *,
    hosts: Iterable[str] = (),
    max_moves: int = 10,
    min_saving: float = 0.0,
) -> pd.DataFrame:
    """Moves, in order, that cut cross-host traffic (``MOVE_COLUMNS``; ``saving`` and the
    totals in the matrix's bytes per bin). ``hosts`` adds empty candidate hosts to those of
    ``placement``. ``vm_pairs`` is a VM-pair matrix with ``src``, ``dst``, ``bytes``."""
    vms = sorted(v for v in placement if v != EXTERNAL)
    host_names = sorted({*(placement[v] for v in vms), *hosts} - {EXTERNAL})
    if not vms or len(host_names) < 2:
        return pd.DataFrame({c: [] for c in MOVE_COLUMNS})
    h_index = {h: k for k, h in enumerate(host_names)}
    where = np.array([h_index[placement[v]] for v in vms], dtype=np.int64)
    w = _symmetric(vm_pairs, vms)
    one_hot = np.zeros((len(vms), len(host_names)))
    one_hot[np.arange(len(vms)), where] = 1.0
    g = w @ one_hot
    count = np.bincount(where, minlength=len(host_names))
    limits = [
        c
        for c in (
            _capacity(constraints.vm_cpu, constraints.host_cpu, vms, host_names),
            _capacity(constraints.vm_memory, constraints.host_memory, vms, host_names),
        )
        if c is not None
    ]
    used = [np.bincount(where, weights=need, minlength=len(host_names)) for need, _ in limits]
    movable = ~np.isin(np.array(vms, dtype=object), list(constraints.pinned))
    groups = [np.isin(np.array(vms, dtype=object), list(g)) for g in constraints.anti_affinity]
    cross = cross_host_bytes(vm_pairs, {v: placement[v] for v in vms})
    rows: list[tuple[int, str, str, str, float, float, float]] = []
    for step in range(1, max_moves + 1):
        gain = g - g[np.arange(len(vms)), where][:, None]
        ok = movable[:, None] & (np.arange(len(host_names))[None, :] != where[:, None])
        if constraints.max_vms_per_host is not None:
            ok &= (count + 1 <= constraints.max_vms_per_host)[None, :]
        for (need, cap), u in zip(limits, used, strict=True):
            ok &= (u[None, :] + need[:, None]) <= cap[None, :] + 1e-9
        for member in groups:
            occupied = np.bincount(where[member], minlength=len(host_names)) > 0
            ok[member] &= ~occupied[None, :]
        gain = np.where(ok, gain, -np.inf)
        best = float(gain.max())
        if not best > max(min_saving, 0.0):
            break
        # ties: first VM by name, then first host by name (row-major argmax on sorted axes)
        v, h = np.unravel_index(int(np.argmax(gain == best)), gain.shape)
        old = int(where[v])
        g[:, old] -= w[:, v]
        g[:, h] += w[:, v]
        count[old] -= 1
        count[h] += 1
        for (need, _), u in zip(limits, used, strict=True):
            u[old] -= need[v]
            u[h] += need[v]
        where[v] = h
        rows.append((step, vms[v], host_names[old], host_names[h], best, cross, cross - best))
        cross -= best
    return pd.DataFrame(rows, columns=list(MOVE_COLUMNS))
