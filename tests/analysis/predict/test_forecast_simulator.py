"""The forecast accuracy targets on the datacenter simulator's own ground truth.

``SimulatedDatacenter`` generates frames; its ``truth_matrix`` counts every packet once per
VM pair, host pair and bin. Weeks of 15-second windows (the default clock) are far too slow
to generate, so the clock is set so that **one window is one hourly bin** (``tick_s=1``,
``time_scale=3600``): the simulator's own model draws each hour's flows, bursts and frames
at the rhythm of that hour, and ``truth_bin_s=3600`` bins them. ``rate`` is then the frames
of the busiest hour on all ports; 30,000 (a sixth of the default clock's 180,000 per
simulated hour) keeps the module near 20 s. Live migrations are off: with one-hour windows
the default (one per 10 simulated minutes) would move a VM every hour.

The baselines and metrics are recomputed here from their definitions, independently of
``analysis/predict/forecast.py`` (as in ``test_forecast.py``); ``pytest -s`` prints the numbers for
``docs/prediction.md``.

Result: both targets hold. The simulator's hourly host-pair traffic at this rate is
dominated by the randomness of a few hundred heavy-tailed flows per pair and hour (sMAPE
around 50 % for any model); the gain over seasonal-naive comes from estimating the rhythm
with little noise: profiles pooled across the host pairs and an hour-of-week interaction
kept only where it stands out of its noise (``analysis/predict/forecast.py``). Seeds 1–4 give
gains of 20.5–21.1 % (18.2 % before the pooling) and coverage of 77–79 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.predict.forecast import backtest, fit_forecast
from vspan.collectors.simulator.datacenter import SimulatedDatacenter, SimulatorConfig

HORIZON = 24
WEEK = 168
WEEKS = 4
ORIGINS = 14
RATE = 30_000.0
SEED = 1
HOUR_NS = 3600 * 10**9


def simulated_series(*, rate: float = RATE, weeks: int = WEEKS, seed: int = SEED) -> pd.DataFrame:
    """Hourly bytes of every cross-host directed host pair (``hvAA->hvBB``) of the simulator's
    ground truth; bins without traffic are 0."""
    config = SimulatorConfig(
        seed=seed, rate=rate, tick_s=1.0, time_scale=3600.0, truth_bin_s=3600.0,
        migration_every_s=None,
    )  # fmt: skip
    dc = SimulatedDatacenter(config)
    bins = weeks * WEEK
    dc.window(bins - 1)
    truth = dc.truth_matrix()
    wire = truth[truth["scope"] == "cross-host"]
    wide = wire.assign(
        pair=wire["src_host"] + "->" + wire["dst_host"],
        bin_ns=wire["time"].astype("int64"),
    ).pivot_table(index="bin_ns", columns="pair", values="bytes", aggfunc="sum", fill_value=0)
    index = pd.Index(config.start_ns + np.arange(bins, dtype=np.int64) * HOUR_NS, name="bin_ns")
    out = wide.reindex(index, fill_value=0).astype(np.float64)
    out.columns = pd.Index([str(c) for c in out.columns])
    return out


@dataclass(frozen=True)
class Scores:
    model: float
    naive: float
    last: float
    coverage: float

    @property
    def gain(self) -> float:
        return 100.0 * (1.0 - self.model / self.naive)


def _smape(f: np.ndarray, a: np.ndarray) -> float:
    den = np.abs(f) + np.abs(a)
    return float(np.mean(np.where(den > 0, 2 * np.abs(f - a) / np.where(den > 0, den, 1), 0)))


@pytest.fixture(scope="module")
def series() -> pd.DataFrame:
    return simulated_series()


@pytest.fixture(scope="module")
def scores(series: pd.DataFrame) -> Scores:
    x = series.to_numpy()
    n = len(x)
    model, naive, last, actual = [], [], [], []
    inside = total = 0
    for cut in (n - HORIZON - 24 * k for k in range(ORIGINS)):
        fc = fit_forecast(series.iloc[:cut], horizon=HORIZON)
        for k, name in enumerate(series.columns):
            one = fc[fc["series"] == name]
            truth = x[cut : cut + HORIZON, k]
            model.append(one["forecast"].to_numpy())
            naive.append(x[cut - WEEK : cut - WEEK + HORIZON, k])
            last.append(np.full(HORIZON, x[cut - 1, k]))
            actual.append(truth)
            inside += int(((truth >= one["lower"]) & (truth <= one["upper"])).sum())
            total += HORIZON
    a = np.concatenate(actual)
    result = Scores(
        model=100 * _smape(np.concatenate(model), a),
        naive=100 * _smape(np.concatenate(naive), a),
        last=100 * _smape(np.concatenate(last), a),
        coverage=100 * inside / total,
    )
    print(
        f"\nsimulator truth, {series.shape[1]} host pairs x {WEEKS} weeks, rate {RATE:g}:"
        f" sMAPE model {result.model:.2f} %, seasonal-naive (week) {result.naive:.2f} %,"
        f" last value {result.last:.2f} %; gain {result.gain:.1f} %;"
        f" 80 % interval coverage {result.coverage:.1f} %"
    )
    return result


def test_the_truth_is_weeks_of_busy_cross_host_pairs(series: pd.DataFrame) -> None:
    assert series.shape == (WEEKS * WEEK, 12)  # 4 hosts: 12 directed pairs
    assert (series.to_numpy() > 0).mean() > 0.99
    hour = (series.index.to_numpy() // HOUR_NS) % 24
    weekday = ((series.index.to_numpy() // (24 * HOUR_NS)) + 3) % 7 < 5
    busy = series[(hour == 14) & weekday].to_numpy().mean()
    assert busy > 2 * series[(hour == 8) & ~weekday].to_numpy().mean()  # the daily rhythm


def test_interval_coverage_target_on_simulator_truth(scores: Scores) -> None:
    assert 75.0 <= scores.coverage <= 85.0


def test_model_beats_both_baselines_on_simulator_truth(scores: Scores) -> None:
    assert scores.model < scores.naive
    assert scores.model < scores.last


def test_smape_gain_target_on_simulator_truth(scores: Scores) -> None:
    assert scores.model <= 0.8 * scores.naive


def test_backtest_scores_as_the_independent_scoring(series: pd.DataFrame, scores: Scores) -> None:
    bt = backtest(series, horizon=HORIZON, origins=ORIGINS)
    assert bt.score("model", "smape") == pytest.approx(scores.model)
    assert bt.score("seasonal-naive-weekly", "smape") == pytest.approx(scores.naive)
    assert bt.score("last-value", "smape") == pytest.approx(scores.last)
    assert bt.score("model", "coverage") == pytest.approx(scores.coverage)
