"""``python -m vspan.aot``: compile the kernels ahead of time (see ``vspan._kernels``).

The build runs in a child process with numba (``VSPAN_KERNELS=jit``). It runs a workload
that goes through every path that calls kernels: ``vspan report`` over pcapng and classic
pcap, the engine's decode, endpoints and flow table (with expiry and eviction), pcap and
pcapng writing with comments, reading the comments back, the AF_PACKET ring walk, and the
sessions' packet filters. Each kernel is then exported for every argument types numba
compiled it for, with ``numba.pycc``, into
``<kernel cache>/<digest>/aot-<python>-numpy<major>/vspan_kernels.*.so``
(``_kernels.aot_dir``: one per interpreter and numpy C API), and a manifest maps (kernel,
argument types as ``_kernels.arg_key`` gives them) to its entry.

The entries release the GIL as the JIT kernels do (``nogil=True``), and are compiled for
this machine's CPU (the cache is per machine). A build takes about half a minute; it needs
a C compiler and Python's headers (pycc links a small C module). Without them vspan runs
the same kernels through numba.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from vspan._kernels import AOT_MODULE, CACHE, MODE_ENV, aot_dir, aot_files

__all__ = ["build", "main", "type_key"]


def type_key(t: Any) -> Hashable:
    """``_kernels.arg_key`` of a value numba types as ``t``; TypeError for types that have
    no such values (literals, omitted arguments, ...)."""
    types: Any = importlib.import_module("numba.core.types")
    as_dtype = importlib.import_module("numba.np.numpy_support").as_dtype
    if isinstance(t, types.Literal | types.Omitted):
        raise TypeError(f"no entry for {t}")
    if isinstance(t, types.Array):
        return (as_dtype(t.dtype).str, t.ndim, t.layout, t.mutable)
    if isinstance(t, types.IntEnumMember):
        return ("enum", t.instance_class.__qualname__)
    if isinstance(t, types.Boolean):
        return "bool"
    if isinstance(t, types.Integer | types.Float):
        return str(t)
    if isinstance(t, types.BaseNamedTuple):
        return (t.instance_class.__qualname__, *(type_key(x) for x in t.types))
    if isinstance(t, types.BaseTuple):
        return ("tuple", *(type_key(x) for x in t.types))
    raise TypeError(f"no entry for {t}")


def _workload(tmp: Path) -> None:
    """Call every kernel the way vspan does (numba compiles each for those types)."""
    import numpy as np

    from vspan.analysis.decode import decode_batch
    from vspan.analysis.endpoints import EndpointResolver
    from vspan.analysis.engine import Engine, EngineConfig, warm_up
    from vspan.analysis.flowkeys import usable
    from vspan.analysis.flows import FlowTable
    from vspan.analysis.report import analyze_captures
    from vspan.analysis.ring_comments import epb_comments
    from vspan.analysis.textrows import TEXT_FORMATS, text_blocks
    from vspan.collectors import _tpacket, bpf
    from vspan.inventory import Inventory
    from vspan.pcapfile import CaptureReader
    from vspan.pcapwrite import PcapngWriter
    from vspan.synth import generate_small, write_capture, write_inventory_yaml

    capture = generate_small()
    write_inventory_yaml(capture, tmp / "inventory.yaml")
    inventory = Inventory.load(str(tmp / "inventory.yaml"))
    for fmt in ("pcapng", "pcap"):
        write_capture(capture, tmp / f"sample.{fmt}", fmt)
        for inv in (inventory, None):
            report = analyze_captures([tmp / f"sample.{fmt}"], inventory=inv, chunk_bytes=1 << 16)
            for text in TEXT_FORMATS:
                b"".join(text_blocks(report.records, text))
    warm_up()
    table = FlowTable(initial_rows=2)  # grows, evicts, expires, flushes
    decoded = decode_batch(capture.frames)
    good = decoded.take(np.flatnonzero(usable(decoded)))
    table.update(good, EndpointResolver(inventory).resolve(good))
    table.evict(4)
    table.advance(int(capture.frames.ts_ns.max()) + (1 << 40))
    table.flush()
    engine = Engine(EngineConfig(max_flows=16))
    engine.process(capture.frames)
    engine.process(_fragments())
    engine.flush()
    _live(tmp, capture, inventory)
    frames = capture.frames
    with open(tmp / "comments.pcapng", "wb") as fh:
        writer = PcapngWriter(fh)
        writer.add_interface(name="vm")
        comments = [None if i % 3 else f"frame {i % 5}" for i in range(len(frames))]
        writer.write_batch(frames, iface=0, comments=comments)
    for batch in CaptureReader(tmp / "comments.pcapng"):
        epb_comments(batch)
    _tpacket._compile_kernels()
    bpf.warm_up()


def _live(tmp: Path, capture: Any, inventory: Any) -> None:
    """What the live analyzer runs beyond ``vspan report``: the packet ring (its index), the
    open flows copied and turned into records with their UUIDs, as the store writer does."""
    from vspan.analysis.decode import decode_batch
    from vspan.analysis.endpoints import EndpointResolver
    from vspan.analysis.engine import warm_batch
    from vspan.analysis.flows import FlowTable
    from vspan.analysis.records import HostNames, flow_table
    from vspan.analysis.ring import PacketRing
    from vspan.analysis.ring_feeder import compact

    ring = PacketRing(tmp / "ring", inventory=inventory)
    ring.start()
    for batch in (capture.frames, warm_batch()):
        ring.append(compact(batch), decode_batch(batch))
    ring.stop()
    table = FlowTable()
    decoded = decode_batch(capture.frames)
    table.update_rows(decoded, EndpointResolver(inventory).resolve(decoded))
    for rows in (table.open_rows(), table.flush_rows()):
        flow_table(rows.columns(), inventory=inventory, hosts=HostNames.from_inventory(inventory))


def _fragments() -> Any:
    """Two fragments of one UDP datagram (the flow table fills in the later one's ports)."""
    import dpkt

    from vspan.batch import FrameBatch

    udp = bytes(dpkt.udp.UDP(sport=5353, dport=53, data=b"x" * 24))
    frames = [
        dpkt.ip.IP(id=7, p=17, mf=more, offset=eighths, data=part, src=b"\n\0\0\1", dst=b"\n\0\0\2")
        for eighths, more, part in ((0, 1, udp[:16]), (2, 0, udp[16:]))
    ]
    eth = [bytes(dpkt.ethernet.Ethernet(src=b"\2" * 6, dst=b"\4" * 6, data=f)) for f in frames]
    return FrameBatch.from_frames(eth, ts_ns=[1, 2])


def _entries() -> list[tuple[str, Any, Any, Hashable]]:
    """(kernel, dispatcher, signature, key) of every compiled signature with plain types."""
    from vspan import _kernels

    out: list[tuple[str, Any, Any, Hashable]] = []
    for name, dispatcher in _kernels.jitted():
        for sig in dispatcher.signatures:
            try:
                key = ("tuple", *(type_key(t) for t in sig))
            except TypeError:
                continue
            out.append((name, dispatcher, sig, key))
    return out


def _compile(out: Path) -> int:
    """The child's work: run the workload, export every entry into ``out``."""
    pycc: Any = importlib.import_module("numba.pycc")
    compiler: Any = importlib.import_module("numba.pycc.compiler")

    class _NoGil(compiler.Flags):  # type: ignore[misc]
        """Flags whose entries release the GIL, as ``@kernel``'s ``nogil=True``."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.release_gil = True

    with tempfile.TemporaryDirectory() as tmp:
        _workload(Path(tmp))
    cc = pycc.CC(AOT_MODULE)
    cc.output_dir = str(out)
    cc.target_cpu = "host"
    manifest = []
    for i, (name, dispatcher, sig, key) in enumerate(_entries()):
        ret = dispatcher.overloads[sig].signature.return_type
        cc.export(f"e{i}", ret(*sig))(dispatcher.py_func)
        manifest.append({"kernel": name, "key": key, "export": f"e{i}"})
    setattr(compiler, "Flags", _NoGil)  # noqa: B010 - pycc builds its flags from this name
    cc.compile()
    (out / f"{AOT_MODULE}.json").write_text(json.dumps(manifest))
    return len(manifest)


def build(*, force: bool = False, quiet: bool = False) -> Path:
    """Build the AOT module for the current sources (unless built, or ``force``); return
    its directory."""
    here = CACHE
    if here is None:
        raise OSError("no writable place for the kernel cache")
    final = aot_dir(here)
    if not force and aot_files(here) is not None:
        if not quiet:
            print(f"vspan: kernels already compiled ahead of time in {final}")
        return final
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=here))
    try:
        env = {**os.environ, MODE_ENV: "jit"}
        done = subprocess.run(
            [sys.executable, "-m", "vspan.aot", "--into", str(staging)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building the kernels failed:\n{done.stderr[-4000:]}")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        took = time.monotonic() - started
        print(f"vspan: {done.stdout.strip()} kernel entries compiled in {took:.0f} s into {final}")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vspan.aot", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--force", action="store_true", help="build even if already built")
    parser.add_argument("--into", type=Path, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args(argv)
    if args.into is not None:
        print(_compile(args.into))
        return 0
    try:
        build(force=args.force, quiet=args.quiet)
    except (OSError, RuntimeError) as exc:
        print(
            f"vspan: no kernels compiled ahead of time ({exc}); numba compiles them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
