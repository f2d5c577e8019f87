"""The hash factorization agrees with pandas.factorize (the oracle) on any uint64 keys."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis._factorize import factorize

# Few distinct values, some differing only in high bits (the hash's slot comes from those).
_KEYS = st.lists(
    st.sampled_from([0, 1, 2, 1 << 63, (1 << 64) - 1, 0x9E3779B97F4A7C15, 7 << 58, 7 << 59])
    | st.integers(0, (1 << 64) - 1),
    max_size=300,
)


@settings(deadline=None)  # the first call may load or compile the kernel (numba)
@given(_KEYS)
def test_codes_and_uniques_are_pandas_factorize(values: list[int]) -> None:
    keys = np.array(values, np.uint64)
    codes, uniques, first = factorize(keys)
    want_codes, want_uniques = pd.factorize(keys)
    assert codes.tolist() == want_codes.tolist()
    assert uniques.tolist() == np.asarray(want_uniques).tolist()
    # first: where each distinct key first appears
    assert first.tolist() == [values.index(int(u)) for u in uniques.tolist()]


def test_a_thousand_keys_repeated() -> None:
    # Enough keys for probe chains in a table of 2 slots per key.
    keys = (np.arange(5000, dtype=np.uint64) % np.uint64(1000)) * np.uint64(3)
    codes, uniques, first = factorize(keys)
    assert uniques.tolist() == (np.arange(1000, dtype=np.uint64) * np.uint64(3)).tolist()
    assert codes.tolist() == (np.arange(5000) % 1000).tolist()
    assert first.tolist() == list(range(1000))
