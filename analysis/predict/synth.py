"""Synthetic host-pair traffic: the ground truth the forecaster is tested against.

Each series is what a datacenter simulator produces for one directed host pair, per bin:

    level · growth^(t/week) · daily(hour) · weekly(day) · noise · burst

- ``level``: lognormal across pairs (a few heavy pairs, many light ones);
- ``daily``: a business-hours bump (peak mid-afternoon) over a night floor, plus, for some
  pairs, a nightly backup window (02:00–04:00) several times the day's level;
- ``weekly``: weekends at 35–80 % of weekdays;
- ``growth``: −2 … +6 % per week;
- ``noise``: multiplicative lognormal, σ 0.08–0.25 per pair;
- ``burst``: rare (≈1 % of bins) spikes of 2–6× lasting 1–3 bins.

Seeded (``seed`` argument); the start time is an argument too (a Monday 00:00 UTC by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd

__all__ = ["SynthConfig", "synth_series"]

DAY_NS: Final = 86_400 * 10**9
_MONDAY: Final = 1_767_571_200 * 10**9
"""2026-01-05 00:00 UTC, a Monday."""


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """What to generate."""

    pairs: int = 12
    """Number of host-pair series."""
    weeks: float = 6.0
    """Length of each series."""
    bin_s: int = 3600
    """Bin width; must divide a day."""
    start_ns: int = _MONDAY
    """Start of the first bin."""
    burst_rate: float = 0.01
    """Probability that a bin starts a burst."""


def _pair_names(n: int) -> list[str]:
    hosts = max(2, int(np.ceil((1 + np.sqrt(1 + 4 * n)) / 2)))
    names = [f"hv{a:02d}->hv{b:02d}" for a in range(1, hosts + 1) for b in range(1, hosts + 1)]
    return [x for x in names if x[:4] != x[6:]][:n]


def synth_series(config: SynthConfig = SynthConfig(), *, seed: int) -> pd.DataFrame:
    """Bytes per bin: index ``bin_ns`` (int64), one float column per pair (``hvAA->hvBB``)."""
    if DAY_NS % (config.bin_s * 10**9):
        raise ValueError(f"bin of {config.bin_s} s does not divide a day")
    rng = np.random.default_rng(seed)
    bin_ns = config.bin_s * 10**9
    per_day = DAY_NS // bin_ns
    n = int(config.weeks * 7 * per_day)
    t = np.arange(n)
    hour = (t % per_day) * 24.0 / per_day
    day = (t // per_day) % 7  # 0 = Monday
    names = _pair_names(config.pairs)
    columns: dict[str, np.ndarray] = {}
    for name in names:
        level = rng.lognormal(mean=np.log(2e8), sigma=1.0)
        peak = rng.uniform(12.0, 16.0)
        amplitude = rng.uniform(0.8, 3.0)
        daily = 1.0 + amplitude * np.exp(-0.5 * ((hour - peak) / rng.uniform(2.5, 4.0)) ** 2)
        if rng.random() < 0.4:
            daily = daily + rng.uniform(2.0, 5.0) * ((hour >= 2.0) & (hour < 4.0))
        weekend = rng.uniform(0.35, 0.8)
        weekly = np.where(day >= 5, weekend, 1.0) * np.where(day == 0, rng.uniform(0.9, 1.1), 1.0)
        growth = (1.0 + rng.uniform(-0.02, 0.06)) ** (t / (7.0 * per_day))
        noise = rng.lognormal(0.0, rng.uniform(0.08, 0.25), size=n)
        burst = np.ones(n)
        starts = np.flatnonzero(rng.random(n) < config.burst_rate)
        for s in starts.tolist():
            burst[s : s + int(rng.integers(1, 4))] *= rng.uniform(2.0, 6.0)
        columns[name] = level * growth * daily * weekly * noise * burst
    index = pd.Index(config.start_ns + t.astype(np.int64) * bin_ns, name="bin_ns")
    return pd.DataFrame(columns, index=index)
