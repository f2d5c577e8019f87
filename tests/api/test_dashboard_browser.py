"""The dashboard in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright): it loads without console errors, its charts carry the numbers the API returns,
its "download pcap" button produces a file tshark reads, and its prediction panel draws the
API's forecast band and shows the deltas its what-if form gets back. Screenshots go to
``docs/screenshots/`` (with ``VSPAN_UPDATE_SCREENSHOTS=1``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vspan_testing.hourly import serve_hourly
from vspan_testing.served import Served, serve_views

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
"""Where ``VSPAN_UPDATE_SCREENSHOTS=1`` puts the screenshots; otherwise a temporary folder
takes them, so that running the tests never changes the source tree."""
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
    ),
    pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_views(tmp_path_factory.mktemp("dashboard")) as served:
        # a collector's heartbeat, as a collector posts it: losses apart from frames left
        # out on purpose (the panel once summed both as "capture drops")
        cid = served.get("/api/v1/collectors")["collectors"][0]["collector_id"]
        beat = {"time": served.source.clock() - 5, "frames": 1000, "exported": 897,
                "drops": {"kernel": 2, "runts": 1, "queue_full": 0},
                "not_mirrored": {"duplicates": 60, "unselected": 40}}  # fmt: skip
        status, doc, _ = served.call("POST", f"/api/v1/control/collectors/{cid}/heartbeat", beat)
        assert status == 200, doc
        yield served


@pytest.fixture(scope="module")
def page(served: Served) -> Iterator[tuple[Any, list[str]]]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                          accept_downloads=True)  # fmt: skip
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{served.url}/?poll=700&vm=web-01&bin=1")
            page.wait_for_function(
                "Number(document.querySelector('#status').dataset.polls) >= 2", timeout=20_000
            )
            yield page, errors
        finally:
            browser.close()


def test_loads_without_console_errors_and_polls(
    page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    shot_dir = tmp_path
    p, errors = page
    assert p.title() == "vspan — traffic visibility"
    assert errors == []
    assert p.locator("#status").get_attribute("class") != "error"
    shots = DOCS_SCREENSHOTS if os.environ.get("VSPAN_UPDATE_SCREENSHOTS") else shot_dir
    shots.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(shots / "dashboard.png"), full_page=True)
    p.locator("#vm").screenshot(path=str(shots / "dashboard-vm.png"))
    assert (shots / "dashboard.png").stat().st_size > 10_000


def test_host_charts_carry_the_apis_numbers(served: Served, page: tuple[Any, list[str]]) -> None:
    p, _ = page
    hosts = served.get("/api/v1/hosts")["hosts"]
    charts = p.eval_on_selector_all(
        "#host-charts .chart",
        "els => els.map(e => [e.dataset.host, Number(e.dataset.intra), Number(e.dataset.cross)])",
    )
    assert charts == [[h["name"], h["intra_bytes"], h["cross_bytes"]] for h in hosts]
    rects = p.eval_on_selector_all(
        "#host-charts .chart rect",
        "els => els.map(e => [e.closest('.chart').dataset.host, e.dataset.kind,"
        " Number(e.dataset.value)])",
    )
    sums: Counter[tuple[str, str]] = Counter()
    for host, kind, value in rects:
        sums[(host, kind)] += value
    for h in hosts:
        assert (sums[(h["name"], "intra")], sums[(h["name"], "cross")]) == (
            h["intra_bytes"], h["cross_bytes"],
        )  # fmt: skip
    table = p.eval_on_selector_all(
        "#host-table tbody tr", "els => els.map(e => [...e.cells].map(c => c.textContent))"
    )
    assert table == [
        [h["name"], *(str(h[k]) for k in ("vms", "flows", "intra_bytes", "cross_bytes", "bytes"))]
        for h in hosts
    ]


def test_top_bars_and_heat_map_match_the_api(served: Served, page: tuple[Any, list[str]]) -> None:
    p, _ = page
    top_vms = served.get("/api/v1/top?by=vm&limit=10")["top"]
    bars = p.eval_on_selector_all(
        "#top-vms .row", "els => els.map(e => [e.dataset.name, Number(e.dataset.value)])"
    )
    assert bars == [[r["name"], r["bytes"]] for r in top_vms]
    pairs = served.get("/api/v1/top?by=vm-pair&limit=10")["top"]
    bars = p.eval_on_selector_all("#top-pairs .row", "els => els.map(e => Number(e.dataset.value))")
    assert bars == [r["bytes"] for r in pairs]
    want: Counter[tuple[str, str]] = Counter()
    for c in served.get("/api/v1/matrix?level=host&bin=1")["cells"]:
        want[(c["src"], c["dst"])] += c["bytes"]
    cells = p.eval_on_selector_all(
        "#matrix rect.cell",
        "els => els.map(e => [e.dataset.src, e.dataset.dst, Number(e.dataset.bytes)])",
    )
    assert {(s, d): b for s, d, b in cells} == dict(want)


def test_vm_page_collectors_and_violations(served: Served, page: tuple[Any, list[str]]) -> None:
    p, _ = page
    vm = served.get("/api/v1/vms/web-01")
    assert p.locator("#vm-summary").get_attribute("data-bytes") == str(vm["traffic"]["bytes"])
    assert p.locator("#vm-flows tbody tr").count() == len(vm["flows"])
    rules = p.eval_on_selector_all("#vm-hits tbody tr", "els => els.map(e => e.dataset.rule)")
    assert rules == [h["rule"] for h in vm["policy_hits"]]
    assert p.locator("#vm-migrations tbody tr").count() == len(vm["migrations"])
    collectors = served.get("/api/v1/collectors")["collectors"]
    shown = p.eval_on_selector_all(
        "#collectors tbody tr", "els => els.map(e => [Number(e.dataset.collector),"
        " Number(e.dataset.loss)])",
    )  # fmt: skip
    assert shown == [[c["collector_id"], c["loss"]] for c in collectors]
    assert any(loss > 0 for _, loss in shown)
    capture = p.eval_on_selector_all(
        "#collectors tbody tr", "els => els.map(e => [Number(e.dataset.collector),"
        " e.dataset.captureDrops, e.dataset.notMirrored])",
    )  # fmt: skip
    reported = [c for c in collectors if c["capture"] is not None]
    assert [c["capture"]["drops"] for c in reported] == [{"kernel": 2, "runts": 1, "queue_full": 0}]
    want = {c["collector_id"]: ["3", "100"] for c in reported}  # losses only; left out apart
    assert {cid: [d, n] for cid, d, n in capture if d} == want
    missed = p.eval_on_selector_all(
        "#collectors tbody tr", "els => els.map(e => Number(e.dataset.missedWhileDown))"
    )
    assert missed == [c["missed_while_down"] for c in collectors]
    assert any(missed)
    headers = p.eval_on_selector_all("#collectors thead th", "els => els.map(e => e.textContent)")
    assert headers[2:7] == [
        "lost on the network", "dropped here", "missed while down", "capture drops", "not mirrored",
    ]  # fmt: skip
    violations = served.get("/api/v1/violations?limit=20")["violations"]
    assert p.locator("#violations tbody tr").count() == len(violations) > 0


def test_download_pcap_button_gives_a_capture_tshark_reads(
    served: Served, page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    p, errors = page
    vm = served.get("/api/v1/vms/web-01")
    web01_mac = vm["vifs"][0]["mac"]
    assert p.locator("#pcap-link").get_attribute("href") == "/api/v1/pcap?vm=web-01"
    with p.expect_download() as caught:
        p.click("#pcap-link")
    path = tmp_path / "web-01.pcapng"
    caught.value.save_as(str(path))
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=,", "-e", "eth.src",
         "-e", "eth.dst"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    frames = [set(line.split(",")) for line in out.stdout.splitlines()]
    assert len(frames) > 0
    assert all(web01_mac in macs for macs in frames)  # every frame is to or from web-01
    assert errors == []


def test_forecast_band_and_whatif_form_show_the_apis_numbers(
    page: tuple[Any, list[str]], tmp_path: Path
) -> None:
    # three weeks of hourly flows in their own server, in a new page of the same browser
    with serve_hourly(tmp_path / "hourly") as served:
        p = page[0].context.browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            errors: list[str] = []
            p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            p.on("pageerror", lambda exc: errors.append(str(exc)))
            p.goto(f"{served.url}/?poll=700")
            p.wait_for_function("document.querySelectorAll('#fc-chart rect.band').length > 0")
            doc = served.get("/api/v1/predictions/forecast?level=host-pair&bin=3600&horizon=24")
            series = {s["name"]: s for s in doc["series"]}
            assert p.eval_on_selector_all("#fc-pair option", "els => els.map(e => e.value)") == [
                s["name"] for s in doc["series"]
            ]
            shown = p.locator("#fc-chart").get_attribute("data-series")
            assert shown == doc["series"][0]["name"]
            bands = p.eval_on_selector_all(
                "#fc-chart rect.band",
                "els => els.map(e => ['time', 'lower', 'forecast', 'upper']"
                ".map(k => Number(e.dataset[k])))",
            )
            assert bands == [
                [b["time"], b["lower"], b["forecast"], b["upper"]]
                for b in series[shown]["forecast"]
            ]
            points = p.eval_on_selector_all(
                "#fc-chart circle.measured",
                "els => els.map(e => [Number(e.dataset.time), Number(e.dataset.value)])",
            )
            assert points == [[m["time"], m["value"]] for m in series[shown]["measured"][-168:]]
            p.select_option("#wi-vm", "web-01")
            p.select_option("#wi-host", "hv02")
            p.click("#whatif button[type=submit]")
            p.wait_for_selector("#whatif[data-done='1']")
            move = {"moves": [{"vm": "web-01", "host": "hv02"}]}
            want = served.call("POST", "/api/v1/predictions/whatif", move)[1]
            rows = p.eval_on_selector_all(
                "#wi-hosts tbody tr",
                "els => els.map(e => [e.dataset.src, e.dataset.dst, Number(e.dataset.delta)])",
            )
            assert rows == [
                [r["src"], r["dst"], r["bytes_delta"]]
                for r in want["host_pairs"]
                if r["bytes_delta"]
            ]
            assert ["hv01", "hv02", pytest.approx(-sum(
                r["bytes"] for r in want["vm_pairs"] if r["change"] == "to-intra-host"
                and r["src"] == "web-01"
            ) + sum(r["bytes"] for r in want["vm_pairs"] if r["change"] == "to-wire"
                    and r["dst"] == "web-01"))] in rows  # fmt: skip
            changes = p.eval_on_selector_all(
                "#wi-pairs tbody tr", "els => els.map(e => [e.dataset.src, e.dataset.dst,"
                " e.dataset.change])",
            )  # fmt: skip
            assert changes == [[r["src"], r["dst"], r["change"]] for r in want["vm_pairs"]]
            shots = DOCS_SCREENSHOTS if os.environ.get("VSPAN_UPDATE_SCREENSHOTS") else tmp_path
            shots.mkdir(parents=True, exist_ok=True)
            p.locator("#predict").screenshot(path=str(shots / "dashboard-predict.png"))
            assert errors == []
        finally:
            p.close()
