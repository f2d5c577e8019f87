"""Write a synthetic VN-tagged datacenter capture with its inventory and ground truth.

    python bench/gencap.py --packets 1000000 --flows 20000 --hosts 8 --vms 300 --seed 1 \\
        --out bench/out/dc.pcapng [--format pcap]

writes ``dc.pcapng`` (or ``.pcap``), ``dc.inventory.yaml`` and ``dc.truth.parquet`` beside
it. The same arguments always give the same bytes. ``--untagged`` also writes
``dc.untagged.pcapng``: the same frames without their VN-Tag, for flow exporters that cannot
decode one (argus, nfpcapd, softflowd) and would otherwise see no IP traffic at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from vspan.analysis.decode import decode_batch
from vspan.analysis.ring.export import strip_tags
from vspan.batch import FrameBatch
from vspan.synth import generate, write_capture, write_inventory_yaml


def untag(batch: FrameBatch) -> FrameBatch:
    """The frames without their VN-Tag (what the VM ports saw)."""
    return strip_tags(batch, decode_batch(batch), np.arange(len(batch), dtype=np.int64))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packets", type=int, default=1_000_000, help="frames in the capture")
    p.add_argument("--flows", type=int, default=20_000)
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--vms", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=50.0, help="seconds flows start within")
    p.add_argument("--out", type=Path, default=Path("bench/out/dc.pcapng"))
    p.add_argument(
        "--format",
        choices=["pcapng", "pcap"],
        default=None,
        help="default: from the --out suffix, else pcapng",
    )
    p.add_argument("--untagged", action="store_true", help="also write an untagged copy")
    return p


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fmt = args.format or ("pcap" if args.out.suffix == ".pcap" else "pcapng")
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    inventory = stem.with_name(stem.name + ".inventory.yaml")
    truth = stem.with_name(stem.name + ".truth.parquet")

    t0 = time.perf_counter()
    capture = generate(
        packets=args.packets,
        flows=args.flows,
        hosts=args.hosts,
        vms=args.vms,
        seed=args.seed,
        duration_s=args.duration,
    )
    t1 = time.perf_counter()
    write_capture(capture, out, fmt=fmt)
    t2 = time.perf_counter()
    write_inventory_yaml(capture, inventory)
    capture.truth.to_parquet(truth, index=True)

    t = capture.truth
    frames = capture.frames
    print(
        f"generated {len(frames):,} frames in {len(t):,} flows, {len(capture.hosts)} hosts, "
        f"{len(capture.vms)} VMs (seed {args.seed}) in {t1 - t0:.1f} s"
    )
    print(
        f"  mean frame {frames.origlen.mean():.0f} B; scopes (flows): "
        + ", ".join(f"{k} {v}" for k, v in t.scope.value_counts().items())
    )
    print(f"wrote {out} ({fmt}, {_mb(out)}) in {t2 - t1:.1f} s")
    print(f"wrote {inventory} ({_mb(inventory)})")
    print(f"wrote {truth} ({_mb(truth)})")
    if args.untagged:
        plain = stem.with_name(stem.name + ".untagged" + out.suffix)
        stripped = dataclasses.replace(capture, frames=untag(capture.frames))
        write_capture(stripped, plain, fmt=fmt)
        print(f"wrote {plain} (the same frames without VN-Tags, {_mb(plain)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
