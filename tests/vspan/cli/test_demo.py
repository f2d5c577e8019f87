"""``vspan demo`` end to end: a subprocess runs the analyzer, its HTTP server and a collector
per simulated host; the test watches it through real HTTP, then reads what it stored."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vspan.analysis.store.store import Store

pytestmark = pytest.mark.slow

DURATION_S = 8


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=15) as response:
        return json.loads(response.read())


def _lines(stream: Any, out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("demo") / "data"
    argv = [sys.executable, "-m", "vspan.cli", "demo", "--duration", str(DURATION_S),
            "--hosts", "2", "--vms-per-host", "3", "--http", "127.0.0.1:0",
            "--data-dir", str(data), "--migrate-every", "30"]  # fmt: skip
    began = time.monotonic()
    seen: dict[str, Any] = {"stdout": [], "data": data}
    lines: queue.Queue[str] = queue.Queue()
    err_path = data.parent / "stderr.txt"
    with (
        err_path.open("w") as err,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True) as proc,
    ):
        reader = threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            try:
                _watch(seen, lines)
            except (OSError, queue.Empty) as exc:  # reported by the tests, with stderr
                seen["error"] = repr(exc)
            seen["returncode"] = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(timeout=10)
    seen["runtime_s"] = time.monotonic() - began
    while not lines.empty():
        seen["stdout"].append(lines.get())
    seen["stderr"] = err_path.read_text()
    return seen


def _watch(seen: dict[str, Any], lines: queue.Queue[str]) -> None:
    """Find the dashboard URL, then ask the API until frames arrived from both hosts."""
    url = None
    while url is None:
        line = lines.get(timeout=60)
        seen["stdout"].append(line)
        match = re.search(r"dashboard (http://127\.0\.0\.1:\d+)/", line)
        url = match.group(1) if match else None
    seen["url"] = url
    seen["healthz"] = _get(url + "/healthz")
    deadline = time.monotonic() + DURATION_S
    while True:
        status = _get(url + "/api/v1/status")
        inventory = _get(url + "/api/v1/control/inventory")
        registered = [h for h in inventory["hosts"] if h["registered"] is not None]
        if status["engine"]["frames"] > 0 and len(registered) == 2:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    seen["status"], seen["inventory"] = status, inventory


def test_the_api_answers_while_the_demo_runs(demo: dict[str, Any]) -> None:
    assert "error" not in demo, (demo["error"], demo["stdout"], demo["stderr"])
    assert demo["healthz"] == {"status": "ok", "ready": True}
    assert demo["status"]["engine"]["frames"] > 0
    hosts = {h["name"]: h for h in demo["inventory"]["hosts"]}
    assert set(hosts) == {"hv01", "hv02"}
    assert all(h["registered"] is not None for h in hosts.values())
    assert len(demo["inventory"]["vms"]) == 6


def test_the_demo_stops_cleanly_and_summarizes(demo: dict[str, Any]) -> None:
    assert demo["returncode"] == 0, demo["stderr"]
    summary = demo["stdout"][-1]
    assert re.search(r"[\d,]+ flows stored, [\d,]+ violating the port-profiles", summary)
    assert demo["runtime_s"] < DURATION_S + 60


FRAMES = re.compile(
    r"^vspan demo: (?P<captured>[\d,]+) frames captured on VM ports, (?P<mirrored>[\d,]+) "
    r"mirrored \((?P<left_out>[\d,]+) not mirrored on purpose(?:: (?P<reasons>[^;)]+))?"
    r"(?:; [^)]*)?\), (?P<sent>[\d,]+) sent, lost: (?P<lost>[^;]+); (?P<received>[\d,]+) "
    r"received$"
)
STORED = re.compile(
    r"^vspan demo: (?P<flows>[\d,]+) flows stored, (?P<denied>[\d,]+) violating the "
    r"port-profiles; (?P<simulated>\d+) live migrations simulated, (?P<recorded>\d+) recorded "
    r"by the analyzer(?P<why> \(.*\))?$"
)


def _n(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_summary_adds_up_and_says_only_what_is_true(demo: dict[str, Any]) -> None:
    """Was: "42,797 captured, 39,126 sent" without saying why, and "10 live migrations
    simulated, 9 recorded" without saying why either."""
    frames = FRAMES.match(demo["stdout"][-2].rstrip("\n"))
    assert frames is not None, demo["stdout"][-2:]
    left_out = {k: _n(v) for k, v in re.findall(r"(\w+) ([\d,]+)", frames["reasons"] or "")}
    assert sum(left_out.values()) == _n(frames["left_out"])
    assert set(left_out) <= {"duplicates", "unselected", "filtered", "sampled_out"}
    assert _n(frames["captured"]) == _n(frames["mirrored"]) + _n(frames["left_out"])
    assert frames["lost"] == "none"
    assert _n(frames["sent"]) == _n(frames["mirrored"]) == _n(frames["received"])
    stored = STORED.match(demo["stdout"][-1].rstrip("\n"))
    assert stored is not None, demo["stdout"][-1]
    with Store(Path(demo["data"]), read_only=True) as store:
        flows = store.query_flows(limit=None)
        moves = store.query_migrations(limit=None)
    assert _n(stored["flows"]) == len(flows)
    assert _n(stored["denied"]) == int((flows["policy_verdict"] == "deny").sum())
    assert int(stored["recorded"]) == len(moves)
    if int(stored["recorded"]) != int(stored["simulated"]):  # a difference is explained
        assert stored["why"], stored[0]


def test_a_second_run_on_the_same_data_dir_counts_its_own_flows(tmp_path: Path) -> None:
    """``--data-dir`` kept: the summary counts what this run stored, not the folder's."""
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "vspan.cli", "demo", "--duration", "3", "--hosts", "2",
            "--vms-per-host", "3", "--http", "127.0.0.1:0", "--data-dir", str(data),
            "--migrate-every", "30"]  # fmt: skip
    counted = []
    for _ in range(2):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        stored = STORED.match(done.stdout.splitlines()[-1])
        assert stored is not None, done.stdout
        counted.append((_n(stored["flows"]), int(stored["recorded"])))
    with Store(data, read_only=True) as store:
        total = (len(store.query_flows(limit=None)), len(store.query_migrations(limit=None)))
    assert counted[1][0] > 0
    assert (sum(f for f, _ in counted), sum(m for _, m in counted)) == total


def test_flows_violations_and_migrations_are_stored(demo: dict[str, Any]) -> None:
    with Store(Path(demo["data"]), read_only=True) as store:
        flows = store.query_flows(limit=None)
        moves = store.query_migrations()
    assert len(flows) > 50
    assert set(flows["scope"]) >= {"intra-host", "cross-host", "external"}
    assert (flows["policy_verdict"] == "deny").any()
    assert (flows["policy_verdict"] == "permit").any()
    assert len(moves) >= 1
