"""Forecasts of host-pair and host-uplink traffic for the next K bins, with prediction
intervals, and a rolling-origin backtest against naive baselines.

Method: a **robust seasonal profile model in log space**, fitted to all series at once::

    log1p(x_t) = a + b·t + daily[hour of day] + weekly[day of week] + hourweek[hour of week] + e_t

- ``daily`` and ``weekly`` are medians of the detrended values per slot (centred); the
  ``hourweek`` interaction is the median of what is left per hour-of-week slot, shrunk
  towards 0 by its empirical-Bayes signal share (what stands out of the noise of a median
  of a few weeks), so one odd week does not become a rule;
- each of the three profiles is partially pooled across the series fitted together, with
  an empirical-Bayes weight (``_pool``): host pairs that share the datacenter's rhythm
  estimate it together, with far less noise than one short series alone;
- the trend ``a + b·t`` is a least-squares line through the deseasonalised values, refitted
  once without the points more than 3 robust standard deviations away (bursts);
- the three steps are backfitted three times;
- intervals are the empirical quantiles of the in-sample residuals ``e_t`` (log space, so
  they are multiplicative and asymmetric, like traffic), widened by ``sqrt(n/(n-p))`` for
  the ``p`` parameters fitted.

Why not ETS/STL (statsmodels): traffic series are many, short (weeks) and bursty, with two
seasonal periods (24 and 168 hourly bins). Holt-Winters handles one period and is pulled
by bursts; STL needs one fit per series and per period. Medians per slot are robust to
bursts by construction, work on every series at once as one ``groupby``, need no extra
dependency, and the log scale turns "weekends are 40 % lower" into an additive term. The
backtest (``docs/prediction.md``) shows the gain over seasonal-naive.

Series are wide frames: index ``bin_ns`` (bin starts, ns since the epoch, one regular step),
one column per series; the bin must divide a day.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from vspan.analysis.records.matrix import pair_class

__all__ = [
    "Backtest",
    "ForecastConfig",
    "backtest",
    "baseline",
    "fit_forecast",
    "host_pair_series",
    "uplink_series",
]

F64 = npt.NDArray[np.float64]
_MIN_POOL: Final = 3
"""Series needed to pool seasonal profiles across series."""
DAY_NS: Final = 86_400 * 10**9
_MONDAY_OFFSET: Final = 3
"""Day 0 of the epoch was a Thursday: ``(days + 3) % 7`` is 0 on Mondays."""


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    """How to fit."""

    level: float = 0.8
    """Coverage of the prediction interval."""
    window_weeks: float = 8.0
    """History used (the most recent weeks)."""
    iterations: int = 3
    """Backfitting rounds."""
    trend: bool = True
    """Fit a linear trend (in log space)."""


@dataclass(frozen=True, slots=True)
class _Calendar:
    hod: npt.NDArray[np.int64]
    dow: npt.NDArray[np.int64]
    how: npt.NDArray[np.int64]


def _calendar(bin_ns: npt.NDArray[np.int64], step: int) -> _Calendar:
    if step <= 0 or DAY_NS % step:
        raise ValueError(f"bin of {step / 1e9:g} s does not divide a day")
    hod = (bin_ns % DAY_NS) // step
    dow = (bin_ns // DAY_NS + _MONDAY_OFFSET) % 7
    return _Calendar(hod, dow, dow * (DAY_NS // step) + hod)


def _step(index: pd.Index) -> int:
    values = index.to_numpy(dtype=np.int64)
    if len(values) < 2:
        raise ValueError("a series needs at least two bins")
    steps = np.unique(np.diff(values))
    if len(steps) != 1:
        raise ValueError("series bins must be regular (reindex missing bins to 0)")
    return int(steps[0])


def _slot_median(r: F64, slot: npt.NDArray[np.int64], size: int) -> tuple[F64, F64]:
    """Median of ``r`` (n×S) per slot value → (size×S), partially pooled across the series
    (``_pool``), and the noise variance of each slot median (size×S).

    A median of ``k`` noisy values varies by about ``(π/2)·σ²/k`` around the truth (``σ``
    from the deviations within slots, robustly)."""
    med = pd.DataFrame(r).groupby(slot).median()
    own = np.zeros((size, r.shape[1]))
    own[med.index.to_numpy()] = med.to_numpy()
    count = np.bincount(slot, minlength=size).astype(np.float64)
    sigma = 1.4826 * np.median(np.abs(r - own[slot]), axis=0)
    noise = (np.pi / 2.0) * sigma[None, :] ** 2 / np.maximum(count, 1.0)[:, None]
    return _pool(own, noise), noise


def _pool(own: F64, noise: F64) -> F64:
    """Each series' slot profile (size×S) shrunk towards the median profile of all series.

    Empirical Bayes: the spread of the series' profiles around the common one beyond the
    estimation ``noise`` is real; the weight of the own profile is ``real / (real +
    noise)``. Series that share a rhythm (host pairs of one datacenter) borrow strength
    from each other, a series with a rhythm of its own keeps it. Needs three series.
    """
    if own.shape[1] < _MIN_POOL:
        return own
    common = np.median(own, axis=1, keepdims=True)
    weight = _signal_share(((own - common) ** 2).mean(axis=0), noise.mean(axis=0))
    pooled: F64 = weight * own + (1.0 - weight) * common
    return pooled


def _signal_share(spread: F64, noise: F64) -> F64:
    """``real / (real + noise)`` with ``real = max(spread - noise, 0)`` (1 without noise)."""
    real = np.maximum(spread - noise, 0.0)
    total = real + noise
    share: F64 = np.divide(real, total, out=np.ones_like(total), where=total > 0)
    return share


def _line(z: F64, t: F64, keep: npt.NDArray[np.bool_]) -> tuple[F64, F64]:
    """Least-squares ``a + b·t`` per column over the rows where ``keep``."""
    w = keep.astype(np.float64)
    n = np.maximum(w.sum(axis=0), 1.0)
    tm = (w * t[:, None]).sum(axis=0) / n
    zm = (w * z).sum(axis=0) / n
    dt = (t[:, None] - tm) * w
    var = (dt * (t[:, None] - tm)).sum(axis=0)
    b = np.where(var > 0, (dt * (z - zm)).sum(axis=0) / np.where(var > 0, var, 1.0), 0.0)
    return zm - b * tm, b


def _shrink_slope(
    z: F64, t: F64, keep: npt.NDArray[np.bool_], line: tuple[F64, F64]
) -> tuple[F64, F64]:
    """The line with its slope shrunk by ``b² / (b² + var(b))``: a slope within its own
    noise (no real growth) goes to 0, a clear one stays; the line keeps its mean."""
    a, b = line
    w = keep.astype(np.float64)
    n = np.maximum(w.sum(axis=0), 3.0)
    tm = (w * t[:, None]).sum(axis=0) / n
    e = (z - a - b * t[:, None]) * w
    var_e = (e**2).sum(axis=0) / (n - 2.0)
    sxx = (w * (t[:, None] - tm) ** 2).sum(axis=0)
    var_b = np.divide(var_e, sxx, out=np.zeros_like(var_e), where=sxx > 0)
    den = b**2 + var_b
    shrunk = b * np.divide(b**2, den, out=np.zeros_like(den), where=den > 0)
    return a + (b - shrunk) * tm, shrunk


@dataclass(frozen=True, slots=True)
class _Fit:
    a: F64
    b: F64
    daily: F64
    weekly: F64
    hourweek: F64
    resid: F64
    params: float


def _fit(y: F64, t: F64, cal: _Calendar, per_day: int, config: ForecastConfig) -> _Fit:
    s_count = y.shape[1]
    a, b = np.median(y, axis=0), np.zeros(s_count)
    daily, weekly = np.zeros((per_day, s_count)), np.zeros((7, s_count))
    hourweek = np.zeros((7 * per_day, s_count))
    share = np.zeros((7 * per_day, s_count))
    for _ in range(max(1, config.iterations)):
        r = y - a - b * t[:, None]
        daily, _ = _slot_median(r, cal.hod, per_day)
        daily -= daily.mean(axis=0)
        weekly, _ = _slot_median(r - daily[cal.hod], cal.dow, 7)
        weekly -= weekly.mean(axis=0)
        inter, noise = _slot_median(r - daily[cal.hod] - weekly[cal.dow], cal.how, 7 * per_day)
        # The interaction only where it stands out of its noise (empirical Bayes towards 0).
        share = _signal_share((inter**2).mean(axis=0)[None, :], noise)
        hourweek = inter * share
        seasonal = daily[cal.hod] + weekly[cal.dow] + hourweek[cal.how]
        z = y - seasonal
        if not config.trend:
            a, b = np.median(z, axis=0), np.zeros(s_count)
            continue
        a, b = _line(z, t, np.ones_like(z, dtype=np.bool_))
        e = z - a - b * t[:, None]
        mad = 1.4826 * np.median(np.abs(e - np.median(e, axis=0)), axis=0)
        keep = np.abs(e) <= 3.0 * np.maximum(mad, 1e-9)
        a, b = _line(z, t, keep)
        a, b = _shrink_slope(z, t, keep, (a, b))
    resid = y - a - b * t[:, None] - daily[cal.hod] - weekly[cal.dow] - hourweek[cal.how]
    # Effective parameters: a shrunk interaction slot counts by the share it keeps.
    params = per_day + 7 + (2 if config.trend else 1) + float(share.mean(axis=1).sum())
    return _Fit(a, b, daily, weekly, hourweek, resid, params)


def fit_forecast(
    history: pd.DataFrame, *, horizon: int, config: ForecastConfig = ForecastConfig()
) -> pd.DataFrame:
    """Forecast every column of ``history`` for the ``horizon`` bins after its last one.

    Returns a long frame: ``series``, ``bin_ns``, ``forecast`` (the median), ``lower`` and
    ``upper`` (the ``config.level`` prediction interval); values are never negative."""
    step = _step(history.index)
    per_day = DAY_NS // step
    window = int(config.window_weeks * 7 * per_day)
    hist = history.iloc[-window:] if window > 0 else history
    bins = hist.index.to_numpy(dtype=np.int64)
    y = np.log1p(np.clip(hist.to_numpy(dtype=np.float64), 0.0, None))
    t = np.arange(len(bins), dtype=np.float64)
    fit = _fit(y, t, _calendar(bins, step), per_day, config)
    future = bins[-1] + step * np.arange(1, horizon + 1, dtype=np.int64)
    fcal = _calendar(future, step)
    tf = np.arange(len(bins), len(bins) + horizon, dtype=np.float64)
    mu = fit.a + fit.b * tf[:, None] + fit.daily[fcal.hod] + fit.weekly[fcal.dow]
    mu = mu + fit.hourweek[fcal.how]
    n = len(bins)
    widen = np.sqrt(n / max(n - fit.params, 1))
    tail = (1.0 - config.level) / 2.0
    lo = np.quantile(fit.resid, tail, axis=0) * widen
    hi = np.quantile(fit.resid, 1.0 - tail, axis=0) * widen
    series = list(history.columns)
    return pd.DataFrame(
        {
            "series": np.repeat(np.asarray(series, dtype=object), horizon),
            "bin_ns": np.tile(future, len(series)),
            "forecast": np.expm1(mu).clip(0.0).T.ravel(),
            "lower": np.expm1(mu + lo).clip(0.0).T.ravel(),
            "upper": np.expm1(mu + hi).clip(0.0).T.ravel(),
        }
    )


def baseline(history: pd.DataFrame, *, horizon: int, method: str) -> F64:
    """Naive forecasts (horizon×S): ``weekly``/``daily`` (same bin a week / a day earlier,
    repeated) or ``last`` (the last value)."""
    x = history.to_numpy(dtype=np.float64)
    if method == "last":
        return np.repeat(x[-1:], horizon, axis=0)
    per_day = DAY_NS // _step(history.index)
    period = {"weekly": 7 * per_day, "daily": per_day}[method]
    h = np.arange(horizon)
    return x[len(x) - period + (h % period)]


def _smape(f: F64, a: F64) -> F64:
    den = np.abs(f) + np.abs(a)
    return np.where(den > 0, 2.0 * np.abs(f - a) / np.where(den > 0, den, 1.0), 0.0)


@dataclass(frozen=True, slots=True)
class Backtest:
    """A rolling-origin backtest."""

    scores: pd.DataFrame
    """Per method (``model``, ``seasonal-naive-weekly``, ``seasonal-naive-daily``,
    ``last-value``): ``smape`` (%), ``mase``, ``coverage`` (% of outcomes inside the
    interval; NaN for baselines), ``points``."""
    origins: tuple[int, ...]
    """The bin starts the forecasts were made at (first forecast bin)."""

    def score(self, method: str, metric: str) -> float:
        """One number of ``scores``."""
        row = self.scores.index[self.scores["method"] == method]
        return float(self.scores.loc[row, metric].to_numpy(dtype=np.float64)[0])


def backtest(
    series: pd.DataFrame,
    *,
    horizon: int = 24,
    origins: int = 14,
    step: int | None = None,
    min_train_days: float = 14.0,
    config: ForecastConfig = ForecastConfig(),
) -> Backtest:
    """Forecast from ``origins`` points spaced ``step`` bins (default a day) back from the
    end, each time from the history before the origin only, and score the next ``horizon``
    bins. MASE scales by the weekly seasonal-naive in-sample error of each history."""
    bin_step = _step(series.index)
    per_day = int(DAY_NS // bin_step)
    stride = step or per_day
    x = series.to_numpy(dtype=np.float64)
    n = len(x)
    cuts = [n - horizon - k * stride for k in range(origins)]
    cuts = sorted(c for c in cuts if c >= int(min_train_days * per_day))
    if not cuts:
        raise ValueError(f"series of {n} bins too short for a backtest with {min_train_days} days")
    acc: dict[str, list[F64]] = {}
    covered: list[F64] = []
    for cut in cuts:
        hist, actual = series.iloc[:cut], x[cut : cut + horizon]
        fc = fit_forecast(hist, horizon=horizon, config=config)
        shape = (len(series.columns), horizon)
        point = fc["forecast"].to_numpy().reshape(shape).T
        lower = fc["lower"].to_numpy().reshape(shape).T
        upper = fc["upper"].to_numpy().reshape(shape).T
        covered.append(((actual >= lower) & (actual <= upper)).astype(np.float64))
        h = x[:cut]
        week = 7 * per_day
        scale = np.mean(np.abs(h[week:] - h[:-week]), axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        methods = {
            "model": point,
            "seasonal-naive-weekly": baseline(hist, horizon=horizon, method="weekly"),
            "seasonal-naive-daily": baseline(hist, horizon=horizon, method="daily"),
            "last-value": baseline(hist, horizon=horizon, method="last"),
        }
        for name, f in methods.items():
            acc.setdefault(name + ":smape", []).append(_smape(f, actual))
            acc.setdefault(name + ":mase", []).append(np.abs(f - actual) / scale)
    rows = []
    for name in ("model", "seasonal-naive-weekly", "seasonal-naive-daily", "last-value"):
        smape = np.concatenate([v.ravel() for v in acc[name + ":smape"]])
        mase = np.concatenate([v.ravel() for v in acc[name + ":mase"]])
        cov = np.concatenate([c.ravel() for c in covered]) if name == "model" else None
        rows.append(
            {
                "method": name,
                "smape": 100.0 * float(smape.mean()),
                "mase": float(mase.mean()),
                "coverage": np.nan if cov is None else 100.0 * float(cov.mean()),
                "points": len(smape),
            }
        )
    first = series.index.to_numpy(dtype=np.int64)
    return Backtest(pd.DataFrame(rows), tuple(int(first[c]) for c in cuts))


def _wide(long: pd.DataFrame, key: pd.Series, value: str, step: int) -> pd.DataFrame:
    table = long.assign(series=key).pivot_table(
        index="bin_ns", columns="series", values=value, aggfunc="sum", fill_value=0.0
    )
    if table.empty:
        return table
    bins = table.index.to_numpy(dtype=np.int64)
    full = pd.Index(np.arange(bins.min(), bins.max() + step, step, dtype=np.int64), name="bin_ns")
    out = table.reindex(full, fill_value=0.0).astype(np.float64)
    out.columns = pd.Index([str(c) for c in out.columns], name=None)
    return out


def host_pair_series(hosts: pd.DataFrame, bin_s: float = 3600) -> pd.DataFrame:
    """Wide bytes per bin of each cross-host directed host pair (``A->B``) of a host matrix;
    missing bins are 0."""
    wire = hosts[pair_class(hosts["src"], hosts["dst"]) == "cross-host"]
    return _wide(wire, wire["src"] + "->" + wire["dst"], "bytes", int(bin_s * 1e9))


def uplink_series(uplinks: pd.DataFrame, bin_s: float = 3600) -> pd.DataFrame:
    """Wide bytes per bin of each host's uplink (``HOST:out``, ``HOST:in``)."""
    long = pd.concat(
        [
            uplinks.assign(key=uplinks["host"] + ":out", value=uplinks["bytes_out"]),
            uplinks.assign(key=uplinks["host"] + ":in", value=uplinks["bytes_in"]),
        ],
        ignore_index=True,
    )
    return _wide(long, long["key"], "value", int(bin_s * 1e9))
