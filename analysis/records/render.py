"""Render result tables for people (aligned text) and programs (CSV, JSON, Parquet).

A ``RecordTable`` (``vspan report --by flow``) is written without pandas: Parquet through
Arrow, JSON and CSV by a compiled writer (``textrows``). A pandas frame (groupings,
queries) goes through pandas' own writers.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Final

import numpy as np

from vspan.analysis.records.options import FORMATS
from vspan.analysis.records.table import RecordTable
from vspan.analysis.records.textrows import TEXT_FORMATS, text_blocks

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMATS", "render", "tcp_flag_letters"]

_FLAG_LETTERS: Final = "FSRPAUECN"
"""TCP flag letters from bit 0 (FIN) to bit 8 (NS), as tcpdump and argus print them."""
_TABLE_HIDE: Final = {
    "flow_id",
    "first_ns",
    "last_ns",
    "icmp_type",
    "icmp_code",
    "icmp_id",
    "copies",
    "ethertype",
    "src_mac",
    "dst_mac",
    "observed_at",
    "duration_s",
    "first",
}


def tcp_flag_letters(flags: object) -> str:
    """``0x12`` → ``"SA"``; empty for None."""
    import pandas as pd

    if flags is None or flags is pd.NA or (isinstance(flags, float) and np.isnan(flags)):
        return ""
    value = int(flags)  # type: ignore[call-overload]
    return "".join(ch for bit, ch in enumerate(_FLAG_LETTERS) if value >> bit & 1)


def _iso_times(frame: pd.DataFrame) -> pd.DataFrame:
    """Datetime columns as ISO 8601 UTC text with microseconds (numpy formats in C)."""
    import pandas as pd

    times = [c for c in frame.columns if isinstance(frame[c].dtype, pd.DatetimeTZDtype)]
    if not times:
        return frame
    out = frame.copy()
    for col in times:
        values = frame[col].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]")
        text = np.char.add(np.datetime_as_string(values, unit="us"), "Z")
        out[col] = pd.Series(text, index=frame.index).where(frame[col].notna(), None)
    return out


_COUNTS: Final = frozenset({
    "packets", "bytes", "packets_rev", "bytes_rev", "flows", "packets_sent", "bytes_sent",
    "packets_received", "bytes_received", "frames",
})  # fmt: skip
"""Columns shown with thousands separators."""


def _per_distinct(values: pd.Series, text: Callable[[Any], str]) -> pd.Series:
    """``text`` of each value, called once per distinct value."""
    import pandas as pd

    codes, uniq = pd.factorize(values, use_na_sentinel=False)
    table = np.array([text(v) for v in uniq], dtype=object)
    return pd.Series(table[codes], index=values.index, dtype=object)


def _float_text(v: float) -> str:
    """A float as a table shows it: up to 6 decimals, trailing zeros dropped, one kept."""
    t = f"{v: .6f}".rstrip("0")  # a space where the sign of a negative goes
    return t + "0" if t.endswith(".") else t


def _cells(values: list[Any]) -> list[str]:
    if any(type(v) is float for v in values):
        return [_float_text(v) if type(v) is float else str(v) for v in values]
    return list(map(str, values))


def _fixed_width(frame: pd.DataFrame) -> str:
    """Each column right-justified to its widest cell or header, one space between (the
    layout of pandas' ``to_string(index=False)``, built directly: that took ~1 s for 20,000
    flows)."""
    columns = []
    for name in frame.columns:
        cells = [str(name), *_cells(frame[name].tolist())]
        width = max(map(len, cells))
        columns.append([c.rjust(width) for c in cells])
    return "\n".join(map(" ".join, zip(*columns, strict=True)))


def _table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no rows)\n"
    shown = frame[[c for c in frame.columns if c not in _TABLE_HIDE]].copy()
    for col in ("tcp_flags", "tcp_flags_rev"):
        if col in shown:
            shown[col] = _per_distinct(shown[col], tcp_flag_letters)
    if "last" in shown:
        shown["last"] = shown["last"].dt.strftime("%H:%M:%S.%f").str[:-3]
    shown = shown.astype(object).where(shown.notna(), "-")
    for col in _COUNTS.intersection(shown.columns):
        shown[col] = _per_distinct(
            shown[col], lambda v: f"{v:,}" if isinstance(v, int | np.integer) else v
        )
    return _fixed_width(shown) + "\n"


def render(frame: pd.DataFrame | RecordTable, fmt: str, out: IO[bytes] | None = None) -> None:
    """Write ``frame`` as ``fmt`` to ``out`` (standard output when None)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    sink = out if out is not None else sys.stdout.buffer
    if isinstance(frame, RecordTable):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(frame.arrow(), buf)
            sink.write(buf.getvalue())
            return
        if fmt in TEXT_FORMATS:
            for block in text_blocks(frame, fmt):
                sink.write(block)
            sink.flush()
            return
        frame = frame.frame()
    if fmt == "parquet":
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        sink.write(buf.getvalue())
        return
    if fmt == "json":
        text = _iso_times(frame).to_json(orient="records") + "\n"
    elif fmt == "csv":
        flat = _iso_times(frame)  # as date_format="%Y-%m-%dT%H:%M:%S.%fZ" would, faster
        if "observed_at" in flat:
            flat = flat.assign(observed_at=flat["observed_at"].map(";".join))
        text = flat.to_csv(index=False)
    else:
        text = _table(frame)
    sink.write(text.encode())
    sink.flush()
