"""Analyzer settings: defaults, file, flags, and errors that name the line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vspan.analysis.service.config import AnalyzerConfig, load_keys
from vspan.errors import ConfigError
from vspan.yamlconf import parse_address


def test_defaults_listen_on_loopback_only() -> None:
    cfg = AnalyzerConfig()
    for value in (cfg.udp, cfg.tcp, cfg.http):
        assert value is not None
        assert parse_address(value)[0] == "127.0.0.1"


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "analyzer.yaml"
    path.write_text("udp: 127.0.0.1:9000\ntcp: null\nidle_timeout: 30\nrequire_known: true\n")
    cfg = AnalyzerConfig.load(str(path))
    assert (cfg.udp, cfg.tcp, cfg.idle_timeout, cfg.require_known) == (
        "127.0.0.1:9000",
        None,
        30.0,
        True,
    )
    cfg = cfg.merged({"udp": "127.0.0.1:9100", "http": None})
    assert cfg.udp == "127.0.0.1:9100"
    assert cfg.http == AnalyzerConfig().http


@pytest.mark.parametrize("off", ["off", "null", "''", "false"])
def test_a_receiver_is_turned_off_as_the_flag_does(tmp_path: Path, off: str) -> None:
    # Regression: ``tcp: off`` (what --tcp off says) failed: YAML reads off as false.
    path = tmp_path / "analyzer.yaml"
    path.write_text(f"tcp: {off}\n")
    assert AnalyzerConfig.load(str(path)).tcp is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("udp: 127.0.0.1\n", r"analyzer\.yaml:1: udp: expected ADDR:PORT"),
        ("tcp: x\n", r"analyzer\.yaml:1: tcp: expected ADDR:PORT"),
        ("tcp: 127.0.0.1:1\nmax_flows: -3\n", r"analyzer\.yaml:2: max_flows: -3 out of range"),
        ("http: 127.0.0.1:80\nmax_flows: 0\n", r"analyzer\.yaml:2: max_flows: 0 out of range"),
        ("idle_timeout: soon\n", r"analyzer\.yaml:1: idle_timeout: expected a number, got 'soon'"),
        ("require_known: yes please\n", r"analyzer\.yaml:1: require_known: expected true or false"),
        ("udpp: 127.0.0.1:1\n", r"analyzer\.yaml:1: udpp: unknown field"),
        ("max_streams: 0\n", r"analyzer\.yaml:1: max_streams: 0 out of range"),
        ("tcp_idle_timeout: 0\n", r"analyzer\.yaml:1: tcp_idle_timeout: must be positive"),
        ("boot_grace: -1\n", r"analyzer\.yaml:1: boot_grace: must not be negative, got -1"),
        (
            "http: 127.0.0.1:1\ntcp_max_message: 40\n",
            r"analyzer\.yaml:2: tcp_max_message: expected 70\.\.16777216 bytes, got 40",
        ),
        (
            "retention_days: 7\nretention_basis: arrival\n",
            r"analyzer\.yaml:2: retention_basis: expected ingest or capture, got 'arrival'",
        ),
    ],
)
def test_file_errors_name_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "analyzer.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        AnalyzerConfig.load(str(path))


def test_retention_ages_stored_rows_by_ingest_time_unless_told(tmp_path: Path) -> None:
    assert AnalyzerConfig().retention_basis == "ingest"
    path = tmp_path / "analyzer.yaml"
    path.write_text("retention_basis: capture\n")
    assert AnalyzerConfig.load(str(path)).retention_basis == "capture"


def test_bad_flag_is_named() -> None:
    with pytest.raises(ConfigError, match=r"http: expected ADDR:PORT"):
        AnalyzerConfig().merged({"http": "localhost"})


def test_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("7: 000102030405060708090a0b0c0d0e0f\n")
    assert load_keys(str(path)) == {7: bytes(range(16))}
    path.write_text("7: 00010203040506070809101112131415\n")  # all digits: still hex
    assert load_keys(str(path)) == {7: bytes.fromhex("00010203040506070809101112131415")}
    path.write_text("7: 0001\n")
    with pytest.raises(ConfigError, match=r"keys\.yaml:1: 7: a key has 16\.\.64 bytes, got 2"):
        load_keys(str(path))
    path.write_text("seven: 000102030405060708090a0b0c0d0e0f\n")
    with pytest.raises(
        ConfigError, match=r"keys\.yaml:1: seven: collector_id 'seven' is not a number"
    ):
        load_keys(str(path))


def test_bounds_on_hostile_input_are_settings(tmp_path: Path) -> None:
    path = tmp_path / "analyzer.yaml"
    path.write_text(
        "max_collectors: 10\nmax_streams: 20\nboot_grace: 0\nmax_macs_per_vif: 3\n"
        "max_learned_macs: 100\ntcp_max_connections: 5\ntcp_idle_timeout: 2.5\n"
        "tcp_max_message: 100000\n"
    )
    cfg = AnalyzerConfig.load(str(path))
    assert (cfg.max_collectors, cfg.max_streams, cfg.boot_grace) == (10, 20, 0.0)
    assert (cfg.max_macs_per_vif, cfg.max_learned_macs) == (3, 100)
    assert (cfg.tcp_max_connections, cfg.tcp_idle_timeout, cfg.tcp_max_message) == (5, 2.5, 100_000)
