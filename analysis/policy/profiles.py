"""Port-profiles: the model, loading from YAML, and binding VMs to profiles.

File format (see ``docs/policy.md``)::

    profiles:
      - name: db
        description: PostgreSQL servers
        default: deny                # permit | deny; deny when left out (NX-OS's implicit deny)
        vms: [db-*]                  # names, UUIDs or fnmatch patterns (optional)
        rules:
          - permit tcp profile:app any eq 5432          # one-line form
          - action: permit                              # mapping form
            protocol: tcp
            source: profile:backup
            ports: [873, "range 8000 8010"]
            name: backups

Everything is validated when loaded; every error is a ``PolicyError`` naming the file, the
line, the field, the profile and the rule (``profiles.yaml:14: profiles[1].rules[2]: profile
'web' rule 3: unknown protocol 'tpc'``). What depends on the inventory — VM patterns that
match nothing, conflicting bindings — is reported by ``bind`` as warnings, since VMs come and
go.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Final

from vspan.analysis.policy.acl import (
    ANY,
    Action,
    Address,
    PortMatch,
    ProfileRef,
    Rule,
    VmRef,
    check_rule,
    parse_address,
    parse_icmp,
    parse_ports,
    parse_protocol,
    parse_rule,
)
from vspan.errors import ConfigError, PolicyError
from vspan.inventory import InventoryView
from vspan.yamlconf import Node, load, load_file

__all__ = ["Bindings", "Origin", "PolicySet", "Profile", "bind", "load_policy", "loads_policy"]

_NAME: Final = re.compile(r"[\w.-]+")
_PATTERN: Final = re.compile(r"[*?\[]")
"""What makes a ``vms`` entry an fnmatch pattern rather than a name or UUID."""
_ACTIONS: Final = {a.value for a in Action}


def _action(node: Node) -> Action:
    if not isinstance(node.value, str) or node.value not in _ACTIONS:
        raise node.error(f"expected 'permit' or 'deny', got {node.value!r}")
    return Action(node.value)


def _list(node: Node, key: str) -> list[Node]:
    """The items of an optional list (left out or empty: none)."""
    return list(node.get(key).items()) if node.has(key) and node.value[key] is not None else []


_RULE_FIELDS: Final = {"action", "protocol", "source", "destination", "ports", "source_ports"} | {
    "icmp_type",
    "icmp_code",
    "name",
    "remark",
}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a value was written."""

    path: str
    """The file."""
    line: int
    """1-based line."""
    field: str
    """Dotted field path, e.g. ``profiles[1].rules[2]``."""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}"


@dataclass(frozen=True, slots=True)
class Profile:
    """A port-profile: an ordered ACL with a default, bound to VMs."""

    name: str
    """Unique in its file; letters, digits, ``_``, ``.`` and ``-``."""
    description: str
    """Free text ("" when left out)."""
    default: Action
    """What happens to a flow no rule matches."""
    rules: tuple[Rule, ...]
    """In order; the first that matches decides."""
    vms: tuple[str, ...]
    """VM names, UUIDs or fnmatch patterns bound to this profile (besides the inventory's)."""
    origin: Origin
    """Where the profile starts."""
    rule_origins: tuple[Origin, ...]
    """Where each rule was written."""
    vm_origins: tuple[Origin, ...]
    """Where each ``vms`` entry was written."""


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The profiles of one file."""

    profiles: tuple[Profile, ...]
    """In file order."""
    path: str
    """The file they came from."""

    def profile(self, name: str) -> Profile | None:
        """The profile called ``name``."""
        return next((p for p in self.profiles if p.name == name), None)


# --- loading ----------------------------------------------------------------------------------


@contextmanager
def _context(prefix: str) -> Iterator[None]:
    """Re-raise any ``ConfigError`` as a ``PolicyError`` whose message starts with ``prefix``
    (e.g. ``profile 'web' rule 3: ``), keeping its file, line and field."""
    try:
        yield
    except ConfigError as exc:
        where = str(ConfigError("", path=exc.path, line=exc.line, field=exc.field))
        bare = str(exc).removeprefix(where) if where else str(exc)
        message = f"{prefix}{bare}" if prefix else bare
        raise PolicyError(message, path=exc.path, line=exc.line, field=exc.field) from None


@contextmanager
def _at(node: Node) -> Iterator[None]:
    """A location-less ``PolicyError`` raised inside becomes one at ``node``."""
    try:
        yield
    except PolicyError as exc:
        if exc.path is not None:
            raise
        raise PolicyError(str(exc), path=node.path, line=node.line, field=node.field) from None


def _origin(node: Node) -> Origin:
    return Origin(node.path, node.line, node.field)


def _ports(node: Node, protocol: int | None) -> tuple[PortMatch, ...]:
    values = node.value if isinstance(node.value, list) else [node.value]
    if not values:
        raise node.error("expected a port, 'OP PORT' or a list of them, got []")
    out: list[PortMatch] = []
    for value in values:
        with _at(node):
            out += parse_ports(str(value), protocol)
    return tuple(out)


def _rule_from_mapping(node: Node) -> Rule:
    node.check_keys(_RULE_FIELDS)
    fields = {str(k): node.get(str(k)) for k in node.value}
    action = _action(node.get("action"))
    protocol = None
    if "protocol" in fields:
        with _at(fields["protocol"]):
            protocol = parse_protocol(str(fields["protocol"].value))
    addresses: dict[str, Address] = {}
    for side in ("source", "destination"):
        addresses[side] = ANY
        if side in fields:
            with _at(fields[side]):
                addresses[side] = parse_address(str(fields[side].value), f"{side} address")
    icmp_type = icmp_code = None
    if "icmp_type" in fields:
        with _at(fields["icmp_type"]):
            icmp_type, icmp_code = parse_icmp(str(fields["icmp_type"].value), protocol)
    if "icmp_code" in fields:
        if icmp_type is None:
            raise fields["icmp_code"].error("icmp_code needs icmp_type")
        if icmp_code is not None:
            raise fields["icmp_code"].error(f"icmp_type already sets code {icmp_code}")
        icmp_code = fields["icmp_code"].as_int(0, 255)
    rule = Rule(
        action=action,
        protocol=protocol,
        source=addresses["source"],
        destination=addresses["destination"],
        source_ports=_ports(fields["source_ports"], protocol) if "source_ports" in fields else (),
        ports=_ports(fields["ports"], protocol) if "ports" in fields else (),
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        name=fields["name"].as_str() if "name" in fields else None,
        remark=fields["remark"].as_str() if "remark" in fields else None,
    )
    with _at(node):
        return check_rule(rule)


def _rule(node: Node, profiles: Mapping[str, int]) -> Rule:
    if isinstance(node.value, str):
        with _at(node):
            rule = parse_rule(node.value)
    elif isinstance(node.value, dict):
        rule = _rule_from_mapping(node)
    else:
        raise node.error(f"expected a rule (a string or a mapping), got {node.value!r}")
    for side in ("source", "destination"):
        ref = getattr(rule, side)
        if isinstance(ref, ProfileRef) and ref.name not in profiles:
            where = node.get(side) if node.has(side) else node
            known = ", ".join(profiles)
            raise where.error(f"unknown profile {ref.name!r} in the {side}; profiles are {known}")
    return rule


def _names(root: Node) -> dict[str, int]:
    """Profile name → index, validated (first pass: rules may name later profiles)."""
    names: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for index, node in enumerate(root.get("profiles").items()):
        name_node = node.get("name")
        name = name_node.as_str()
        if not _NAME.fullmatch(name):
            raise name_node.error(f"bad profile name {name!r}: use letters, digits, _ . and -")
        if name in names:
            first = first_line[name]
            raise name_node.error(f"duplicate profile name {name!r} (first at line {first})")
        names[name], first_line[name] = index, name_node.line
    return names


def _profile(node: Node, profiles: Mapping[str, int], bound: dict[str, str]) -> Profile:
    name = node.get("name").as_str()
    with _context(f"profile {name!r}: "):
        node.check_keys({"name", "description", "default", "rules", "vms"})
        description = node.get("description").as_str() if node.has("description") else ""
        default = _action(node.get("default")) if node.has("default") else Action.DENY
        vm_nodes = _list(node, "vms")
        for vm_node in vm_nodes:
            entry = vm_node.as_str()
            if not _PATTERN.search(entry) and bound.setdefault(entry, name) != name:
                raise vm_node.error(f"VM {entry!r} is already bound to profile {bound[entry]!r}")
        rule_nodes = _list(node, "rules")
    rules: list[Rule] = []
    for number, rule_node in enumerate(rule_nodes, 1):
        with _context(f"profile {name!r} rule {number}: "):
            rule = _rule(rule_node, profiles)
            previous = next((r.sequence for r in reversed(rules) if r.sequence), None)
            if rule.sequence is not None and previous is not None and rule.sequence <= previous:
                raise rule_node.error(f"sequence {rule.sequence} is not above {previous}")
        rules.append(rule)
    return Profile(
        name=name,
        description=description,
        default=default,
        rules=tuple(rules),
        vms=tuple(n.value for n in vm_nodes),
        origin=_origin(node),
        rule_origins=tuple(_origin(n) for n in rule_nodes),
        vm_origins=tuple(_origin(n) for n in vm_nodes),
    )


def _from_node(root: Node) -> PolicySet:
    with _context(""):
        root.check_keys({"profiles"})
        names = _names(root)
        bound: dict[str, str] = {}
        profiles = tuple(_profile(n, names, bound) for n in root.get("profiles").items())
    return PolicySet(profiles=profiles, path=root.path)


def load_policy(path: str) -> PolicySet:
    """Load and validate a profiles file."""
    with _context(""):
        root = load_file(path)
    return _from_node(root)


def loads_policy(text: str, path: str = "<profiles>") -> PolicySet:
    """Load and validate profiles YAML text."""
    with _context(""):
        root = load(text, path)
    return _from_node(root)


# --- binding VMs to profiles ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bindings:
    """Which profile each VM is bound to, and the identity its counters are kept under.

    Precedence: a VM named (by name or UUID) in a profile's ``vms`` → the inventory's
    ``profile`` (when the policy defines it) → the first profile, in file order, with a
    ``vms`` pattern matching the VM's name or UUID.
    """

    policy: PolicySet
    """The profiles."""
    uuids: Mapping[str, str] = field(default_factory=dict)
    """VM name → UUID, from the inventory."""
    inventory: Mapping[str, str] = field(default_factory=dict)
    """VM name → profile, from the inventory (profiles the policy defines only)."""
    warnings: tuple[str, ...] = ()
    """What looks wrong but may be fine later: each names the file and line."""

    def matches(self, pattern: str, vm: str) -> bool:
        """Whether ``pattern`` names the VM called ``vm`` (by name or UUID)."""
        uuid = self.uuids.get(vm)
        return fnmatchcase(vm, pattern) or (uuid is not None and fnmatchcase(uuid, pattern))

    def profile_of(self, vm: str) -> str | None:
        """The profile bound to the VM called ``vm``, or None."""
        uuid = self.uuids.get(vm)
        for profile in self.policy.profiles:
            if vm in profile.vms or (uuid is not None and uuid in profile.vms):
                return profile.name
        if vm in self.inventory:
            return self.inventory[vm]
        for profile in self.policy.profiles:
            if any(_PATTERN.search(p) and self.matches(p, vm) for p in profile.vms):
                return profile.name
        return None

    def key_of(self, vm: str) -> str:
        """The VM's identity for counters: its UUID when known, else its name."""
        return self.uuids.get(vm, vm)


def bind(policy: PolicySet, inventory: InventoryView | None = None) -> Bindings:
    """Bindings of the inventory's VMs (and of VMs seen later, by name, through patterns)."""
    vms = () if inventory is None else inventory.vms
    uuids = {vm.name: vm.uuid for vm in vms if vm.uuid is not None}
    defined = {p.name for p in policy.profiles}
    warnings: list[str] = []
    for vm in vms:
        if vm.profile is not None and vm.profile not in defined:
            warnings.append(
                f"VM {vm.name!r} has profile {vm.profile!r} in the inventory, which"
                f" {policy.path} does not define; its flows are evaluated at the other end only"
            )
    inventory_profiles = {v.name: v.profile for v in vms if v.profile in defined}
    bindings = Bindings(policy, uuids, inventory_profiles)
    if inventory is not None:
        for profile in policy.profiles:
            for entry, origin in zip(profile.vms, profile.vm_origins, strict=True):
                if not any(bindings.matches(entry, vm.name) for vm in vms):
                    warnings.append(f"{origin}: profile {profile.name!r}: {entry!r} matches no VM")
            for rule, origin in zip(profile.rules, profile.rule_origins, strict=True):
                for ref in (rule.source, rule.destination):
                    if isinstance(ref, VmRef) and not any(
                        bindings.matches(ref.pattern, vm.name) for vm in vms
                    ):
                        warnings.append(f"{origin}: vm:{ref.pattern} matches no VM")
        for vm in vms:
            chosen = bindings.profile_of(vm.name)
            if vm.name in inventory_profiles and chosen != vm.profile:
                warnings.append(
                    f"VM {vm.name!r} is bound to profile {chosen!r} by {policy.path} and to"
                    f" {vm.profile!r} by the inventory; {chosen!r} applies"
                )
    return Bindings(policy, uuids, inventory_profiles, tuple(warnings))
