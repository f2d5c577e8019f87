"""``/api/v1/predictions`` over real HTTP (uvicorn on 127.0.0.1) on three weeks of stored
hourly flows (``vspan_testing.hourly``). Expectations are sums over the stored flow records
in plain Python — measured series, VM-pair means, host-pair deltas, cross-host savings —
never calls into the code under test."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest

from vspan_testing.hourly import HOSTS, HOUR, PLACEMENT, HourlyServed, serve_hourly

OUT = "(external)"
FORECAST = "/api/v1/predictions/forecast"
WHATIF = "/api/v1/predictions/whatif"
PLACE = "/api/v1/predictions/placement"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HourlyServed]:
    with serve_hourly(tmp_path_factory.mktemp("predictions")) as served:
        yield served


def _directed(served: HourlyServed) -> list[tuple[int, str, str, str, str, float]]:
    """(hour start s, src VM, dst VM, src host, dst host, bytes) both ways of every flow."""
    out = []
    for r in served.data.flows.to_dict("records"):
        t = int(r["first_ns"]) // HOUR * 3600
        sv, dv = r["src_vm"], r["dst_vm"] or OUT
        sh, dh = r["src_host"], r["dst_host"] or OUT
        out.append((t, sv, dv, sh, dh, float(r["bytes"])))
        out.append((t, dv, sv, dh, sh, float(r["bytes_rev"])))
    return out


def _series(doc: dict[str, Any]) -> dict[str, dict[int, float]]:
    return {s["name"]: {p["time"]: p["value"] for p in s["measured"]} for s in doc["series"]}


def test_forecast_measures_every_cross_host_pair_and_bands_the_next_day(
    served: HourlyServed,
) -> None:
    want: dict[str, Counter[int]] = defaultdict(Counter)
    for t, _, _, sh, dh, b in _directed(served):
        if OUT not in (sh, dh) and sh != dh:
            want[f"{sh}->{dh}"][t] += b
    doc = served.get(f"{FORECAST}?level=host-pair&bin=3600&horizon=24")
    assert (doc["level"], doc["bin"], doc["horizon"], doc["interval"]) == (
        "host-pair",
        3600,
        24,
        0.8,
    )
    got = _series(doc)
    assert sorted(got) == sorted(want)
    for name, values in got.items():
        assert {t: v for t, v in values.items() if v} == dict(want[name]), name
    for s in doc["series"]:
        times = [b["time"] for b in s["forecast"]]
        last = s["measured"][-1]["time"]
        assert times == [last + 3600 * k for k in range(1, 25)]
        for band in s["forecast"]:
            assert 0 <= band["lower"] <= band["forecast"] <= band["upper"]
            # the same hour of the week in the three measured weeks
            same = [got[s["name"]].get(band["time"] - 7 * 86400 * w, 0.0) for w in (1, 2, 3)]
            assert band["forecast"] == pytest.approx(sum(same) / 3, rel=0.25), s["name"]


def test_forecast_of_a_held_out_day_is_close_and_covered(served: HourlyServed) -> None:
    full = _series(served.get(f"{FORECAST}?horizon=1"))
    last_day = max(max(v) for v in full.values()) - 23 * 3600
    doc = served.get(f"{FORECAST}?horizon=24&until={last_day}")
    inside, errors = [], []
    for s in doc["series"]:
        assert max(p["time"] for p in s["measured"]) < last_day
        for band in s["forecast"]:
            actual = full[s["name"]][band["time"]]
            inside.append(band["lower"] <= actual <= band["upper"])
            errors.append(2 * abs(band["forecast"] - actual) / (band["forecast"] + actual))
    assert len(inside) == 24 * len(full)
    assert 0.6 <= sum(inside) / len(inside) <= 0.97
    assert sum(errors) / len(errors) < 0.15  # sMAPE; the stored noise is lognormal σ 0.1


def test_forecast_of_uplinks_measures_what_leaves_and_enters_each_host(
    served: HourlyServed,
) -> None:
    want: dict[str, Counter[int]] = defaultdict(Counter)
    for t, _, _, sh, dh, b in _directed(served):
        if sh != dh:
            if sh != OUT:
                want[f"{sh}:out"][t] += b
            if dh != OUT:
                want[f"{dh}:in"][t] += b
    got = _series(served.get(f"{FORECAST}?level=uplink&horizon=2"))
    assert sorted(got) == sorted(want)
    for name, values in got.items():
        assert {t: v for t, v in values.items() if v} == dict(want[name]), name


def _recent_means(served: HourlyServed, recent: int) -> dict[tuple[str, str], float]:
    rows = _directed(served)
    last = max(t for t, *_ in rows)
    means: Counter[tuple[str, str]] = Counter()
    for t, sv, dv, _, _, b in rows:
        if t > last - recent * 3600:
            means[(sv, dv)] += b / recent
    return dict(means)


def _host_pairs(
    means: dict[tuple[str, str], float], where: dict[str, str]
) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for (a, b), v in means.items():
        out[(where.get(a, OUT), where.get(b, OUT))] += v
    return out


@pytest.mark.parametrize("recent", [24, 5])
def test_whatif_deltas_are_the_recent_vm_pair_means_moved(
    served: HourlyServed, recent: int
) -> None:
    moves = [{"vm": "web-01", "host": "hv02"}, {"vm": "app-02", "host": "hv04"}]
    doc = served.call("POST", WHATIF, {"moves": moves, "recent": recent})[1]
    means = _recent_means(served, recent)
    after = {**PLACEMENT, "web-01": "hv02", "app-02": "hv04"}
    before_hp, after_hp = _host_pairs(means, PLACEMENT), _host_pairs(means, after)
    rows = {(r["src"], r["dst"]): r for r in doc["host_pairs"]}
    assert set(rows) == set(before_hp) | set(after_hp)
    for key, r in rows.items():
        assert r["bytes_before"] == pytest.approx(before_hp[key]), key
        assert r["bytes_delta"] == pytest.approx(after_hp[key] - before_hp[key]), key
    # web-01 joins db-01 on hv02, leaving app-01 on hv01: hv01 -> hv02 loses exactly
    # web-01 -> db-01 and gains app-01 -> web-01
    assert rows[("hv01", "hv02")]["bytes_delta"] == pytest.approx(
        means[("app-01", "web-01")] - means[("web-01", "db-01")]
    )
    changes = {(r["src"], r["dst"]): (r["change"], r["bytes"]) for r in doc["vm_pairs"]}
    assert changes[("web-01", "db-01")] == (
        "to-intra-host",
        pytest.approx(means[("web-01", "db-01")]),
    )
    assert changes[("web-01", "app-01")][0] == "to-wire"
    assert changes[("app-02", "db-01")][0] == "rerouted"
    moved = {"web-01", "app-02"}
    assert set(changes) == {k for k in means if moved & set(k)}
    up = {r["host"]: r for r in doc["uplinks"]}
    for host in HOSTS:
        out_b = sum(v for (s, d), v in before_hp.items() if s == host != d)
        out_a = sum(v for (s, d), v in after_hp.items() if s == host != d)
        assert up.get(host, {"out_delta": 0.0})["out_delta"] == pytest.approx(out_a - out_b), host


@pytest.mark.parametrize(
    ("moves", "reason"),
    [
        ([{"vm": "nope-99", "host": "hv02"}], "moves[0].vm: unknown VM 'nope-99'"),
        (
            [{"vm": "web-01", "host": "hv02"}, {"vm": "db-01", "host": "hv09"}],
            "moves[1].host: unknown host 'hv09'; known: hv01, hv02, hv03, hv04",
        ),
    ],
)
def test_whatif_with_an_unknown_vm_or_host_is_a_404_naming_it(
    served: HourlyServed, moves: list[dict[str, str]], reason: str
) -> None:
    assert served.call("POST", WHATIF, {"moves": moves})[:2] == (404, {"detail": reason})


def _cross(means: dict[tuple[str, str], float], where: dict[str, str]) -> float:
    return sum(
        v for (a, b), v in means.items() if a in where and b in where and where[a] != where[b]
    )


def test_placement_moves_save_what_they_say_under_the_constraints(served: HourlyServed) -> None:
    doc = served.get(
        f"{PLACE}?max_vms_per_host=3&pin=db-01&anti_affinity=web-01,web-02&max_moves=5"
    )
    assert (doc["pinned"], doc["anti_affinity"]) == (["db-01"], [["web-01", "web-02"]])
    means = _recent_means(served, 24)
    where = dict(PLACEMENT)

    def feasible(vm: str, host: str) -> bool:
        others = [v for v, h in where.items() if h == host and v != vm]
        rival = {"web-01": "web-02", "web-02": "web-01"}.get(vm)
        return vm != "db-01" and where[vm] != host and len(others) < 3 and rival not in others

    assert doc["moves"]
    for step, move in enumerate(doc["moves"], start=1):
        before = _cross(means, where)
        best = max(before - _cross(means, {**where, v: h}) for v in where for h in HOSTS
                   if feasible(v, h))  # fmt: skip
        assert (move["step"], move["from_host"]) == (step, where[move["vm"]])
        assert feasible(move["vm"], move["to_host"])
        where[move["vm"]] = move["to_host"]
        assert move["cross_before"] == pytest.approx(before)
        assert move["cross_after"] == pytest.approx(_cross(means, where))
        assert move["saving"] == pytest.approx(best)
    assert all(a["cross_after"] == b["cross_before"] for a, b in pairwise(doc["moves"]))


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"{FORECAST}?bin=7000", "bin: a bin of 7000 s does not divide a day"),
        (f"{FORECAST}?bin=30", "bin"),
        (f"{FORECAST}?level=rack", "level"),
        (f"{FORECAST}?horizon=0", "horizon"),
        (f"{FORECAST}?since=soon", "since: cannot read 'soon' as a time"),
        (f"{PLACE}?anti_affinity=web-01", "anti_affinity: group 0 needs at least two VMs"),
        (f"{PLACE}?max_vms_per_host=0", "max_vms_per_host"),
    ],
)
def test_bad_parameters_are_422_with_the_reason(
    served: HourlyServed, path: str, field: str
) -> None:
    status, doc, _ = served.call("GET", path)
    assert status == 422
    assert field in json.dumps(doc["detail"])


@pytest.mark.parametrize(
    "body",
    [
        {"moves": []},
        {"moves": [{"vm": "web-01"}]},
        {"moves": [{"vm": "web-01", "host": "hv02"}], "bin": 7000},
    ],
)
def test_bad_whatif_bodies_are_422(served: HourlyServed, body: dict[str, Any]) -> None:
    assert served.call("POST", WHATIF, body)[0] == 422


def test_a_window_without_flows_gives_no_series_and_says_why(served: HourlyServed) -> None:
    doc = served.get(f"{FORECAST}?since=2030-01-01T00:00:00Z")
    assert (doc["series"], doc["note"]) == ([], "since: the store holds no flows in the window")


def test_routes_are_in_the_openapi_schema(served: HourlyServed) -> None:
    paths = served.get("/openapi.json")["paths"]
    assert "get" in paths[FORECAST]
    assert "post" in paths[WHATIF]
    assert "get" in paths[PLACE]
