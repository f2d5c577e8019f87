"""``vspan analyze`` as a subprocess: a non-loopback ``--http`` address without ``--tokens``
is refused (exit status 2, a message that says what to do) unless ``--insecure-listen`` (flag
or config key) is given, which is logged as a WARNING; and ``vspan collect`` sends its
control-plane token (``--control-token``, ``$VSPAN_CONTROL_TOKEN``, the config file's
``control_token``) to an analyzer with a tokens file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vspan.collectors.config import CollectorFile
from vspan.synth import generate_small, write_inventory_yaml
from vspan_testing.hosts import host_capture

READ, C1, C2 = "cli-read-0123456789", "cli-collector-1-0123456789", "cli-collector-2-0123456789"
VSPAN = [sys.executable, "-m", "vspan.cli"]


def analyze(folder: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [*VSPAN, "analyze", "--udp", "127.0.0.1:0", "--tcp", "off",
            "--data-dir", str(folder / "data"), *flags]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def test_a_non_loopback_http_without_tokens_is_refused(tmp_path: Path) -> None:
    done = analyze(tmp_path, "--http", "0.0.0.0:0")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "vspan analyze: error: http: --http 0.0.0.0:0 is not a loopback address and no "
        "--tokens file is given"
    )
    assert "--insecure-listen" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started
    config = tmp_path / "analyzer.yaml"
    config.write_text("http: '[::]:0'\n")
    assert analyze(tmp_path, "--config", str(config)).returncode == 2


@pytest.mark.slow
def test_insecure_listen_starts_and_says_so(tmp_path: Path) -> None:
    done = analyze(tmp_path, "--http", "0.0.0.0:0", "--insecure-listen", "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert "vspan analyze: WARNING: insecure listen: serving the API, dashboard and control " \
        "plane on 0.0.0.0:0 without tokens to every client" in done.stderr  # fmt: skip
    config = tmp_path / "analyzer.yaml"
    config.write_text("http: 0.0.0.0:0\ninsecure_listen: true\n")
    done = analyze(tmp_path, "--config", str(config), "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert "WARNING: insecure listen" in done.stderr
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"{READ}: read\n")
    done = analyze(tmp_path, "--http", "0.0.0.0:0", "--tokens", str(tokens), "--duration", "1")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr


# --- the collector's token ------------------------------------------------------------------


@dataclass
class Running:
    proc: subprocess.Popen[str]
    url: str
    udp: str

    def get(self, path: str, token: str = READ) -> Any:
        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"{READ}: read\n{C1}: collector:1\n{C2}: collector:2\n")
    argv = [*VSPAN, "analyze", "--http", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--tcp", "off",
            "--data-dir", str(tmp_path / "data"), "--tokens", str(tokens)]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline, seen = time.monotonic() + 120, ""
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            found = re.search(r"udp (127\.0\.0\.1:\d+);.*API on (http://127\.0\.0\.1:\d+)/", line)
            if found is not None:
                yield Running(proc, found.group(2), found.group(1))
                return
            if not line and proc.poll() is not None:
                break
        raise AssertionError(f"vspan analyze did not start:\n{seen}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def collect(
    tmp_path: Path, running: Running, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``vspan collect --replay`` of host hv01's VM ports (collector 1), with a control plane."""
    cap = generate_small(seed=5)
    write_inventory_yaml(cap, tmp_path / "inventory.yaml")
    host = cap.hosts[0]
    host_capture(cap, host.collector_id, tmp_path / "host.pcap")
    argv = [*VSPAN, "collect", "--replay", str(tmp_path / "host.pcap"),
            "--inventory", str(tmp_path / "inventory.yaml"), "--host", host.name,
            "--collector-id", str(host.collector_id), "--analyzer", running.udp,
            "--control", running.url, "--max-speed", *flags]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "VSPAN_CONTROL_TOKEN"} | (env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environ,
                          check=False)  # fmt: skip


def registered(running: Running) -> dict[int, Any]:
    return {
        h["collector_id"]: h["registered"]
        for h in running.get("/api/v1/control/inventory")["hosts"]
    }


@pytest.mark.slow
def test_a_collector_without_its_token_is_refused(tmp_path: Path, running: Running) -> None:
    done = collect(tmp_path, running)
    assert done.returncode == 0, done.stderr
    assert "HTTP 401 Unauthorized: missing bearer token" in done.stderr
    done = collect(tmp_path, running, "--control-token", C2)
    assert "HTTP 403 Forbidden: the token is collector 2's, not 1's" in done.stderr
    assert registered(running) == {}
    assert running.get("/api/v1/collectors")["collectors"] == []  # no heartbeat kept either


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_collector_with_its_token_registers_and_reports(
    tmp_path: Path, running: Running, how: str
) -> None:
    flags = ["--control-token", C1] if how == "flag" else []
    env = {"VSPAN_CONTROL_TOKEN": C1} if how == "env" else None
    done = collect(tmp_path, running, *flags, env=env)
    assert done.returncode == 0, done.stderr
    assert "control plane" not in done.stderr, done.stderr
    assert registered(running)[1] is not None
    rows = running.get("/api/v1/collectors")["collectors"]
    capture = {r["collector_id"]: r["capture"] for r in rows}[1]
    assert capture is not None
    assert capture["drops"]["kernel"] == 0


@pytest.mark.slow
def test_query_commands_send_their_token(running: Running) -> None:
    argv = [*VSPAN, "flows", "--analyzer", running.url, "--format", "json"]
    environ = {k: v for k, v in os.environ.items() if k != "VSPAN_TOKEN"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=environ,
                          check=False)  # fmt: skip
    assert done.returncode == 2
    assert "the analyzer refused the query (HTTP 401): missing bearer token" in done.stderr
    for extra, env in ((["--token", READ], environ), ([], environ | {"VSPAN_TOKEN": READ})):
        done = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120,
                              env=env, check=False)  # fmt: skip
        assert (done.returncode, json.loads(done.stdout)) == (0, []), done.stderr


def test_the_config_files_control_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``control_token`` of ``--config`` reaches the control client (flag and env win)."""
    from vspan.cli import _build_parser
    from vspan.cli_collect import _build

    config = tmp_path / "collector.yaml"
    config.write_text(
        f"collector_id: 1\nanalyzer: 127.0.0.1:47470\ncontrol: http://127.0.0.1:1\n"
        f"control_token: {C1}\nstate_dir: {tmp_path}\n"
        "discovery: {kind: bridge, bridges: [br-none]}\n"
    )
    assert CollectorFile.load(str(config)).control_token == C1
    parser = _build_parser("collect")
    for argv, env, want in (([], {}, C1), (["--control-token", C2], {}, C2),
                            ([], {"VSPAN_CONTROL_TOKEN": C2}, C2)):  # fmt: skip
        args = parser.parse_args(["collect", "--config", str(config), *argv])
        monkeypatch.delenv("VSPAN_CONTROL_TOKEN", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        collector, _ = _build(args)
        assert collector.control is not None
        assert collector.control.token == want


def test_the_token_goes_in_the_authorization_header() -> None:
    from vspan.collectors.control_client import ControlClient
    from vspan.errors import ConfigError

    assert ControlClient("http://127.0.0.1:1", 1, token=f" {C1}\n".strip()).token == C1
    with pytest.raises(ConfigError, match="empty or spans lines"):
        ControlClient("http://127.0.0.1:1", 1, token="a\r\nX-Evil: 1")
