"""A SPAN session that selects VMs by port-profile, where the profile comes from the
analyzer's profiles file (not from the vswitch port): the collector gets it with those VMs
named, so it mirrors them. Real analyzer, real HTTP (uvicorn), the control plane as a
collector calls it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from vspan.analysis.service.analyzer import Analyzer
from vspan.analysis.service.config import AnalyzerConfig
from vspan.api.server import HttpServer, create_app
from vspan.inventory import Port
from vspan.sessions import SessionSet


def _call(base: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"},
        method=method,
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        out: dict[str, Any] = json.loads(response.read() or b"{}")
        return out


def test_a_session_by_a_profile_of_the_profiles_file_selects_those_vms_on_the_collector(
    tmp_path: Path,
) -> None:
    # Regression: sessions matched a VM's profile only as its vswitch port reported it; a
    # VM bound to a profile by the analyzer's --profiles file (a Linux bridge port has none)
    # was never selected, and its host forwarded nothing.
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  - {name: web, default: permit, vms: ['web-*']}\n")
    analyzer = Analyzer(AnalyzerConfig(udp="127.0.0.1:0", tcp=None, data_dir=str(tmp_path / "d"),
                                       profiles=str(profiles)))  # fmt: skip
    analyzer.start()
    server = HttpServer(create_app(analyzer), "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        _call(base, "POST", "/api/v1/sessions", {"name": "web-only", "profiles": ["web"]})
        ports = [{"name": "veth1", "vif": 1, "vm_name": "web-1"},
                 {"name": "veth2", "vif": 2, "vm_name": "db-1"}]  # fmt: skip
        answer = _call(base, "POST", "/api/v1/control/collectors/5/register",
                       {"host": "hv5", "ports": ports})  # fmt: skip
    finally:
        server.stop()
        analyzer.stop()
    (session,) = answer["sessions"]
    assert session["name"] == "web-only"
    # what the collector does with it: its ports carry no profile
    pushed = SessionSet.from_json_value(answer["sessions"])
    mine = [Port("veth1", 0, 1, 0, "web-1"), Port("veth2", 0, 2, 0, "db-1")]
    assert [p.vm_name for p in mine if pushed.sessions[0].matches(p)] == ["web-1"]
