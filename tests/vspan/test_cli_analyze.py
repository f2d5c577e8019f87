"""``vspan analyze`` as a subprocess: a collector registers through the control plane, sends
over the tunnel, and the store and the exit line say what was stored.

Regression (issue 17, point 1): VMs a collector discovered behind a Linux bridge have no
UUID. Their flows reached the store with ``src_vm_uuid = ""``, the cast to UUID failed the
whole append — the flows of the VM that had a UUID went with them — and at exit the
analyzer printed "N flows stored" (flows finished) over a table of 0 rows.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from vspan.analysis.store import Store
from vspan.collectors.control_client import ControlClient
from vspan.collectors.model import Port
from vspan.tunnel import encode_message
from vspan.vntag import VnTag, encode_vntag
from vspan_testing.analyzer_proc import AnalyzerProcess

CID = 7
T0 = 1_700_000_000 * 10**9
UUID_C = "6f1c2d9e-0000-4000-8000-00000000000c"
VMS = {  # name: (port, vif, MAC, IPv4, UUID); a and b found behind a bridge, c by libvirt
    "a": ("vm-a", 1, 0x0277_0000_0101, "10.77.1.1", None),
    "b": ("vm-b", 2, 0x0277_0000_0102, "10.77.1.2", None),
    "c": ("vnet0", 3, 0x0277_0000_0103, "10.77.1.3", UUID_C),
}


def udp_frame(src: str, dst: str, sport: int, payload: int) -> bytes:
    """A VN-tagged UDP frame from VM ``src`` to VM ``dst`` as this host's collector tags it
    (both local: ``d=0``, ``svif``/``dvif`` their vifs)."""
    s, d = VMS[src], VMS[dst]
    udp = struct.pack("!HHHH", sport, 9000, 8 + payload, 0) + bytes(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton(s[3]), socket.inet_aton(d[3]))  # fmt: skip
    tag = encode_vntag(VnTag(d=0, svif=s[1], dvif=d[1], ethertype=0x0800))
    return d[2].to_bytes(6, "big") + s[2].to_bytes(6, "big") + b"\x89\x26" + tag + ip + udp


def test_flows_of_vms_without_a_uuid_are_stored_and_the_exit_line_counts_rows(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    analyzer = AnalyzerProcess(
        ["--udp", "127.0.0.1:0", "--tcp", "off", "--http", "127.0.0.1:0", "--data-dir", str(data)],
        stderr_path=tmp_path / "analyze.stderr",
    ).wait_started()
    # (src, dst, source port, packets): 3 flows, one of them with the VM that has a UUID
    sent = [("a", "b", 40001, 3), ("b", "a", 40002, 2), ("a", "c", 40003, 4)]
    try:
        ports = [Port(p, 0, vif, mac, name, uuid) for name, (p, vif, mac, _, uuid) in VMS.items()]
        ControlClient(analyzer.api, CID).register("hv07", ports)
        frames = [
            udp_frame(src, dst, sport, 10 + i) for src, dst, sport, n in sent for i in range(n)
        ]
        message = encode_message(
            collector_id=CID, boot_id=1, seq=0, frames=frames,
            ts_ns=[T0 + 1000 * i for i in range(len(frames))],
        )  # fmt: skip
        assert analyzer.udp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, analyzer.udp)
    finally:
        summary = analyzer.stop()  # SIGTERM: every open flow is finished and written
    with Store(data, read_only=True) as store:
        flows = store.query_flows(limit=None, order="src_port")
    assert [(f.src_vm, f.dst_vm, f.src_port, f.packets) for f in flows.itertuples()] == sent
    uuids = flows[["src_vm_uuid", "dst_vm_uuid"]].astype(object)
    assert uuids.where(uuids.notna(), None).values.tolist() == [
        [None, None], [None, None], [None, UUID_C]
    ]  # fmt: skip
    assert summary.frames == len(frames)
    assert summary.stored == len(flows) == len(sent)  # the exit line counts stored rows
    assert (summary.finished, summary.not_stored) == (len(sent), 0), summary.line
