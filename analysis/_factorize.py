"""Factorize a ``uint64`` column in one hash pass (a compiled kernel; private).

What ``pandas.factorize`` gives for integer keys — codes, and the distinct keys in order of
first appearance — plus where each distinct key first appears, without importing pandas on
the per-batch path (``vspan report`` imports it meanwhile, in the background).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vspan.kernels import kernel

__all__ = ["factorize"]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
"""Fibonacci hashing: the multiplier's high bits mix every key bit."""


@kernel
def factorize(keys: U64) -> tuple[I64, U64, I64]:
    """``(codes, uniques, first)``: ``uniques[codes] == keys``, uniques in order of first
    appearance, ``first[k]`` the index of the first ``keys`` row equal to ``uniques[k]``."""
    n = keys.shape[0]
    bits = 1
    while (1 << bits) < 2 * n:
        bits += 1
    shift = np.uint64(64 - bits)
    mask = (1 << bits) - 1
    slots = np.full(1 << bits, -1, np.int64)  # code of the key in a slot, -1 when empty
    codes = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    uniques = np.empty(n, np.uint64)
    m = 0
    for i in range(n):
        key = keys[i]
        s = np.int64((key * _GOLDEN) >> shift)
        while True:
            code = slots[s]
            if code < 0:
                slots[s] = m
                uniques[m] = key
                first[m] = i
                codes[i] = m
                m += 1
                break
            if uniques[code] == key:
                codes[i] = code
                break
            s = (s + 1) & mask
    return codes, uniques[:m].copy(), first[:m].copy()
