"""Live capture rate of ``AfPacketSource`` against tcpdump, on one VM port of a netns lab.

    sudo .venv/bin/python bench/collector_capture.py
    sudo .venv/bin/python bench/collector_capture.py --rates 50000,200000,0 --seconds 3 --size 128

A lab of one host and one VM (``vspan_testing.netlab``; torn down whatever happens). For
each offered rate (0: as fast as the sender goes), a sender process in the VM's namespace
sends pre-built Ethernet/IPv4/UDP frames on the VM's ``eth0`` with an AF_PACKET socket,
paced in bursts of 64, bounded by count and ``--seconds`` (at most 10 s). The frames go to
a MAC no port has, so the bridge drops them after the capture point. Each rate runs once
with each tool on the host-side port ``vm-h1v1``, one tool at a time:

- vspan: ``AfPacketSource`` (4 MiB ring, as tcpdump's ``-B 4096``) polled by a thread in
  the host's namespace; CPU is that thread's (``time.thread_time``), which includes the
  copy of every frame into batches but nothing downstream.
- tcpdump: ``tcpdump -i vm-h1v1 -w FILE -B 4096 -n``; CPU is the process's
  (``os.wait4`` rusage), which includes writing the pcap file.

"arrived" is the port's receive counter (frames that reached the capture point),
"captured" what the tool counted, "dropped" what the kernel reports it dropped (ring or
buffer full). The kernel's copy into the ring happens in the sender's context, so neither
tool's CPU includes it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

from vspan.collectors.capture.afpacket import AfPacketConfig, AfPacketSource  # noqa: E402
from vspan.inventory import Port  # noqa: E402
from vspan_testing.netlab import Lab, in_netns, lab_unavailable  # noqa: E402

SENDER = r"""
import json, socket, sys, time
ifname, count, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seconds, frame = float(sys.argv[4]), bytes.fromhex(sys.argv[5])
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
sock.bind((ifname, 0))
send, sent, start = sock.send, 0, time.perf_counter()
deadline = start + seconds
while sent < count:
    for _ in range(min(64, count - sent)):
        send(frame)
    sent += min(64, count - sent)
    now = time.perf_counter()
    if now > deadline:
        break
    if rate > 0 and sent / rate > now - start:
        time.sleep(sent / rate - (now - start))
print(json.dumps({"sent": sent, "elapsed": time.perf_counter() - start}))
"""
NOWHERE_MAC = bytes.fromhex("0277ffffff01")
DRAIN_S = 1.5
"""Wait after the sender before counting: longer than either tool's block timeout."""


@dataclass
class Row:
    tool: str
    offered: float
    arrived: int
    captured: int
    dropped: int
    cpu_s: float


def udp_frame(src_mac: bytes, size: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes to a MAC nobody has."""
    payload = bytes(max(0, size - 42))
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        socket.inet_aton("10.77.1.1"),
        socket.inet_aton("10.77.255.1"),
    )
    return NOWHERE_MAC + src_mac + b"\x08\x00" + ip + udp


def port_rx(lab: Lab, ns: str, port: str) -> int:
    out = lab.run(ns, "ip", "-s", "-j", "link", "show", port).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def send(lab: Lab, rate: int, seconds: float, frame: bytes) -> tuple[int, float]:
    count = int(rate * seconds) if rate else 10_000_000
    vm = lab.vm("h1v1")
    done = lab.python(
        vm.ns,
        SENDER,
        "eth0",
        str(count),
        str(rate),
        str(seconds),
        frame.hex(),
        timeout=seconds + 30,
    )
    result = json.loads(done.stdout)
    return int(result["sent"]), float(result["elapsed"])


def run_vspan(lab: Lab, rate: int, seconds: float, frame: bytes, timeout_ms: int) -> Row:
    vm = lab.vm("h1v1")
    port = Port(vm.port, vm.ifindex, vm.vif, 0, vm.name)
    source = AfPacketSource(
        [port],
        config=AfPacketConfig(block_size=1 << 18, block_count=16, block_timeout_ms=timeout_ms),
    )
    state = {"frames": 0, "cpu": 0.0}
    ready, stop, measuring = threading.Event(), threading.Event(), threading.Event()

    def capture() -> None:
        with in_netns(vm.host_ns):
            source.start()
        try:
            ready.set()
            cpu0 = None
            while not stop.is_set():
                if cpu0 is None and measuring.is_set():
                    cpu0 = time.thread_time()
                batch = source.poll(0.05)
                if batch is not None and measuring.is_set():
                    state["frames"] += len(batch.frames)
            state["cpu"] = time.thread_time() - (cpu0 or time.thread_time())
        finally:
            source.read_kernel_stats()
            source.stop()

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(30)
    time.sleep(0.2)  # let the first poll (and numba's cache load) pass
    measuring.set()
    time.sleep(0.05)
    before = port_rx(lab, vm.host_ns, vm.port)
    sent, elapsed = send(lab, rate, seconds, frame)
    time.sleep(DRAIN_S)
    arrived = port_rx(lab, vm.host_ns, vm.port) - before
    stop.set()
    thread.join(30)
    return Row(
        f"vspan AfPacketSource ({timeout_ms} ms blocks)",
        sent / elapsed,
        arrived,
        int(state["frames"]),
        source.counters.kernel_drops,
        state["cpu"],
    )


def run_tcpdump(lab: Lab, rate: int, seconds: float, frame: bytes, workdir: Path) -> Row:
    vm = lab.vm("h1v1")
    out = workdir / "tcpdump.pcap"
    proc = lab.spawn(
        vm.host_ns,
        "tcpdump",
        "-i",
        vm.port,
        "-w",
        str(out),
        "-B",
        "4096",
        "-n",
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "tcpdump: listening on vm-h1v1, ..."
    if "listening" not in line:
        raise RuntimeError(f"tcpdump did not start: {line}")
    time.sleep(0.2)
    before = port_rx(lab, vm.host_ns, vm.port)
    sent, elapsed = send(lab, rate, seconds, frame)
    time.sleep(DRAIN_S)  # libpcap hands over a block after 1 s (tcpdump's timeout)
    arrived = port_rx(lab, vm.host_ns, vm.port) - before
    proc.send_signal(signal.SIGINT)
    _, status, usage = os.wait4(proc.pid, 0)  # `ip netns exec` execs tcpdump: same pid
    proc.returncode = os.waitstatus_to_exitcode(status)
    report = proc.stderr.read()
    numbers = {
        key: int(n)
        for n, key in re.findall(
            r"(\d+) packets? (captured|received by filter|dropped by kernel)", report
        )
    }
    out.unlink(missing_ok=True)
    return Row(
        "tcpdump -B 4096 -w",
        sent / elapsed,
        arrived,
        numbers.get("captured", 0),
        numbers.get("dropped by kernel", 0),
        usage.ru_utime + usage.ru_stime,
    )


def table(rows: list[Row], size: int) -> str:
    lines = [
        f"Frames of {size} bytes, one VM port, {os.cpu_count()} CPUs, Linux {platform.release()}.",
        "",
        "| tool | offered frames/s | arrived at port | captured | dropped (kernel) | lost "
        "| CPU s per 100k frames |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per = r.cpu_s / (r.captured / 100_000) if r.captured else float("nan")
        lost = max(0, r.arrived - r.captured)
        cells = [r.tool, f"{r.offered:,.0f}", f"{r.arrived:,}", f"{r.captured:,}"]
        cells += [f"{r.dropped:,}", f"{lost:,}", f"{per:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates",
        default="20000,50000,100000,200000,0",
        help="offered frames/s, comma-separated; 0 = as fast as possible",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per trial (at most 10)")
    parser.add_argument("--size", type=int, default=128, help="frame size in bytes (>= 60)")
    parser.add_argument("--tools", default="vspan,tcpdump")
    parser.add_argument("--block-timeout-ms", type=int, default=10, help="vspan's ring")
    args = parser.parse_args()
    if (reason := lab_unavailable()) is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    seconds = min(10.0, args.seconds)
    tools = args.tools.split(",")
    if "tcpdump" in tools and shutil.which("tcpdump") is None:
        print("tcpdump is not installed: skipping it", file=sys.stderr)
        tools.remove("tcpdump")
    rows: list[Row] = []
    with Lab("vsbench", hosts=1, vms_per_host=1) as lab, tempfile.TemporaryDirectory() as tmp:
        vm = lab.vm("h1v1")
        for conf in ("all", "default", "eth0"):  # no IPv6 chatter on the measured port
            lab.sysctl(vm.ns, f"net/ipv6/conf/{conf}/disable_ipv6", "1")
        frame = udp_frame(vm.mac_bytes, max(60, args.size))
        for rate in (int(r) for r in args.rates.split(",")):
            for tool in tools:
                row = (
                    run_vspan(lab, rate, seconds, frame, args.block_timeout_ms)
                    if tool == "vspan"
                    else run_tcpdump(lab, rate, seconds, frame, Path(tmp))
                )
                rows.append(row)
                print(
                    f"{row.tool}: offered {row.offered:,.0f}/s arrived {row.arrived:,} "
                    f"captured {row.captured:,} dropped {row.dropped:,} cpu {row.cpu_s:.2f}s",
                    file=sys.stderr,
                )
    print(table(rows, max(60, args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
