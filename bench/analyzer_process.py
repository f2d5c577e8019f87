"""The whole ``vspan analyze`` process over loopback UDP: how many frames/s it takes, lossless.

    python bench/analyzer_process.py                          # rates 0.5..1.5 M frames/s
    python bench/analyzer_process.py --rates 1000000 --seconds 5 --churn

A sender process replays pre-built tunnel messages of 64 frames of 128 bytes
(``analyzer_ingest.build_templates``: synthetic VN-tagged traffic of 4 hosts and 64 VMs in
three tiers) at a fixed rate to, in turn:

* ``bare``: a bare Python blocking ``recv_into`` loop that only counts datagrams — the
  ceiling of this machine in this run;
* ``analyze``: a real ``vspan analyze`` subprocess, as a user starts it, with everything
  on: the packet ring, the store, the inventory of the synthetic datacenter and a
  port-profile file of ``--rules`` rules (the example profiles padded with more rules).

After the sender stops and the analyzer has drained, its counters are read over HTTP
(``/api/v1/status``, ``/api/v1/collectors``): frames the engine took, messages the
collectors' sequences say were lost, and the analyzer's own drops by cause. Loss is what
was sent minus what the engine counted; it must agree with the drops the analyzer names.

``--churn`` moves each replay of the template set past the idle timeout, so every flow of
the set ends and a new one starts at each replay (about ``--flows`` finished flows per
replay: the store, the records and the policy see that many flows); without it the same
flows go on (long flows, few records). Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path[:0] = [str(Path(__file__).resolve().parent)]

from analyzer_ingest import (  # noqa: E402
    FRAMES_PER_MESSAGE,
    SendJob,
    Templates,
    bare_loop,
    build_templates,
    sender,
)

from vspan.synth import generate, write_inventory_yaml  # noqa: E402

EXAMPLE_PROFILES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "profiles.yaml"


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_profiles(path: Path, rules: int) -> int:
    """The example profiles padded with permits on unused ports to ``rules`` rules in all."""
    doc = yaml.safe_load(EXAMPLE_PROFILES.read_text())
    profiles = doc["profiles"]
    count = sum(len(p.get("rules", [])) for p in profiles)
    port = 20000
    while count < rules:
        for p in profiles:
            if count >= rules:
                break
            p.setdefault("rules", []).append(f"permit tcp any profile:{p['name']} eq {port}")
            port += 1
            count += 1
    path.write_text(yaml.safe_dump(doc))
    return count


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


class Analyze:
    """``vspan analyze`` as a subprocess, everything on."""

    def __init__(self, work: Path, *, inventory: Path, profiles: Path, idle: float) -> None:
        self.udp, self.http = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
        self.data = work / "data"
        exe = Path(sys.executable).with_name("vspan")
        self.cmd = [
            str(exe), "analyze", "--udp", f"127.0.0.1:{self.udp}", "--tcp", "off",
            "--http", f"127.0.0.1:{self.http}", "--data-dir", str(self.data),
            "--inventory", str(inventory), "--profiles", str(profiles),
            "--idle-timeout", str(idle),
        ]  # fmt: skip
        self.log = (work / "analyze.log").open("w")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Analyze:
        shutil.rmtree(self.data, ignore_errors=True)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if get(self.url("/api/v1/status")).get("engine") is not None:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"vspan analyze exited: see {self.log.name}")
            time.sleep(0.2)
        raise RuntimeError("vspan analyze did not come up")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def status(self) -> dict[str, Any]:
        return dict(get(self.url("/api/v1/status")))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def drained(analyze: Analyze, timeout: float = 30.0) -> dict[str, Any]:
    """The analyzer's status once its frame count stops moving."""
    last, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        status = analyze.status()
        frames = int(status["engine"]["frames"])
        if frames == last:
            return status
        last = frames
    return analyze.status()


_BOOTS = iter(range(100, 1 << 31))


def send(addr: tuple[str, int], rate: int, seconds: float, templates: Templates, span: int) -> int:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    boot = next(_BOOTS)
    # Each run starts a day after the one before: it goes on in time, as live traffic does.
    job = SendJob(addr, rate, seconds, templates, boot_id=boot, start_ns=boot * 86_400 * 10**9)
    proc = ctx.Process(target=sender, args=(job, ready, done))
    proc.start()
    if not ready.wait(timeout=60):
        raise RuntimeError("the sender did not start")
    return proc, done  # type: ignore[return-value]


def run_bare(rate: int, seconds: float, templates: Templates) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    sock.bind(("127.0.0.1", 0))
    proc, done = send(sock.getsockname(), rate, seconds, templates, 0)
    got = bare_loop(sock, time.monotonic() + seconds + 1.0)
    sent, _ = done.get(timeout=60)
    proc.join(10)
    sock.close()
    return int(sent) - got


def run_analyze(
    analyze: Analyze, rate: int, seconds: float, templates: Templates
) -> dict[str, Any]:
    before = analyze.status()
    proc, done = send(("127.0.0.1", analyze.udp), rate, seconds, templates, 0)
    sent, _ = done.get(timeout=seconds + 60)
    proc.join(10)
    after = drained(analyze)
    frames = after["engine"]["frames"] - before["engine"]["frames"]

    def named(status: dict[str, Any], what: str) -> int:
        return sum(int(c.get(what) or 0) for c in status.get("collectors", []))

    return {
        "sent_frames": int(sent) * FRAMES_PER_MESSAGE,
        "frames": int(frames),
        "kernel": named(after, "kernel") - named(before, "kernel"),
        "lost": named(after, "lost") - named(before, "lost"),
        "refused": sum(named(after, k) - named(before, k) for k in ("duplicates", "stale")),
        "status": after,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="500000,1000000,1500000", help="frames/s")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--templates", type=int, default=2000, help="distinct messages replayed")
    ap.add_argument("--rules", type=int, default=50)
    ap.add_argument("--churn", action="store_true", help="every replay ends every flow")
    args = ap.parse_args()
    templates = build_templates(args.templates, 128)
    work = Path(tempfile.mkdtemp(prefix="vspan-bench-"))
    try:
        cap = generate(packets=64, flows=4, hosts=4, vms=64, seed=1, duration_s=20.0)
        write_inventory_yaml(cap, work / "inventory.yaml")
        rules = write_profiles(work / "profiles.yaml", args.rules)
        idle = 15.0 if args.churn else 60.0
        shape = "churn" if args.churn else "long flows"
        print(
            f"messages of {FRAMES_PER_MESSAGE} frames of 128 bytes; {rules} rules; "
            f"{shape}; {args.seconds:g} s per rate\n"
        )
        print(
            "| offered frames/s | bare loop lost msgs | analyze frames/s | analyze lost frames "
            "| named: kernel msgs | named: network lost msgs | duplicate or stale msgs |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        with Analyze(
            work, inventory=work / "inventory.yaml", profiles=work / "profiles.yaml", idle=idle
        ) as an:
            for fps in [int(r) for r in args.rates.split(",")]:
                rate = max(1, fps // FRAMES_PER_MESSAGE)
                bare_lost = run_bare(rate, args.seconds, templates)
                r = run_analyze(an, rate, args.seconds, templates)
                lost = r["sent_frames"] - r["frames"]
                print(
                    f"| {fps:,} | {bare_lost} | {r['frames'] / args.seconds:,.0f} | {lost:,} "
                    f"| {r['kernel']:,} | {r['lost']:,} | {r['refused']:,} |",
                    flush=True,
                )
            status = an.status()
            print("\nreceivers:", json.dumps(status.get("receivers")))
            print("store writer:", json.dumps(status.get("store_writer")))
            print("engine:", json.dumps(status.get("engine")))
    finally:
        if not os.environ.get("VSPAN_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("kept", work)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
