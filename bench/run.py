"""Time ``vspan report`` and peer tools on one synthetic capture, in one run.

    python bench/run.py                      # generate bench/out/dc-1000000-s1.pcapng if needed
    python bench/run.py --packets 200000 --skip-slow --markdown bench/out/results.md
    python bench/run.py --capture FILE --inventory INV --tools vspan,dpkt

Prints a markdown table: seconds, packets/s, ratio to vspan (peer seconds / vspan seconds)
and peak RSS of each tool. A tool that is not installed, skipped, failed or timed out says
so in the table. Peak RSS comes from ``/usr/bin/time`` when present, else from
``getrusage(RUSAGE_CHILDREN)`` (a high-water mark over all children so far).

``python bench/run.py --dpkt-loop FILE`` is the "typical Python tool" baseline: a plain
dpkt loop that unwraps the VN-Tag and 802.1Q tag and counts 5-tuples in a dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
L2_L4 = ("frame", "eth", "ethertype", "vntag", "vlan", "ip", "ipv6", "tcp", "udp", "icmp", "icmpv6")
"""The dissectors tshark keeps in its L2–L4 run."""


def dpkt_loop(path: str) -> int:
    """Count packets and bytes per directed 5-tuple with dpkt; return the number of flows."""
    import dpkt

    flows: dict[tuple[bytes, bytes, int, int, int], list[float]] = {}
    with open(path, "rb") as fh:
        pcapng = fh.read(4) == b"\x0a\x0d\x0d\x0a"
        fh.seek(0)
        reader = dpkt.pcapng.Reader(fh) if pcapng else dpkt.pcap.Reader(fh)
        for ts, buf in reader:
            eth = dpkt.ethernet.Ethernet(buf)
            etype, payload = eth.type, bytes(eth.data)
            if etype == 0x8926:  # VN-Tag: 4 bytes, then the inner EtherType
                etype, payload = int.from_bytes(payload[4:6], "big"), payload[6:]
            if etype == 0x8100:
                etype, payload = int.from_bytes(payload[2:4], "big"), payload[4:]
            if etype == 0x0800:
                ip = dpkt.ip.IP(payload)
                proto = ip.p
            elif etype == 0x86DD:
                ip = dpkt.ip6.IP6(payload)
                proto = ip.nxt
            else:
                continue
            l4 = ip.data
            key = (ip.src, ip.dst, proto, getattr(l4, "sport", 0), getattr(l4, "dport", 0))
            entry = flows.get(key)
            if entry is None:
                flows[key] = [1, len(buf), float(ts), float(ts)]
            else:
                entry[0] += 1
                entry[1] += len(buf)
                entry[3] = float(ts)
    return len(flows)


@dataclass
class Context:
    capture: Path
    inventory: Path | None
    tmp: Path
    env: dict[str, str]


@dataclass
class Tool:
    name: str
    build: Callable[[Context], list[str] | str]
    """The command, or why it cannot run."""
    slow: bool = False
    note: str = ""
    untagged: bool = False
    """Also run on the capture's untagged copy (``X.untagged.pcapng``) when there is one."""


@dataclass
class Result:
    seconds: float | None
    rss_mb: float | None
    status: str


def _vspan(ctx: Context, fmt: str = "json") -> list[str] | str:
    exe = Path(sys.executable).with_name("vspan")
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "vspan"
    if not exe.exists():
        return "not available (no vspan command)"
    probe = subprocess.run(
        [str(exe), "report", "--help"], capture_output=True, env=ctx.env, check=False, timeout=120
    )
    if probe.returncode != 0:
        return "not available (vspan report fails to start)"
    cmd = [
        str(exe),
        "report",
        str(ctx.capture),
        "--by",
        "flow",
        "--format",
        fmt,
        "-o",
        str(ctx.tmp / f"vspan.{fmt}"),
        "--no-progress",
    ]
    return cmd + (["--inventory", str(ctx.inventory)] if ctx.inventory else [])


def _need(binary: str) -> str | None:
    return None if shutil.which(binary) else f"not installed ({binary})"


def _tshark(ctx: Context) -> list[str] | str:
    return _need("tshark") or [
        "tshark",
        "-n",
        "-q",
        "-z",
        "conv,tcp",
        "-z",
        "conv,udp",
        "-r",
        str(ctx.capture),
    ]


def _tshark_l2l4(ctx: Context) -> list[str] | str:
    if missing := _need("tshark"):
        return missing
    listing = subprocess.run(
        ["tshark", "-G", "protocols"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    names = {line.split("\t")[2] for line in listing.splitlines() if line.count("\t") >= 2}
    disable = [a for n in sorted(names - set(L2_L4)) for a in ("--disable-protocol", n)]
    return [
        "tshark",
        "-n",
        "-q",
        *disable,
        "-z",
        "conv,tcp",
        "-z",
        "conv,udp",
        "-r",
        str(ctx.capture),
    ]


def _dpkt(ctx: Context) -> list[str] | str:
    return [sys.executable, str(Path(__file__).resolve()), "--dpkt-loop", str(ctx.capture)]


def _argus(ctx: Context) -> list[str] | str:
    return _need("argus") or ["argus", "-r", str(ctx.capture), "-w", str(ctx.tmp / "x.argus")]


def _nfpcapd(ctx: Context) -> list[str] | str:
    out = ctx.tmp / "nfpcapd"
    out.mkdir(exist_ok=True)
    return _need("nfpcapd") or ["nfpcapd", "-r", str(ctx.capture), "-w", str(out)]


def _softflowd(ctx: Context) -> list[str] | str:
    # Reads the file in the foreground and sends NetFlow v9 to a discard port on loopback.
    # No control socket ("-c none"): with one, softflowd 1.1.0 can hang at the file's end.
    args = ["-n", "127.0.0.1:9", "-v", "9", "-6", "-d", "-c", "none"]
    pid = str(ctx.tmp / "softflowd.pid")
    return _need("softflowd") or ["softflowd", "-r", str(ctx.capture), *args, "-p", pid]


TOOLS = [
    Tool("vspan", _vspan, untagged=True, note="vspan report --by flow --format json"),
    Tool(
        "vspan-parquet",
        partial(_vspan, fmt="parquet"),
        untagged=True,
        note="same, --format parquet (binary records, as argus -w and nfpcapd -w write)",
    ),
    Tool("tshark", _tshark, slow=True, note="-z conv,tcp -z conv,udp, all dissectors"),
    Tool("tshark-l2l4", _tshark_l2l4, slow=True, note="same, only " + ",".join(L2_L4[1:])),
    Tool("dpkt", _dpkt, note="plain dpkt loop, 5-tuples in a dict"),
    Tool("argus", _argus, untagged=True, note="argus -r -w: VN-tagged frames become MAC flows"),
    Tool("nfpcapd", _nfpcapd, untagged=True, note="nfpcapd -r -w: skips VN-tagged frames"),
    Tool("softflowd", _softflowd, untagged=True, note="NetFlow v9 to lo: skips VN-tagged frames"),
]


def measure(cmd: list[str], *, timeout: float, env: dict[str, str]) -> Result:
    """Wall-clock seconds and peak RSS of one run of ``cmd``."""
    timer = shutil.which("time") and Path("/usr/bin/time").exists()
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss_file:
        full = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd] if timer else cmd
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        proc = subprocess.Popen(
            full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
            proc.communicate()
            return Result(None, None, f"timeout after {timeout:.0f} s")
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return Result(None, None, f"failed (exit {proc.returncode}): {last[0][:80]}")
        if timer:
            text = Path(rss_file.name).read_text().strip().splitlines()
            rss_kb = float(text[-1]) if text and text[-1].isdigit() else float("nan")
        else:
            rss_kb = float(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
            rss_kb = rss_kb if rss_kb > before else float("nan")
    return Result(seconds, rss_kb / 1024, "ok")


def _ensure_capture(args: argparse.Namespace) -> tuple[Path, Path | None]:
    if args.capture:
        return args.capture, args.inventory
    out = REPO / "bench" / "out" / f"dc-{args.packets}-s{args.seed}.{args.format}"
    inventory = out.with_name(out.stem + ".inventory.yaml")
    if not out.exists() or not inventory.exists():
        gencap = [sys.executable, str(REPO / "bench" / "gencap.py"), "--untagged"]
        for opt in ("packets", "flows", "hosts", "vms", "seed", "format"):
            gencap += [f"--{opt}", str(getattr(args, opt))]
        subprocess.run([*gencap, "--out", str(out)], check=True)
    return out, inventory


def _count_packets(capture: Path) -> int | None:
    truth = capture.with_name(capture.stem + ".truth.parquet")
    if truth.exists():
        import pandas as pd

        return int(pd.read_parquet(truth, columns=["copies"])["copies"].sum())
    if shutil.which("capinfos"):
        out = subprocess.run(
            ["capinfos", "-c", "-M", "-T", "-r", str(capture)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return int(out[-1]) if out and out[-1].isdigit() else None
    return None


def table(rows: list[tuple[Tool, Result]], packets: int | None) -> str:
    base = next((r.seconds for t, r in rows if t.name == "vspan" and r.seconds), None)
    lines = [
        "| tool | seconds | packets/s | ratio to vspan | peak RSS MB | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for tool, r in rows:
        if r.seconds is None:
            lines.append(f"| {tool.name} | {r.status} | — | — | — | {tool.note} |")
            continue
        rate = f"{packets / r.seconds:,.0f}" if packets else "—"
        ratio = f"{r.seconds / base:.2f}" if base else "—"
        rss = "—" if r.rss_mb is None or r.rss_mb != r.rss_mb else f"{r.rss_mb:,.0f}"
        lines.append(f"| {tool.name} | {r.seconds:.2f} | {rate} | {ratio} | {rss} | {tool.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dpkt-loop", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--capture", type=Path, help="an existing capture (else one is generated)")
    p.add_argument("--inventory", type=Path, help="its inventory YAML")
    p.add_argument("--packets", type=int, default=1_000_000)
    p.add_argument("--flows", type=int, default=20_000)
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--vms", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--format", choices=["pcapng", "pcap"], default="pcapng")
    p.add_argument(
        "--tools",
        default=",".join(t.name for t in TOOLS),
        help="comma-separated subset of: " + ", ".join(t.name for t in TOOLS),
    )
    p.add_argument("--skip-slow", action="store_true", help="skip the tshark runs")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per tool")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.dpkt_loop:
        print(f"{dpkt_loop(args.dpkt_loop)} flows")
        return 0

    capture, inventory = _ensure_capture(args)
    packets = _count_packets(capture)
    wanted = set(args.tools.split(","))
    env = dict(os.environ)  # vspan as installed (./run.sh bench installs the checkout first)
    rows: list[tuple[Tool, Result]] = []
    with tempfile.TemporaryDirectory(prefix="vspan-bench-") as tmp:
        ctx = Context(capture=capture, inventory=inventory, tmp=Path(tmp), env=env)
        plain = capture.with_name(capture.stem + ".untagged" + capture.suffix)
        runs = [(t, ctx) for t in TOOLS if t.name in wanted]
        if plain.exists():
            runs += [
                (Tool(f"{t.name} (untagged copy)", t.build, note="the same frames without VN-Tags"),
                 dataclasses.replace(ctx, capture=plain))
                for t, _ in runs if t.untagged
            ]  # fmt: skip
        for tool, where in runs:
            if tool.slow and args.skip_slow:
                rows.append((tool, Result(None, None, "skipped (--skip-slow)")))
                continue
            cmd = tool.build(where)
            if isinstance(cmd, str):
                rows.append((tool, Result(None, None, cmd)))
                continue
            print(f"running {tool.name} ...", file=sys.stderr, flush=True)
            rows.append((tool, measure(cmd, timeout=args.timeout, env=env)))
    size = capture.stat().st_size / 1e6
    head = (
        f"capture: {capture.name}, {size:,.0f} MB, {packets:,} packets"
        if packets
        else f"capture: {capture.name}, {size:,.0f} MB"
    )
    text = f"{head}; {os.cpu_count()} CPUs\n\n{table(rows, packets)}\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
