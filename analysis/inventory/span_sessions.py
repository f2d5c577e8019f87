"""The analyzer's SPAN sessions: kept in memory, persisted to ``DATA_DIR/sessions.json``.

The API creates, replaces and deletes sessions (JSON objects with the fields of
``vspan.sessions``); each is validated by ``SessionSet`` before it is kept, so a
collector never receives a session it would refuse. ``sessions_for(host, vms)`` is the
control plane's provider: the sessions selecting any of the VMs of a host, and ``count()``
how many exist for all hosts (a collector none of whose VMs is selected then mirrors
nothing). Every change is
written to a temporary file and renamed over ``sessions.json`` (a crash leaves the old or
the new list, never half of one).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vspan.errors import ConfigError, VspanError
from vspan.inventory import Host, Port, Vm
from vspan.sessions import Session, SessionSet

__all__ = ["SessionConflictError", "SessionStore", "UnknownSessionError"]


class UnknownSessionError(VspanError, LookupError):
    """No session has this name."""


class SessionConflictError(VspanError):
    """A session with this name exists already (or a body renames one)."""


def _validate(doc: Mapping[str, Any]) -> tuple[dict[str, Any], Session]:
    """The session as kept (its JSON, UUIDs made canonical by the parser) and parsed;
    ``ConfigError`` naming the session's field (``filter``, ``vms[1]``) if it is invalid."""
    try:
        parsed = SessionSet.from_json_value([dict(doc)], origin="<session>").sessions[0]
    except ConfigError as exc:  # the line is the re-encoded JSON's: keep the field only
        where = str(ConfigError("", path=exc.path, line=exc.line, field=exc.field))
        field = (exc.field or "").removeprefix("[0]").removeprefix(".") or None
        raise ConfigError(str(exc).removeprefix(where), field=field) from exc
    kept = dict(doc)
    if parsed.vms:
        kept["vms"] = list(parsed.vms)
    return kept, parsed


class SessionStore:
    """SPAN sessions by name, in creation order; ``load()`` then change them through the API."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        """``sessions.json``; None keeps them in memory only."""
        self._docs: dict[str, dict[str, Any]] = {}
        self._parsed: dict[str, Session] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read ``sessions.json`` when it exists; ``ConfigError`` naming the file if invalid."""
        if self.path is None or not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        parsed = SessionSet.loads_json(text, origin=str(self.path))
        docs = json.loads(text)
        docs = docs["sessions"] if isinstance(docs, dict) else docs
        with self._lock:
            self._docs = {
                s.name: _validate(d)[0] for s, d in zip(parsed.sessions, docs, strict=True)
            }
            self._parsed = {s.name: s for s in parsed.sessions}

    def all(self) -> list[dict[str, Any]]:
        """Every session's JSON, in creation order."""
        with self._lock:
            return [dict(d) for d in self._docs.values()]

    def count(self) -> int:
        """How many sessions there are (the control plane tells collectors: while any
        exists, a collector mirrors only what its sessions select)."""
        with self._lock:
            return len(self._docs)

    def get(self, name: str) -> dict[str, Any]:
        """The session called ``name``; ``UnknownSessionError`` if none."""
        with self._lock:
            if name not in self._docs:
                raise UnknownSessionError(f"no SPAN session named {name!r}")
            return dict(self._docs[name])

    def create(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Add a session; ``ConfigError`` if invalid, ``SessionConflictError`` if taken."""
        kept, parsed = _validate(doc)
        with self._lock:
            if parsed.name in self._docs:
                raise SessionConflictError(f"a SPAN session named {parsed.name!r} exists already")
            self._docs[parsed.name], self._parsed[parsed.name] = kept, parsed
            self._save()
        return dict(kept)

    def replace(self, name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the session ``name`` (the body's ``name``, when given, must be the same)."""
        body = {"name": name, **doc}
        if body["name"] != name:
            raise SessionConflictError(f"the body names {body['name']!r}, the path {name!r}")
        kept, parsed = _validate(body)
        with self._lock:
            if name not in self._docs:
                raise UnknownSessionError(f"no SPAN session named {name!r}")
            self._docs[name], self._parsed[name] = kept, parsed
            self._save()
        return dict(kept)

    def delete(self, name: str) -> None:
        """Remove the session ``name``; ``UnknownSessionError`` if none."""
        with self._lock:
            if name not in self._docs:
                raise UnknownSessionError(f"no SPAN session named {name!r}")
            del self._docs[name], self._parsed[name]
            self._save()

    def sessions_for(
        self,
        host: Host,
        vms: Sequence[Vm],
        profile_of: Callable[[Vm], str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """The sessions that select at least one of ``vms`` (the control plane's provider).

        A VM's port-profile is ``profile_of(vm)`` (the analyzer's: its profiles file binds
        VMs to profiles), else the inventory's. A collector only knows the profiles its
        vswitch ports carry, so a session that selects VMs by profile is sent with those VMs
        also named in its ``vms``: it selects on the collector what it selects here."""
        ports = [
            Port(f"vm{k}", 0, 1, 0, vm.name, vm.uuid, (profile_of(vm) if profile_of else None)
                 or vm.profile)
            for k, vm in enumerate(vms)
        ]  # fmt: skip
        out = []
        with self._lock:
            for name, session in self._parsed.items():
                chosen = [port.vm_name for port in ports if session.matches(port)]
                if not chosen:
                    continue
                doc = dict(self._docs[name])
                if session.profiles:
                    named = list(doc.get("vms") or [])
                    doc["vms"] = named + [vm for vm in chosen if vm not in named]
                out.append(doc)
        return out

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"sessions": list(self._docs.values())}, indent=1) + "\n")
        os.replace(tmp, self.path)
