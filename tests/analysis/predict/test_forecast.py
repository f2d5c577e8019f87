"""Forecasts on the synthetic ground truth: the accuracy targets of the prediction issue.

The baselines and metrics are recomputed here from their definitions, independently of
``analysis/predict/forecast.py``, and the measured numbers are printed (``pytest -s``) for
``docs/prediction.md``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vspan.analysis.predict.forecast import backtest, fit_forecast, host_pair_series, uplink_series
from vspan.analysis.predict.synth import SynthConfig, synth_series
from vspan.analysis.records.matrix import host_matrix, uplink_load

HORIZON = 24
WEEK = 168
SEED = 20261124


@pytest.fixture(scope="module")
def series() -> pd.DataFrame:
    return synth_series(SynthConfig(pairs=12, weeks=6), seed=SEED)


def _smape(f: np.ndarray, a: np.ndarray) -> float:
    den = np.abs(f) + np.abs(a)
    return float(np.mean(np.where(den > 0, 2 * np.abs(f - a) / np.where(den > 0, den, 1), 0)))


def test_accuracy_targets_on_synthetic_traffic(series: pd.DataFrame) -> None:
    x = series.to_numpy()
    n = len(x)
    cuts = [n - HORIZON - 24 * k for k in range(14)]
    model_err, naive_err, last_err, inside, total = [], [], [], 0, 0
    for cut in cuts:
        fc = fit_forecast(series.iloc[:cut], horizon=HORIZON)
        for name in series.columns:
            one = fc[fc["series"] == name]
            actual = x[cut : cut + HORIZON, series.columns.get_loc(name)]
            hist = x[:cut, series.columns.get_loc(name)]
            model_err.append((one["forecast"].to_numpy(), actual))
            naive_err.append((hist[cut - WEEK : cut - WEEK + HORIZON], actual))
            last_err.append((np.full(HORIZON, hist[-1]), actual))
            inside += int(((actual >= one["lower"]) & (actual <= one["upper"])).sum())
            total += HORIZON

    def score(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
        return 100 * _smape(
            np.concatenate([f for f, _ in pairs]), np.concatenate([a for _, a in pairs])
        )

    model, naive, last = score(model_err), score(naive_err), score(last_err)
    coverage = 100 * inside / total
    print(
        f"\nsMAPE model {model:.2f} %, seasonal-naive (week) {naive:.2f} %, last value"
        f" {last:.2f} %; gain over seasonal-naive {100 * (1 - model / naive):.1f} %;"
        f" 80 % interval coverage {coverage:.1f} %"
    )
    assert model <= 0.8 * naive
    assert model < last
    assert 75.0 <= coverage <= 85.0


def test_backtest_agrees_with_independent_scoring(series: pd.DataFrame) -> None:
    bt = backtest(series, horizon=HORIZON, origins=14)
    print("\n" + bt.scores.to_string(index=False))
    x = series.to_numpy()
    cut = len(x) - HORIZON
    naive = x[cut - WEEK : cut - WEEK + HORIZON]
    assert len(bt.origins) == 14
    assert bt.score("model", "smape") <= 0.8 * bt.score("seasonal-naive-weekly", "smape")
    assert 75.0 <= bt.score("model", "coverage") <= 85.0
    assert bt.score("model", "mase") < bt.score("seasonal-naive-weekly", "mase")
    assert bt.score("seasonal-naive-weekly", "points") == 14 * HORIZON * series.shape[1]
    assert np.isfinite(naive).all()


def test_intervals_hold_the_forecast_and_are_positive(series: pd.DataFrame) -> None:
    fc = fit_forecast(series, horizon=HORIZON)
    assert len(fc) == HORIZON * series.shape[1]
    assert (fc["lower"] <= fc["forecast"]).all()
    assert (fc["forecast"] <= fc["upper"]).all()
    assert (fc["lower"] >= 0).all()
    step = int(series.index[1] - series.index[0])
    assert fc["bin_ns"].iloc[0] == series.index[-1] + step


def test_bin_must_divide_a_day() -> None:
    index = pd.Index(np.arange(10, dtype=np.int64) * 7 * 10**9 * 1000, name="bin_ns")
    with pytest.raises(ValueError, match="does not divide a day"):
        fit_forecast(pd.DataFrame({"a": np.ones(10)}, index=index), horizon=2)


def test_series_from_flows() -> None:
    hour = 3600 * 10**9
    flows = pd.DataFrame(
        {
            "src_host": ["hv1", "hv1"], "dst_host": ["hv2", "hv1"], "packets": [1, 1],
            "bytes": [100, 50], "packets_rev": [1, 0], "bytes_rev": [10, 0],
            "first_ns": [0, 0], "last_ns": [0, 3 * hour],
        }
    )  # fmt: skip
    flows["src_vm"], flows["dst_vm"] = ["a", "a"], ["b", "c"]
    hosts = host_matrix(flows)
    pairs = host_pair_series(hosts)
    assert list(pairs.columns) == ["hv1->hv2", "hv2->hv1"]
    assert pairs["hv1->hv2"].tolist() == [100.0]
    uplinks = uplink_series(uplink_load(hosts))
    assert uplinks.loc[0, "hv1:out"] == 100.0
    assert uplinks.loc[0, "hv1:in"] == 10.0
