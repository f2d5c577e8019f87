"""Inventory: lookups by (host, vif) and MAC, and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vspan.errors import ConfigError
from vspan.inventory import Inventory

GOOD = """\
hosts:
  - name: hv01
    collector_id: 1
  - name: hv02
    collector_id: 2
vms:
  - name: web-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000001
    host: hv01
    profile: web
    nics:
      - mac: "52:54:00:00:00:01"
        vif: 1
        ips: ["10.1.0.1"]
      - mac: "52:54:00:00:01:01"
        vif: 2
  - name: db-01
    uuid: 6f1c2d9e-0000-4000-8000-000000000002
    host: hv02
    nics:
      - mac: "52:54:00:00:00:02"
        vif: 1
"""


def test_vif_and_mac_resolve_to_vms() -> None:
    inv = Inventory.loads(GOOD)
    web = inv.resolve_vif(1, 2)
    assert web is not None
    assert web.name == "web-01"
    assert web.profile == "web"
    assert inv.resolve_vif(2, 1) is not None
    assert inv.resolve_vif(2, 1).name == "db-01"  # type: ignore[union-attr]
    assert inv.resolve_vif(1, 0) is None
    assert inv.resolve_vif(3, 1) is None
    assert inv.resolve_mac(0x525400000002).name == "db-01"  # type: ignore[union-attr]
    assert inv.resolve_mac(0x525400000099) is None
    assert inv.vm("6f1c2d9e-0000-4000-8000-000000000002").name == "db-01"  # type: ignore[union-attr]
    assert inv.host_by_id(2).name == "hv02"  # type: ignore[union-attr]


def test_vectorized_lookups_agree_with_single_ones() -> None:
    inv = Inventory.loads(GOOD)
    nics = inv.resolve_vifs(np.array([1, 1, 2, 2, 1]), np.array([1, 2, 1, 2, 0]))
    vm_of = inv.nic_vm()
    names = [inv.vms[vm_of[n]].name if n >= 0 else None for n in nics]
    assert names == ["web-01", "web-01", "db-01", None, None]
    by_mac = inv.resolve_macs(np.array([0x525400000101, 0x525400000001, 7], dtype=np.uint64))
    host, vif = inv.nic_host_vif()
    assert [(int(host[n]), int(vif[n])) for n in by_mac[:2]] == [(1, 2), (1, 1)]
    assert by_mac[2] == -1


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(GOOD)
    assert [v.name for v in Inventory.load(str(path)).vms] == ["web-01", "db-01"]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "vif: 2",
            "vif: 1",
            r"inv\.yaml:16: vms\[0\]\.nics\[1\]\.vif: vif 1 already used on host 'hv01'",
        ),
        (
            "vif: 2",
            "vif: 4096",
            r"inv\.yaml:16: vms\[0\]\.nics\[1\]\.vif: 4096 out of range 1\.\.4095",
        ),
        (
            '"52:54:00:00:01:01"',
            '"52:54:00:00:00:01"',
            r"inv\.yaml:15: vms\[0\]\.nics\[1\]\.mac: MAC 52:54:00:00:00:01 already belongs to a VM",
        ),
        (
            '"52:54:00:00:01:01"',
            "nonsense",
            r"inv\.yaml:15: vms\[0\]\.nics\[1\]\.mac: expected a MAC address like",
        ),
        ("host: hv02", "host: hv09", r"inv\.yaml:19: vms\[1\]\.host: unknown host 'hv09'"),
        (
            "collector_id: 2",
            "collector_id: 1",
            r"inv\.yaml:5: hosts\[1\]\.collector_id: duplicate collector_id 1",
        ),
        (
            "collector_id: 2",
            "collector_id: 0",
            r"inv\.yaml:5: hosts\[1\]\.collector_id: 0 out of range",
        ),
        (
            "uuid: 6f1c2d9e-0000-4000-8000-000000000002",
            "uuid: nope",
            r"inv\.yaml:18: vms\[1\]\.uuid: expected a UUID, got 'nope'",
        ),
        ("    profile: web", "    profil: web", r"inv\.yaml:10: vms\[0\]\.profil: unknown field"),
        (
            '        ips: ["10.1.0.1"]',
            '        ips: ["10.1.0.300"]',
            r"inv\.yaml:14: vms\[0\]\.nics\[0\]\.ips\[0\]: expected an IP address, got '10\.1\.0\.300'",
        ),
        ("  - name: db-01", "  - name: web-01", r"inv\.yaml:17: vms\[1\]\.name: duplicate VM name"),
        ("vms:", "vms: [", r"inv\.yaml:\d+: YAML syntax"),
    ],
)
def test_errors_name_file_line_and_field(old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        Inventory.loads(GOOD.replace(old, new, 1), "inv.yaml")


def test_missing_field_and_missing_file() -> None:
    text = GOOD.replace("    host: hv01\n", "", 1)
    with pytest.raises(ConfigError, match=r"inv\.yaml:7: vms\[0\]: missing required field 'host'"):
        Inventory.loads(text, "inv.yaml")
    with pytest.raises(ConfigError, match=r"/nonexistent/inv\.yaml: cannot read"):
        Inventory.load("/nonexistent/inv.yaml")
