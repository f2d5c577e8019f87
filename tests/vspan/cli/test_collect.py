"""``vspan collect`` as a subprocess, the way a user runs it, when what it sends to cannot be
reached: it says so (rate-limited), shows what waits and why, and names what it lost."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vspan.synth import generate_small, write_inventory_yaml
from vspan_testing.hosts import host_capture

VSPAN = [sys.executable, "-m", "vspan.cli"]
STATS = re.compile(
    r"^vspan collect: (?P<stopped>stopped: )?hv\d+: 4 ports, captured (?P<captured>\d+) frames, "
    r"exported (?P<exported>\d+), sent (?P<sent>\d+) in (?P<messages>\d+) messages, waiting "
    r"(?P<waiting>\d+), truncated 0, lost: (?P<lost>[^,]+(?: \(\d+ messages\))?), not mirrored: "
    r"(?P<not_mirrored>.+); tcp (?P<tcp>.+)$",
    re.M,
)


def closed_port() -> int:
    with socket.socket() as sock:  # bound, never listening, closed: nothing is there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_a_tcp_collector_that_cannot_connect_says_so(tmp_path: Path) -> None:
    """Was: ``exported 44, sent 0 in 0 messages, ... dropped: duplicates 44`` forever and
    not one error line."""
    cap = generate_small(seed=5)
    write_inventory_yaml(cap, tmp_path / "inventory.yaml")
    host = cap.hosts[0]
    host_capture(cap, host.collector_id, tmp_path / "host.pcap")
    port = closed_port()
    argv = [*VSPAN, "collect", "--replay", str(tmp_path / "host.pcap"),
            "--inventory", str(tmp_path / "inventory.yaml"), "--host", host.name,
            "--collector-id", str(host.collector_id), "--analyzer", f"127.0.0.1:{port}",
            "--transport", "tcp", "--stats-interval", "0.5", "--duration", "3"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    refused = "connection refused (is the analyzer listening on TCP there?)"
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, err  # the first failure; the next ones at a limited rate
    assert warnings[0].startswith(
        f"vspan collect: WARNING: tcp://127.0.0.1:{port}: cannot connect: {refused}; "
    ), err
    assert "dropped" not in err, err
    stats = [m.groupdict() for m in STATS.finditer(err)]
    running, final = [s for s in stats if not s["stopped"]], stats[-1]
    assert running, err
    assert final["stopped"], err
    for s in running:  # while it runs: nothing sent, nothing lost, everything exported waits
        assert (s["sent"], s["messages"], s["lost"]) == ("0", "0", "none"), s
        assert s["waiting"] == s["exported"], s
        assert re.fullmatch(rf"connecting, \d+ failed attempts, last: {re.escape(refused)}",
                            s["tcp"]), s  # fmt: skip
    assert int(running[-1]["waiting"]) > 0, err
    # at the exit, what waited is lost as `stopped`, all of it, in whole messages
    assert (final["sent"], final["waiting"]) == ("0", "0"), final
    lost = re.fullmatch(r"stopped (\d+) \((\d+) messages\)", final["lost"])
    assert lost is not None, final
    assert int(lost.group(1)) == int(final["exported"]) > 0, final
    assert final["tcp"] == f"stopped, last: {refused}", final
    # the frames the collector leaves out on purpose are named so, and add up
    left_out = {
        k: int(v) for k, v in re.findall(r"(\w+) (\d+)", final["not_mirrored"])
    }  # fmt: skip
    assert set(left_out) <= {"duplicates", "unselected", "filtered", "sampled_out"}, final
    assert int(final["captured"]) == int(final["exported"]) + sum(left_out.values()), final
