"""The flow table's hash index: rows stay findable through inserts, growth and deletes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.flows import _kernel as kt


def table(hashes: list[int], index_size: int) -> tuple[kt.Rows, kt.Index]:
    n = len(hashes)
    keys = np.zeros((n, len(kt.KEY_WORDS)), np.uint64)
    keys[:, 0] = np.arange(n, dtype=np.uint64)  # every row its own key
    state = np.zeros((n, len(kt.STATE)), np.int64)
    state[:, kt.STATE.index("hash")] = hashes
    index = np.zeros(index_size, np.int32)
    kt.rebuild_index(index, state, n)
    return (keys, state), index


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=60),
    st.lists(st.integers(0, 59), max_size=60),
    st.sampled_from([2, 8, 64]),
    st.booleans(),
)
def test_every_row_left_is_found_after_deletes(
    hashes: list[int], drops: list[int], spread: int, top: bool
) -> None:
    # Few distinct home slots (``spread`` of them, at the start or the end of the index)
    # make long probe chains, which wrap around from the end.
    low = [h % spread for h in hashes]
    hashes = [h - h % 128 + (127 - lo if top else lo) for h, lo in zip(hashes, low, strict=True)]
    size = 1 << (2 * len(hashes) - 1).bit_length()
    (keys, state), index = table(hashes, size)
    ids = set(range(len(hashes)))  # key word 0 of each row
    n = len(hashes)
    fin = (np.zeros_like(keys), np.zeros_like(state))
    nfin = 0
    for d in drops:
        if d >= n:
            continue
        gone = int(keys[d, 0])
        n, nfin = kt.remove_rows(np.array([d], np.int64), ((keys, state), index, n), (fin, nfin))
        assert int(fin[0][nfin - 1, 0]) == gone
        ids.remove(gone)
        assert np.count_nonzero(index) == n
        for row in range(n):
            k = keys[row].copy()
            assert kt.find_row(index, keys, state, np.int64(state[row, 0]), k) == row
        missing = np.zeros(len(kt.KEY_WORDS), np.uint64)
        missing[0] = gone
        assert kt.find_row(index, keys, state, np.int64(hashes[gone]), missing) == -1
    assert sorted(int(k) for k in keys[:n, 0]) == sorted(ids)
