"""How many frames per second the analyzer's receive path takes over loopback UDP, lossless.

    python bench/analyzer_ingest.py                       # rates 2k..32k messages/s, 3 s each
    python bench/analyzer_ingest.py --rates 8000,16000 --seconds 2 --no-engine --flows 200000

A sender process replays pre-built tunnel messages of 64 synthetic frames each (``vspan.synth``
frames cut at ``--snaplen``, seq per collector patched in before each send, timestamps moved
on at each replay of the set) at a fixed rate to, in turn:

* ``bare``: a bare Python blocking ``recv_into`` loop that only counts datagrams (the ceiling);
* ``ingest``: ``UdpReceiver`` + ``ingest`` + ``Accounting`` (the receive path);
* ``engine``: the same + ``Engine.process`` (decode, endpoints, flow table).

Loss is what the sender sent minus what the receiver counted (kernel and backpressure drops
both show up there). The table gives the frames/s received at each rate and, per receiver,
the highest rate with zero loss and its ratio to the ceiling. Then the memory of the flow
table: ``FlowTable.memory_bytes`` (its arrays at their capacity) per open flow at
``--flows`` distinct flows, and the process RSS delta. Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import queue
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "support")]  # vspan itself as installed

from vspan.analysis.decode.columns import IPV4_MAPPED_PREFIX  # noqa: E402
from vspan.analysis.flows.endpoints import EndpointResolver, Endpoints  # noqa: E402
from vspan.analysis.flows.table import FlowTable  # noqa: E402
from vspan.analysis.ingest.accounting import Accounting  # noqa: E402
from vspan.analysis.ingest.messages import ingest  # noqa: E402
from vspan.analysis.ingest.receivers import Chunk, UdpReceiver  # noqa: E402
from vspan.analysis.service.engine import Engine, warm_up  # noqa: E402
from vspan.synth import generate  # noqa: E402
from vspan.wire.tunnel import encode_message  # noqa: E402
from vspan_testing.decoded import decoded  # noqa: E402

FRAMES_PER_MESSAGE = 64
MASK32 = 0xFFFF_FFFF
_SO_RCVBUFFORCE = 33
Templates = tuple[bytearray, list[int], list[int], list[int]]


def build_templates(messages: int, snaplen: int) -> Templates:
    """``messages`` tunnel messages of 64 frames from a synthetic capture, back to back."""
    cap = generate(
        packets=messages * FRAMES_PER_MESSAGE,
        flows=messages * 4,
        hosts=4,
        vms=64,
        seed=1,
        duration_s=20.0,
    )
    batch, host = cap.frames, cap.frames.host_column()
    out, cids = [], []
    for cid in np.unique(host).tolist():
        rows = np.flatnonzero(host == cid)
        for lo in range(0, rows.size - FRAMES_PER_MESSAGE + 1, FRAMES_PER_MESSAGE):
            sel = rows[lo : lo + FRAMES_PER_MESSAGE]
            frames = [batch.frame(int(i))[: snaplen or None] for i in sel]
            out.append((int(batch.ts_ns[sel[0]]), encode_message(
                collector_id=cid, boot_id=7, seq=0, frames=frames,
                ts_ns=batch.ts_ns[sel], orig_len=batch.origlen[sel],
            )))  # fmt: skip
            cids.append(cid)
    order = sorted(range(len(out)), key=lambda i: out[i][0])
    raw = bytearray(b"".join(out[i][1] for i in order))
    sizes = [len(out[i][1]) for i in order]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    return raw, offsets, sizes, [cids[i] for i in order]


def _ts_index(offsets: list[int]) -> npt.NDArray[np.int64]:
    """Byte positions of every record's ts_ns (one row of 8 per record)."""
    pos = np.concatenate([o + 24 + 12 * np.arange(FRAMES_PER_MESSAGE) for o in offsets])
    return pos[:, None] + np.arange(8)


def _shift_timestamps(raw: bytearray, idx: npt.NDArray[np.int64], shift: int) -> None:
    """Move every record's ts_ns on by ``shift`` (one vectorized pass over the set)."""
    buf = np.frombuffer(raw, np.uint8)
    ts = buf[idx].copy().view(">u8")[:, 0].astype(np.int64) + shift
    buf[idx] = ts.astype(">u8").view(np.uint8).reshape(-1, 8)


@dataclass(frozen=True)
class SendJob:
    """What the sender process sends: templates (buffer, offsets, sizes, collector ids)."""

    addr: tuple[str, int]
    rate: int
    seconds: float
    templates: Templates
    boot_id: int | None = None
    """Patched into every message (a new one per run: a collector that starts again takes a
    new boot, and an analyzer drops seqs it has seen in a boot as duplicates)."""
    start_ns: int = 0
    """Moves every timestamp on before the first send (runs into one analyzer go on in
    time, as live traffic does)."""


def sender(job: SendJob, ready: Any, done: Any) -> None:
    """Send ``job.rate`` messages/s for ``job.seconds``; put (sent, errors) on ``done``."""
    raw, offsets, sizes, cids = job.templates
    rate, seconds = job.rate, job.seconds
    span = 20 * 10**9
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(job.addr)
    view, seq, sent, errors, i = memoryview(raw), dict.fromkeys(cids, 0), 0, 0, 0
    if job.boot_id is not None:
        for o in offsets:
            struct.pack_into("!I", raw, o + 12, job.boot_id)
    ts_index = _ts_index(offsets)
    if job.start_ns:
        _shift_timestamps(raw, ts_index, job.start_ns)
    ready.set()
    start = time.monotonic()
    while (now := time.monotonic()) < start + seconds:
        due = min(int((now - start) * rate) - sent, 2000)
        if due <= 0:
            time.sleep(0.0002)
            continue
        for _ in range(due):
            o, cid = offsets[i], cids[i]
            struct.pack_into("!I", raw, o + 16, seq[cid] & MASK32)
            seq[cid] += 1
            try:
                sock.send(view[o : o + sizes[i]])
            except OSError:
                errors += 1
            sent += 1
            i += 1
            if i == len(offsets):
                i = 0
                _shift_timestamps(raw, ts_index, span)
    done.put((sent - errors, errors))


def bare_loop(sock: socket.socket, deadline: float) -> int:
    """The ceiling: count datagrams with one blocking recv_into each (kernel timeout)."""
    buf = bytearray(1 << 16)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 100_000))
    count = 0
    while time.monotonic() < deadline:
        try:
            sock.recv_into(buf)
            count += 1
        except OSError:
            continue
    return count


def receive_path(
    receiver: UdpReceiver, sink: queue.Queue[Chunk], deadline: float, *, engine: bool
) -> dict[str, int]:
    """Consume ``receiver``'s chunks: ingest + accounting (+ engine) until ``deadline``."""
    acc, eng = Accounting(), Engine() if engine else None
    while time.monotonic() < deadline or not sink.empty():
        try:
            chunk = sink.get(timeout=0.05)
        except queue.Empty:
            continue
        got = ingest(chunk.data, chunk.offsets, chunk.sizes)
        acc.update(got, now=chunk.received_at, kernel_drops=chunk.kernel_drops)
        if eng is not None:
            eng.process(got.frames)
        chunk.release()
    drops = receiver.kernel_drops() or 0
    receiver.stop()
    return {"received": acc.totals()["received"], "backpressure": receiver.backpressure_waits,
            "kernel_drops": drops, "rcvbuf": receiver.rcvbuf}  # fmt: skip


def run_rate(kind: str, rate: int, seconds: float, templates: Templates) -> dict[str, float]:
    """One receiver at one offered rate: what was sent and what was received."""
    sink: queue.Queue[Chunk] = queue.Queue()
    if kind == "bare":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        sock.bind(("127.0.0.1", 0))
        addr = sock.getsockname()
    else:
        receiver = UdpReceiver(("127.0.0.1", 0), sink=sink)
        receiver.start()
        addr = receiver.address
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    job = SendJob(addr, rate, seconds, templates)
    proc = ctx.Process(target=sender, args=(job, ready, done))
    proc.start()
    if not ready.wait(timeout=60):
        raise RuntimeError("the sender did not start")
    deadline = time.monotonic() + seconds + 1.0
    if kind == "bare":
        info = {"received": bare_loop(sock, deadline)}
        sock.close()
    else:
        info = receive_path(receiver, sink, deadline, engine=kind == "engine")
    sent, errors = done.get(timeout=60)
    proc.join(timeout=10)
    return {"sent": sent, "send_errors": errors, "seconds": seconds, **info}


def flow_memory(n: int) -> dict[str, float]:
    """Memory of ``n`` open flows in ``FlowTable`` (synthetic Decoded columns)."""
    i = np.arange(n, dtype=np.uint64)
    dec = decoded(
        n,
        ts_ns=np.arange(n, dtype=np.int64) * 1000,
        src_ip_lo=IPV4_MAPPED_PREFIX | (np.uint64(0x0A000000) + i // np.uint64(50000)),
        dst_ip_lo=IPV4_MAPPED_PREFIX | np.uint64(0xC0A80001),
        src_port=(i % np.uint64(50000)) + np.uint64(1024),
        dst_port=443,
        ip_proto=6,
    )
    eps = EndpointResolver().resolve(dec)
    warm = np.arange(8)  # load the compiled kernels first: their code is not flow memory
    FlowTable().update(dec.take(warm), Endpoints(eps.src[warm], eps.dst[warm]))
    gc.collect()
    rss0 = _rss()
    table = FlowTable()
    started = time.perf_counter()
    table.update(dec, eps)
    took = time.perf_counter() - started
    del dec, eps
    gc.collect()
    n = table.open_flows
    return {
        "flows": n,
        "table_bytes_per_flow": table.memory_bytes / n,
        "rss_delta_per_flow": (_rss() - rss0) / n,
        "update_s": took,
    }


def _rss() -> int:
    """Resident bytes, after handing freed heap memory back to the OS (``malloc_trim``):
    the batch's temporary columns are freed, but glibc keeps freed heap pages resident."""
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="2000,4000,8000,16000,24000,32000", help="messages/s")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--snaplen", type=int, default=128, help="0 keeps whole frames")
    ap.add_argument("--templates", type=int, default=2000, help="distinct messages replayed")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--flows", type=int, default=1_000_000)
    args = ap.parse_args()
    templates = build_templates(args.templates, args.snaplen)
    warm_up()  # load the compiled kernels, as the analyzer does before its receivers start
    mean = sum(templates[2]) / len(templates[2])
    kinds = ["bare", "ingest"] + ([] if args.no_engine else ["engine"])
    rates = [int(r) for r in args.rates.split(",")]
    best = dict.fromkeys(kinds, 0.0)
    print(f"messages of {FRAMES_PER_MESSAGE} frames, mean {mean:.0f} bytes "
          f"(snaplen {args.snaplen}), {args.seconds:g} s per rate\n")  # fmt: skip
    print(
        "| offered msg/s | offered frames/s | sent frames/s | "
        + " | ".join(f"{k} frames/s (loss)" for k in kinds)
        + " |"
    )
    print("|---:|---:|---:|" + "---:|" * len(kinds))
    for rate in rates:
        cells, sent = [], []
        for kind in kinds:
            r = run_rate(kind, rate, args.seconds, templates)
            lost = r["sent"] - r["received"]
            got = r["received"] * FRAMES_PER_MESSAGE / r["seconds"]
            sent.append(r["sent"] * FRAMES_PER_MESSAGE / r["seconds"])
            if lost == 0:
                best[kind] = max(best[kind], got)
            extra = "".join(
                f", {k} {int(r[k])}" for k in ("backpressure", "kernel_drops") if r.get(k)
            )
            cells.append(f"{got:,.0f} ({int(lost)}{extra})")
        head = f"| {rate:,} | {rate * FRAMES_PER_MESSAGE:,} | {min(sent):,.0f} | "
        print(head + " | ".join(cells) + " |", flush=True)
    print("\n| receiver | lossless frames/s | ratio to bare |")
    print("|---|---:|---:|")
    for kind in kinds:
        ratio = best[kind] / best["bare"] if best["bare"] else float("nan")
        print(f"| {kind} | {best[kind]:,.0f} | {ratio:.2f} |")
    m = flow_memory(args.flows)
    print("\n| open flows | table bytes/flow | RSS delta bytes/flow | update s |")
    print("|---:|---:|---:|---:|")
    cells = [
        f"{m['flows']:,}",
        f"{m['table_bytes_per_flow']:.0f}",
        f"{m['rss_delta_per_flow']:.0f}",
    ]
    print("| " + " | ".join([*cells, f"{m['update_s']:.2f}"]) + " |")


if __name__ == "__main__":
    main()
