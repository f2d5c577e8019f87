"""Tests of vspan.collectors.control.sync: the registration kept true, whatever the
analyzer does — not up yet, restarted (404), refusing (409) — with backoff and rate-limited
logs. The control plane is a fake that answers as the real one does (its errors are
``ControlError`` with the HTTP status); the real one is in ``tests/lab/test_control_e2e.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from vspan.collectors.control.client import ControlError
from vspan.collectors.control.sync import ControlSync, ControlSyncConfig
from vspan.inventory import Port

PORTS = [Port("vnet0", 11, 1, 0x525400000001, "web-01", None, "web", "br0")]
REFUSED = ControlError("connection refused (is the analyzer running?)")
FORGOTTEN = ControlError("HTTP 404 Not Found: collector 11 is not registered", status=404)


class Plane:
    """A control plane: ``down`` refuses connections; ``known`` is whether it has a
    registration of the collector (a restart forgets it)."""

    def __init__(self) -> None:
        self.down = False
        self.known = False
        self.conflict: str | None = None
        self.calls: list[str] = []
        self.ports: list[list[Port]] = []
        """The ports of each registration that reached it."""

    def register(self, host_name: str, ports: Sequence[Port]) -> dict[str, Any]:
        self.calls.append(f"register {host_name}")
        self.ports.append(list(ports))
        if self.down:
            raise REFUSED
        if self.conflict is not None:
            raise ControlError(f"HTTP 409 Conflict: {self.conflict}", status=409)
        self.known = True
        return {"sessions": [], "sessions_total": 0}

    def session_state(self) -> dict[str, Any]:
        self.calls.append("sessions")
        if self.down:
            raise REFUSED
        if not self.known:
            raise FORGOTTEN
        return {"sessions": [], "sessions_total": 1, "registered": True}

    def heartbeat(self, counters: dict[str, Any]) -> None:
        self.calls.append("heartbeat")
        if self.down:
            raise REFUSED
        if not self.known:
            raise FORGOTTEN

    def restart(self) -> None:
        self.known = False


def sync(plane: Plane) -> ControlSync:
    return ControlSync(plane, ControlSyncConfig(retry_initial_s=2.0, retry_max_s=10.0,
                                                log_every_n=10, log_every_s=60.0))  # fmt: skip


def test_a_first_registration_refused_is_retried_with_backoff_until_it_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Repro B: the collector starts before the analyzer."""
    plane = Plane()
    plane.down = True
    s = sync(plane)
    caplog.set_level("WARNING", logger="vspan.collectors.control.sync")
    attempts = []
    for now in range(40):  # one refresh a second
        before = len(plane.calls)
        assert s.refresh(float(now), "hv01", PORTS, changed=now == 0) is None
        if len(plane.calls) > before:
            attempts.append(now)
    assert attempts == [0, 2, 6, 14, 24, 34]  # waits 2, 4, 8, then at most 10 s
    assert (s.registered, s.errors) == (False, {"register": 6})
    assert len(caplog.records) == 1  # the first; the next at the 10th or after a minute
    assert caplog.records[0].getMessage() == (
        "control plane: cannot register host 'hv01' (next attempt in 2 s): connection refused "
        "(is the analyzer running?)"
    )
    plane.down = False
    assert s.refresh(40.0, "hv01", PORTS, changed=False) is None  # not due before 44
    assert s.refresh(44.0, "hv01", PORTS, changed=False) == {"sessions": [], "sessions_total": 0}
    assert (s.registered, s.registrations) == (True, 1)
    assert caplog.records[-1].getMessage() == (
        "control plane: registered host 'hv01' with 1 VM ports (after 6 failed attempts)"
    )
    assert s.refresh(45.0, "hv01", PORTS, changed=False)["sessions_total"] == 1  # type: ignore[index]


def test_an_analyzer_that_forgot_the_collector_gets_a_new_registration_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Repro A: the analyzer restarted; its sessions answer is a 404 'not registered'."""
    plane = Plane()
    s = sync(plane)
    s.refresh(0.0, "hv01", PORTS, changed=True)
    plane.restart()
    plane.calls.clear()
    caplog.set_level("WARNING", logger="vspan.collectors.control.sync")
    reply = s.refresh(2.0, "hv01", PORTS, changed=False)
    assert plane.calls == ["sessions", "register hv01"]  # the same refresh registers again
    assert reply == {"sessions": [], "sessions_total": 0}  # its sessions are applied
    assert (s.registered, s.registrations) == (True, 2)
    assert "registering again" in caplog.records[0].getMessage()
    plane.calls.clear()
    s.refresh(4.0, "hv01", PORTS, changed=False)
    assert plane.calls == ["sessions"]  # registered: no more registrations


def test_a_heartbeat_answered_404_registers_at_the_next_refresh() -> None:
    plane = Plane()
    s = sync(plane)
    s.refresh(0.0, "hv01", PORTS, changed=True)
    plane.restart()
    s.heartbeat(1.0, {"time": 1.0})
    assert s.registered is False
    plane.calls.clear()
    s.refresh(1.5, "hv01", PORTS, changed=False)
    assert plane.calls == ["register hv01"]
    assert s.registered is True


def test_registered_false_from_an_analyzer_with_an_inventory_file() -> None:
    """A restarted analyzer whose inventory file names the host answers the sessions (200)
    but says it has no registration: the collector registers its ports again."""
    plane = Plane()
    s = sync(plane)
    s.refresh(0.0, "hv01", PORTS, changed=True)
    plane.session_state = lambda: {"sessions": [], "sessions_total": 0, "registered": False}  # type: ignore[method-assign]
    plane.calls.clear()
    s.refresh(2.0, "hv01", PORTS, changed=False)
    assert plane.calls == ["register hv01"]


def test_a_refused_registration_is_retried_and_a_rename_gets_through() -> None:
    """409 (the host name is another collector's): retried with backoff, so that once the
    other collector is renamed or removed this one registers without a restart."""
    plane = Plane()
    plane.conflict = "host 'vm' belongs to collector 22, not 11"
    s = sync(plane)
    assert s.refresh(0.0, "vm", PORTS, changed=True) is None
    assert s.errors == {"register": 1}
    plane.conflict = None
    assert s.refresh(1.0, "vm", PORTS, changed=False) is None  # backoff
    assert s.refresh(2.0, "vm", PORTS, changed=False) is not None
    assert s.registered


def test_sessions_failing_for_another_reason_keep_the_registration() -> None:
    plane = Plane()
    s = sync(plane)
    s.refresh(0.0, "hv01", PORTS, changed=True)
    plane.down = True
    assert s.refresh(2.0, "hv01", PORTS, changed=False) is None
    assert s.registered  # a connection refused says nothing about the registration
    assert s.errors == {"sessions": 1}


def test_ports_the_analyzer_was_not_told_are_registered_whatever_the_collector_saw() -> None:
    """A VM MAC learned from traffic is applied by the collector between two refreshes, so
    at the refresh its ports look unchanged to it: what counts is what the analyzer was told
    (on main, such a MAC never reached the analyzer)."""
    plane = Plane()
    s = sync(plane)
    bare = [Port("tap0", 11, 1, 0, "tap0", bridge="br0")]
    assert s.refresh(0.0, "hv01", bare, changed=True) is not None
    learned = [replace(bare[0], mac=0x525400000001)]
    assert s.refresh(2.0, "hv01", learned, changed=False) is not None
    assert plane.calls == ["register hv01", "register hv01"]
    assert plane.ports[-1] == learned
    s.refresh(4.0, "hv01", learned, changed=False)  # told already: only the sessions
    assert plane.calls[-1] == "sessions"
    plane.down = True
    again = [replace(bare[0], mac=0x525400000002)]
    s.refresh(6.0, "hv01", again, changed=False)  # refused: not told, tried again later
    assert s.reported == ("hv01", tuple(learned))
    plane.down = False
    assert s.refresh(7.0, "hv01", again, changed=False) is None  # the backoff: 2 s
    assert s.refresh(8.0, "hv01", again, changed=False) is not None
    assert plane.ports[-1] == again
    assert s.reported == ("hv01", tuple(again))
