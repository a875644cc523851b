# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Plan Windows Firewall rules for RDP: the server's inbound rules and the client's outbound ones.

Pure: ``add_reads`` puts the rule listing (``firewall.rules.list``), the listener port and, for the client side, the
security products into a batch (the action plugin's and the audit's), ``state_from`` parses their results,
``plan_state`` decides, and ``stage_rule_changes`` puts the backup and the rule changes into the apply batch.

Rules are recognised by their Name (``RemoteDesktop-UserMode-In-TCP``) or group resource string
(``@FirewallAPI.dll,-28752``), never by display text, which Windows localises. Windows evaluates rules as
allow-bypass > block > allow: an enabled block rule that matches RDP traffic wins over every allow rule, so the plan
finds those and reports them, and disables them only when asked (``disable_blocking_rules``).

Comparisons are made on normalised values (profile masks, port sets, case-insensitive addresses and programs with
environment variables expanded), so a rule that already says the same thing in other words is left alone.
"""

from __future__ import annotations

import ipaddress
import re
import typing as t
from dataclasses import dataclass, field

from ._action import BackupSet
from ._agent import Batch, BatchResult, contract_string_list
from ._findings import finding, fix
from ._tls import LISTENER_KEY
from ._transport import dword

DEFAULT_PORT = 3389
RDP_GROUP = "@FirewallAPI.dll,-28752"
BUILTIN_RULES = {"TCP": "RemoteDesktop-UserMode-In-TCP", "UDP": "RemoteDesktop-UserMode-In-UDP"}
OWN_GROUP = "rdpfix"
OWN_RULE_DESCRIPTION = "Created by rdpfix.rdp.firewall"
OWN_RULES = {"TCP": "rdpfix-RemoteDesktop-In-TCP", "UDP": "rdpfix-RemoteDesktop-In-UDP"}
OWN_CLIENT_RULE_PREFIX = "rdpfix-RemoteDesktop-Client-Out-"
SVCHOST = r"%SystemRoot%\system32\svchost.exe"
TERMSERVICE = "TermService"

PROFILE_BITS = {"Domain": 1, "Private": 2, "Public": 4}
ALL_PROFILES = 7
# Get-NetConnectionProfile's NetworkCategory -> the firewall profile Windows applies to that network's interface.
CATEGORY_PROFILE = {"DomainAuthenticated": "Domain", "Private": "Private", "Public": "Public"}
# Presets for the client's outbound rules; any absolute path to an .exe is accepted as well.
CLIENT_PROGRAMS = {
    "mstsc": r"%SystemRoot%\system32\mstsc.exe",
    # The Remote Desktop client and Windows App run their sessions in msrdc.exe; this is the per-machine install path.
    "msrdc": r"%ProgramFiles%\Remote Desktop\msrdc.exe",
}
_ENVIRONMENT = {
    "%systemroot%": r"c:\windows",
    "%windir%": r"c:\windows",
    "%programfiles%": r"c:\program files",
    "%programfiles(x86)%": r"c:\program files (x86)",
    "%systemdrive%": "c:",
}
_ANY = frozenset({"any", "*", ""})
# Address keywords of Windows Firewall; they all include at least the local networks the lab and most admins use.
_ADDRESS_KEYWORDS = frozenset(
    {
        "localsubnet",
        "dns",
        "dhcp",
        "wins",
        "defaultgateway",
        "internet",
        "intranet",
        "intranetremoteaccess",
        "playtodevice",
        "localsubnet4",
        "localsubnet6",
    }
)
# Products registered in SecurityCenter2 under these names are Windows' own firewall.
_WINDOWS_FIREWALL_NAMES = ("windows firewall", "windows defender firewall", "microsoft defender firewall")


class FirewallOptionError(ValueError):
    """An option the user gave cannot be used (raised before any host is touched)."""


class FirewallPlanError(ValueError):
    """What the host holds together with the options asks for something the house rules forbid without consent."""


def profile_mask(value: object) -> int:
    """Get-NetFirewallRule's Profile: 0 means Any, that is every profile."""
    mask = int(value) if isinstance(value, int) and not isinstance(value, bool) else 0
    return ALL_PROFILES if mask == 0 else mask & ALL_PROFILES


def profile_names(mask: int) -> list[str]:
    return [name for name, bit in PROFILE_BITS.items() if mask & bit]


def _rule_list(raw: dict[str, t.Any], field: str) -> list[str]:
    """A list field of a rule record, exactly as the protocol types it: a scalar is refused, never wrapped or split."""
    return contract_string_list("firewall.rules.list", f"the rule {raw.get('name')!r}'s {field}", raw.get(field))


def is_any(values: t.Sequence[str]) -> bool:
    return not values or any(item.strip().lower() in _ANY for item in values)


def normalise_program(program: object) -> str | None:
    """Lower-case, environment variables expanded; None for Any."""
    if program is None:
        return None
    text = str(program).strip().lower()
    if text in _ANY or text == "system":
        return None if text != "system" else "system"
    for variable, expansion in _ENVIRONMENT.items():
        text = text.replace(variable, expansion)
    return text


def normalise_ports(ports: t.Sequence[str]) -> frozenset[str]:
    if is_any(ports):
        return frozenset({"any"})
    return frozenset(item.strip().lower() for item in ports)


def normalise_addresses(addresses: t.Sequence[str]) -> frozenset[str]:
    if is_any(addresses):
        return frozenset({"any"})
    normalised: set[str] = set()
    for item in addresses:
        text = item.strip().lower()
        try:
            # 10.0.0.0/255.0.0.0 and 10.0.0.0/8 are the same scope; a single address is a /32.
            normalised.add(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            normalised.add(text)
    return frozenset(normalised)


def port_matches(ports: t.Sequence[str], port: int) -> bool:
    if is_any(ports):
        return True
    for item in ports:
        text = item.strip()
        if re.fullmatch(r"\d+", text) and int(text) == port:
            return True
        match = re.fullmatch(r"(\d+)-(\d+)", text)
        if match and int(match[1]) <= port <= int(match[2]):
            return True
    return False


def protocol_matches(protocol: object, wanted: str) -> bool:
    text = str(protocol if protocol is not None else "Any").strip().upper()
    numbers = {"TCP": "6", "UDP": "17"}
    return text in ("ANY", "*", "256", "") or text in (wanted, numbers[wanted])


@dataclass(frozen=True)
class Rule:
    """One rule of ``firewall.rules.list``, normalised for comparison; ``raw`` is what the host reported."""

    name: str
    group: str
    direction: str
    action: str
    enabled: bool
    profiles: int
    protocol: str
    local_ports: tuple[str, ...]
    remote_ports: tuple[str, ...]
    remote_addresses: tuple[str, ...]
    program: str | None
    service: str | None
    source: str
    raw: dict[str, t.Any]

    @classmethod
    def from_raw(cls, raw: dict[str, t.Any]) -> Rule:
        service = raw.get("service")
        service_text = None if service is None or str(service).strip().lower() in _ANY else str(service).strip()
        return cls(
            name=str(raw.get("name", "")),
            group=str(raw.get("group") or ""),
            direction=str(raw.get("direction", "Inbound")),
            action=str(raw.get("action", "Allow")),
            enabled=bool(raw.get("enabled")),
            profiles=profile_mask(raw.get("profiles", 0)),
            protocol=str(raw.get("protocol") or "Any"),
            local_ports=tuple(_rule_list(raw, "local_ports")),
            remote_ports=tuple(_rule_list(raw, "remote_ports")),
            remote_addresses=tuple(_rule_list(raw, "remote_addresses")),
            program=normalise_program(raw.get("program")),
            service=service_text,
            source=str(raw.get("policy_store_source_type") or "Local"),
            raw=raw,
        )

    @property
    def local_policy(self) -> bool:
        """Only rules of the local store can be changed here; GPO rules come back at the next policy refresh."""
        return self.source.lower() == "local"

    @property
    def open_to_any(self) -> bool:
        return is_any(self.remote_addresses)

    def summary(self) -> dict[str, t.Any]:
        return {
            "enabled": self.enabled,
            "action": self.action,
            "direction": self.direction,
            "profiles": profile_names(self.profiles),
            "protocol": self.protocol,
            "local_ports": list(self.local_ports),
            "remote_addresses": list(self.remote_addresses),
            "program": self.raw.get("program"),
        }

    def serves_rdp(self) -> bool:
        """Whether the rule's program/service filter includes the RDP listener (svchost hosting TermService)."""
        if self.program not in (None, normalise_program(SVCHOST)):
            return False
        return self.service is None or self.service.lower() == TERMSERVICE.lower()


@dataclass(frozen=True)
class RuleChange:
    """``kind`` is the operation: ``firewall.rule.set`` (only the changed fields), ``.new`` or ``.remove``."""

    kind: str
    name: str
    args: dict[str, t.Any]
    previous: dict[str, t.Any] | None
    reason: str


@dataclass(frozen=True)
class FirewallOptions:
    sides: tuple[str, ...] = ("server",)
    profiles: tuple[str, ...] = ("Domain", "Private")
    remote_addresses: tuple[str, ...] | None = None
    allow_public_any: bool = False
    disable_blocking_rules: bool = False
    udp: bool = True
    client_programs: tuple[str, ...] = ()

    @property
    def profile_mask(self) -> int:
        mask = 0
        for name in self.profiles:
            mask |= PROFILE_BITS[name]
        return mask


def client_program_path(item: str) -> str:
    return CLIENT_PROGRAMS.get(item, item)


def validate(options: FirewallOptions) -> None:
    """Raise FirewallOptionError naming the option, before any host is touched."""
    for side in options.sides:
        if side not in ("server", "client"):
            raise FirewallOptionError(f"sides: unknown side {side!r}; choose from server, client")
    if not options.sides:
        raise FirewallOptionError("sides must name at least one of server, client")
    if not options.profiles:
        raise FirewallOptionError("profiles must name at least one of Domain, Private, Public")
    for name in options.profiles:
        if name not in PROFILE_BITS:
            raise FirewallOptionError(f"profiles: unknown profile {name!r}; choose from Domain, Private, Public")
    if options.remote_addresses is not None:
        if not options.remote_addresses:
            raise FirewallOptionError("remote_addresses must not be empty (omit it to keep the rules' scope)")
        for item in options.remote_addresses:
            text = item.strip()
            if text.lower() in _ANY or text.lower() in _ADDRESS_KEYWORDS:
                continue
            candidates = text.split("-", 1) if "-" in text else [text]
            try:
                for candidate in candidates:
                    ipaddress.ip_network(candidate, strict=False)
            except ValueError:
                raise FirewallOptionError(
                    f"remote_addresses: {item!r} is not an address, a subnet, a range or a Windows Firewall keyword"
                ) from None
    for item in options.client_programs:
        if item in CLIENT_PROGRAMS:
            continue
        if not re.fullmatch(r"(?i)([a-z]:\\|%[a-z0-9()]+%\\).+\.exe", item):
            raise FirewallOptionError(
                f"client_programs: {item!r} is neither a preset ({', '.join(CLIENT_PROGRAMS)}) "
                "nor an absolute .exe path"
            )


@dataclass
class FirewallPlan:
    findings: list[dict[str, t.Any]] = field(default_factory=list)
    changes: list[RuleChange] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    report: dict[str, t.Any] = field(default_factory=dict)
    before: dict[str, t.Any] = field(default_factory=dict)
    after: dict[str, t.Any] = field(default_factory=dict)


def _fix(options: dict[str, t.Any], description: str) -> dict[str, t.Any]:
    return fix("firewall", options, description)


def _covers(rule: Rule, protocol: str, port: int, mask: int) -> bool:
    return (
        rule.enabled
        and rule.direction == "Inbound"
        and rule.action == "Allow"
        and protocol_matches(rule.protocol, protocol)
        and port_matches(rule.local_ports, port)
        and rule.profiles & mask == mask
        and rule.serves_rdp()
    )


def blocking_rules(rules: t.Sequence[Rule], protocol: str, port: int, mask: int) -> list[Rule]:
    """Enabled inbound block rules that match RDP traffic on ``port`` in one of the chosen profiles."""
    return [
        rule
        for rule in rules
        if rule.enabled
        and rule.direction == "Inbound"
        and rule.action == "Block"
        and protocol_matches(rule.protocol, protocol)
        and port_matches(rule.local_ports, port)
        and rule.profiles & mask
        and rule.serves_rdp()
    ]


def _new_rule_args(
    name: str,
    *,
    direction: str,
    protocol: str,
    port: int | None,
    mask: int,
    addresses: t.Sequence[str],
    program: str,
    service: str | None,
    display_name: str,
) -> dict[str, t.Any]:
    args: dict[str, t.Any] = {
        "name": name,
        "display_name": display_name,
        "group": OWN_GROUP,
        "direction": direction,
        "action": "Allow",
        "enabled": True,
        "profiles": mask,
        "protocol": protocol,
        "local_ports": [str(port)] if port is not None else ["Any"],
        "remote_addresses": list(addresses),
        "program": program,
        "description": OWN_RULE_DESCRIPTION,
    }
    if service is not None:
        args["service"] = service
    return args


@dataclass(frozen=True)
class ActiveProfile:
    """A firewall profile in force on a connected network, with its settings (Get-NetFirewallProfile)."""

    name: str
    category: str
    enabled: bool
    default_inbound_action: str


def active_profiles(
    profiles: t.Sequence[dict[str, t.Any]] | None, network_categories: t.Sequence[str] | None
) -> list[ActiveProfile]:
    """The profiles Windows applies to the connected networks; empty when the host did not say (nothing is judged)."""
    settings = {str(item.get("name")): item for item in profiles or [] if isinstance(item, dict)}
    found: list[ActiveProfile] = []
    for category in dict.fromkeys(network_categories or []):
        name = CATEGORY_PROFILE.get(str(category))
        if name is None or name in (item.name for item in found):
            continue
        profile = settings.get(name, {})
        found.append(
            ActiveProfile(
                name=name,
                category=str(category),
                # Windows Firewall is on for a profile unless it says otherwise; the default inbound action is Block.
                enabled=profile.get("enabled") is not False,
                default_inbound_action=str(profile.get("default_inbound_action") or "Block"),
            )
        )
    return found


def _judge_active_profiles(
    rules: list[Rule],
    by_name: dict[str, Rule],
    *,
    protocol: str,
    port: int,
    options: FirewallOptions,
    active: t.Sequence[ActiveProfile],
    plan: FirewallPlan,
    allow_fix: dict[str, t.Any] | None,
) -> list[str]:
    """Findings for active profiles where RDP does not get in now: the cause, and the fix - this run's rule change
    (``allow_fix``) on a chosen profile, the options that would open it on any other."""
    mask = options.profile_mask
    closed: list[str] = []
    for profile in active:
        bit = PROFILE_BITS[profile.name]
        if not profile.enabled:
            continue  # the firewall is off on this profile: everything gets in
        allowing = [rule for rule in rules if _covers(rule, protocol, port, bit)]
        if allowing or profile.default_inbound_action.lower() == "allow":
            continue
        closed.append(profile.name)
        if bit & mask:
            # A chosen profile: the plan's own rule change (or its report) is the fix; the finding names the cause.
            plan.findings.append(
                finding(
                    f"firewall.rdp_{protocol.lower()}_blocked_active_profile",
                    "critical" if protocol == "TCP" else "warning",
                    f"RDP over {protocol} on port {port} is blocked on the active {profile.name} profile (network "
                    f"category {profile.category}): its default inbound action is {profile.default_inbound_action} "
                    "and no enabled rule lets RDP in there",
                    "firewall",
                    {
                        "port": port,
                        "protocol": protocol,
                        "active_profile": profile.name,
                        "network_category": profile.category,
                        "default_inbound_action": profile.default_inbound_action,
                        "profiles": profile_names(mask),
                    },
                    allow_fix,
                )
            )
            continue
        target = _target_rule(by_name, protocol, port) or by_name.get(BUILTIN_RULES[protocol])
        limited_to = profile_names(target.profiles) if target is not None and target.enabled else []
        wanted = [name for name in PROFILE_BITS if (mask | bit) & PROFILE_BITS[name]]
        fix_options: dict[str, t.Any] = {"profiles": wanted}
        scope = options.remote_addresses or (target.remote_addresses if target is not None else ("Any",))
        consent = ""
        if profile.name == "Public" and is_any(scope):
            fix_options["allow_public_any"] = True
            consent = "; the rule is open to any address, so also allow_public_any: true (or give remote_addresses)"
        rules_text = (
            f"the Remote Desktop rule {target.name!r} covers {', '.join(limited_to)} only"
            if limited_to and target is not None
            else "no enabled rule allows it on any profile"
        )
        plan.findings.append(
            finding(
                f"firewall.rdp_{protocol.lower()}_blocked_active_profile",
                "critical" if protocol == "TCP" else "warning",
                f"RDP over {protocol} on port {port} is blocked on the active {profile.name} profile (network "
                f"category {profile.category}): its default inbound action is {profile.default_inbound_action} and "
                f"{rules_text}; rdpfix was asked for {', '.join(profile_names(mask))}",
                "firewall",
                {
                    "port": port,
                    "protocol": protocol,
                    "active_profile": profile.name,
                    "network_category": profile.category,
                    "default_inbound_action": profile.default_inbound_action,
                    "profiles": profile_names(mask),
                    "rule": target.summary() if target is not None else None,
                },
                _fix(
                    fix_options,
                    f"add {profile.name} to profiles ({', '.join(wanted)}){consent}; or make the network "
                    f"{'Private' if profile.name == 'Public' else 'Domain'} if that is what it is",
                ),
            )
        )
    return closed


def _plan_server(
    rules: list[Rule],
    port: int,
    options: FirewallOptions,
    plan: FirewallPlan,
    active: t.Sequence[ActiveProfile] = (),
) -> None:
    mask = options.profile_mask
    by_name = {rule.name: rule for rule in rules}
    protocols = ("TCP", "UDP") if options.udp else ("TCP",)
    report: dict[str, t.Any] = {
        "port": port,
        "profiles": profile_names(mask),
        "active_profiles": [profile.name for profile in active],
        "protocols": {},
    }
    # Block rules matter on the chosen profiles and on the profiles in force on the host's networks.
    active_mask = 0
    for profile in active:
        if profile.enabled:
            active_mask |= PROFILE_BITS[profile.name]

    for protocol in protocols:
        blockers = blocking_rules(rules, protocol, port, mask | active_mask)
        for blocker in blockers:
            can_disable = blocker.local_policy
            disabling = options.disable_blocking_rules and can_disable
            plan.findings.append(
                finding(
                    f"firewall.block_rule_{protocol.lower()}",
                    "critical" if protocol == "TCP" else "warning",
                    f"The block rule {blocker.name!r} matches RDP over {protocol} on port {port}; block rules win over "
                    "every allow rule",
                    "firewall",
                    {"rule": blocker.name, "group": blocker.group, "source": blocker.source, **blocker.summary()},
                    _fix({"disable_blocking_rules": True}, f"disable the block rule {blocker.name!r}")
                    if can_disable
                    else None,
                )
            )
            if disabling:
                plan.changes.append(
                    RuleChange(
                        "firewall.rule.set",
                        blocker.name,
                        {"name": blocker.name, "enabled": False},
                        blocker.raw,
                        f"disable block rule {blocker.name!r} (disable_blocking_rules)",
                    )
                )
                plan.warnings.append(
                    f"Disabling the block rule {blocker.name!r} because disable_blocking_rules asks for it: whoever "
                    "added it may have wanted RDP blocked"
                )
                plan.after[blocker.name] = dict(blocker.summary(), enabled=False)
                plan.before[blocker.name] = blocker.summary()
            elif not can_disable:
                plan.warnings.append(
                    f"The block rule {blocker.name!r} comes from {blocker.source}; change it where it is defined"
                )

        covering = [rule for rule in rules if _covers(rule, protocol, port, mask)]
        report["protocols"][protocol] = {
            "allowed_by": [rule.name for rule in covering],
            "blocked_by": [rule.name for rule in blockers],
        }
        # A rule that already lets RDP in on every chosen profile is enough, unless the user asks for a scope.
        allow_fix: dict[str, t.Any] | None = None
        if not covering or options.remote_addresses is not None:
            before = len(plan.findings)
            _plan_allow_rule(
                by_name,
                target=_target_rule(by_name, protocol, port),
                protocol=protocol,
                port=port,
                options=options,
                plan=plan,
            )
            allow_fix = next((item["fix"] for item in plan.findings[before:] if item.get("fix")), None)
        report["protocols"][protocol]["closed_on_active_profiles"] = _judge_active_profiles(
            rules, by_name, protocol=protocol, port=port, options=options, active=active, plan=plan, allow_fix=allow_fix
        )
    plan.report["server"] = report


def _target_rule(by_name: dict[str, Rule], protocol: str, port: int) -> Rule | None:
    """The rule to enable or create: the built-in one while the listener is on 3389, ours on a moved port."""
    if port == DEFAULT_PORT and BUILTIN_RULES[protocol] in by_name:
        return by_name[BUILTIN_RULES[protocol]]
    return by_name.get(OWN_RULES[protocol])


def _plan_allow_rule(
    by_name: dict[str, Rule],
    *,
    target: Rule | None,
    protocol: str,
    port: int,
    options: FirewallOptions,
    plan: FirewallPlan,
) -> None:
    mask = options.profile_mask
    builtin = by_name.get(BUILTIN_RULES[protocol])
    if target is None:
        # Keep the scope the administrator gave the built-in rule, unless the user names one.
        addresses: tuple[str, ...] = options.remote_addresses or (builtin.remote_addresses if builtin else ("Any",))
        if mask & PROFILE_BITS["Public"] and is_any(addresses):
            _require_public_any(OWN_RULES[protocol], options, plan)
        args = _new_rule_args(
            OWN_RULES[protocol],
            direction="Inbound",
            protocol=protocol,
            port=port,
            mask=mask,
            addresses=addresses or ("Any",),
            program=SVCHOST,
            service=TERMSERVICE,
            display_name=f"Remote Desktop - rdpfix ({protocol}-In)",
        )
        plan.changes.append(
            RuleChange(
                "firewall.rule.new", OWN_RULES[protocol], args, None, f"allow RDP over {protocol} on port {port}"
            )
        )
        plan.findings.append(
            finding(
                f"firewall.rdp_{protocol.lower()}_not_allowed",
                "critical" if protocol == "TCP" else "warning",
                f"No enabled firewall rule allows RDP over {protocol} on port {port} for "
                f"{', '.join(profile_names(mask))}",
                "firewall",
                {"port": port, "protocol": protocol, "profiles": profile_names(mask)},
                _fix({}, f"create the rule {OWN_RULES[protocol]!r}"),
            )
        )
        plan.after[OWN_RULES[protocol]] = {
            "enabled": True,
            "action": "Allow",
            "direction": "Inbound",
            "profiles": profile_names(mask),
            "protocol": protocol,
            "local_ports": [str(port)],
            "remote_addresses": list(addresses),
            "program": SVCHOST,
        }
        plan.before[OWN_RULES[protocol]] = None
        return

    if not target.local_policy:
        plan.findings.append(
            finding(
                f"firewall.rdp_{protocol.lower()}_not_allowed",
                "critical" if protocol == "TCP" else "warning",
                f"The rule {target.name!r} that should allow RDP over {protocol} is managed by {target.source}",
                "firewall",
                {"rule": target.name, **target.summary()},
                None,
            )
        )
        return

    changes: dict[str, t.Any] = {}
    new_mask = target.profiles
    if not target.enabled:
        changes["enabled"] = True
        # A disabled rule opens nothing: enabling it for exactly the chosen profiles never opens more than asked.
        new_mask = mask
    elif target.profiles & mask != mask:
        new_mask = target.profiles | mask
    if new_mask != target.profiles:
        changes["profiles"] = new_mask
    if target.name == OWN_RULES[protocol] and not (
        len(target.local_ports) == 1 and target.local_ports[0].strip() == str(port)
    ):
        changes["local_ports"] = [str(port)]
    addresses = target.remote_addresses
    if options.remote_addresses is not None and normalise_addresses(options.remote_addresses) != normalise_addresses(
        target.remote_addresses
    ):
        changes["remote_addresses"] = list(options.remote_addresses)
        addresses = options.remote_addresses
        if is_any(options.remote_addresses):
            plan.warnings.append(
                f"Widening the remote scope of {target.name!r} to Any because remote_addresses asks for it"
            )
    if not changes:
        return
    already_open_public_any = target.enabled and target.profiles & PROFILE_BITS["Public"] and target.open_to_any
    if new_mask & PROFILE_BITS["Public"] and is_any(addresses) and not already_open_public_any:
        _require_public_any(target.name, options, plan)
    plan.changes.append(
        RuleChange(
            "firewall.rule.set",
            target.name,
            {"name": target.name, **changes},
            target.raw,
            f"let RDP in over {protocol} on port {port}",
        )
    )
    plan.findings.append(
        finding(
            f"firewall.rdp_{protocol.lower()}_not_allowed",
            "critical" if protocol == "TCP" else "warning",
            f"The rule {target.name!r} does not allow RDP over {protocol} on port {port} for "
            f"{', '.join(profile_names(mask))}",
            "firewall",
            {"rule": target.name, **target.summary()},
            _fix({}, f"update the rule {target.name!r}: {', '.join(sorted(changes))}"),
        )
    )
    plan.before[target.name] = target.summary()
    after = target.summary()
    after.update(
        enabled=True,
        profiles=profile_names(new_mask),
        remote_addresses=list(addresses),
        local_ports=changes.get("local_ports", after["local_ports"]),
    )
    plan.after[target.name] = after


def _require_public_any(name: str, options: FirewallOptions, plan: FirewallPlan) -> None:
    if not options.allow_public_any:
        raise FirewallPlanError(
            f"opening {name!r} on the Public profile to any remote address needs allow_public_any: true "
            "(or give remote_addresses, or leave Public out of profiles)"
        )
    plan.warnings.append(
        f"{name!r} lets RDP in from any address on the Public profile because allow_public_any is true"
    )


def _plan_client(
    rules: list[Rule], options: FirewallOptions, products: dict[str, t.Any] | None, plan: FirewallPlan
) -> None:
    by_name = {rule.name: rule for rule in rules}
    report: dict[str, t.Any] = {"outbound_rules": {}, "blocked_by": [], "security_products": products}
    targets = {normalise_program(client_program_path(item)) for item in options.client_programs} | {
        normalise_program(CLIENT_PROGRAMS["mstsc"])
    }
    for rule in rules:
        if not (rule.enabled and rule.direction == "Outbound" and rule.action == "Block"):
            continue
        if rule.program is not None and rule.program not in targets:
            continue
        if not (protocol_matches(rule.protocol, "TCP") and port_matches(rule.remote_ports, DEFAULT_PORT)):
            continue
        report["blocked_by"].append(rule.name)
        plan.findings.append(
            finding(
                "firewall.client_outbound_blocked",
                "critical",
                f"The outbound block rule {rule.name!r} stops the RDP client",
                "client",
                {"rule": rule.name, "source": rule.source, **rule.summary()},
                _fix({"disable_blocking_rules": True, "sides": ["client"]}, f"disable the block rule {rule.name!r}")
                if rule.local_policy
                else None,
            )
        )
        if options.disable_blocking_rules and rule.local_policy:
            plan.changes.append(
                RuleChange(
                    "firewall.rule.set",
                    rule.name,
                    {"name": rule.name, "enabled": False},
                    rule.raw,
                    f"disable outbound block rule {rule.name!r}",
                )
            )
            plan.before[rule.name] = rule.summary()
            plan.after[rule.name] = dict(rule.summary(), enabled=False)

    for item in options.client_programs:
        path = client_program_path(item)
        base = re.sub(r"\.exe$", "", path.replace("/", "\\").rsplit("\\", 1)[-1], flags=re.IGNORECASE)
        name = OWN_CLIENT_RULE_PREFIX + base.lower()
        existing = by_name.get(name)
        wanted = {
            "enabled": True,
            "action": "Allow",
            "direction": "Outbound",
            "profiles": ALL_PROFILES,
            "program": normalise_program(path),
        }
        report["outbound_rules"][name] = path
        if existing is None:
            args = _new_rule_args(
                name,
                direction="Outbound",
                protocol="Any",
                port=None,
                mask=ALL_PROFILES,
                addresses=("Any",),
                program=path,
                service=None,
                display_name=f"Remote Desktop client - rdpfix ({base})",
            )
            args.pop("local_ports")
            plan.changes.append(RuleChange("firewall.rule.new", name, args, None, f"allow {path} outbound"))
            plan.before[name] = None
            plan.after[name] = {"enabled": True, "action": "Allow", "direction": "Outbound", "program": path}
            continue
        current = {
            "enabled": existing.enabled,
            "action": existing.action,
            "direction": existing.direction,
            "profiles": existing.profiles,
            "program": existing.program,
        }
        if current == wanted:
            continue
        if not existing.local_policy or existing.action != "Allow" or existing.direction != "Outbound":
            # Our own name on something we did not make: never rewrite it into a different kind of rule.
            plan.warnings.append(f"The rule {name!r} exists but is not an outbound allow rule of the local store")
            continue
        changes: dict[str, t.Any] = {}
        if not existing.enabled:
            changes["enabled"] = True
        if existing.profiles != ALL_PROFILES:
            changes["profiles"] = ALL_PROFILES
        if existing.program != wanted["program"]:
            changes["program"] = path
        plan.changes.append(
            RuleChange("firewall.rule.set", name, {"name": name, **changes}, existing.raw, f"allow {path} outbound")
        )
        plan.before[name] = existing.summary()
        plan.after[name] = dict(existing.summary(), enabled=True, profiles=profile_names(ALL_PROFILES), program=path)

    if products and products.get("available"):
        for product in products.get("firewall") or []:
            product_name = str(product.get("name", ""))
            if product_name.strip().lower().startswith(_WINDOWS_FIREWALL_NAMES):
                continue
            if not product_enabled(product.get("state")):
                continue
            plan.findings.append(
                finding(
                    "firewall.client_third_party_firewall",
                    "warning",
                    f"{product_name} is the active firewall on this client; check its rules for the RDP client "
                    f"and TCP/UDP {DEFAULT_PORT}",
                    "client",
                    {"product": product_name, "state": product.get("state")},
                    None,
                )
            )
    plan.report["client"] = report


def product_enabled(state: object) -> bool:
    """SecurityCenter2's productState: the second byte is 0x10 or 0x11 when the product is on.

    Microsoft does not document the encoding; this is the reading every inventory tool uses.
    """
    if isinstance(state, bool) or not isinstance(state, int):
        return False
    return (state >> 8) & 0xFF in (0x10, 0x11)


def rules_in_force(rules: t.Sequence[Rule]) -> list[Rule]:
    """What Windows enforces (ActiveStore): a Group Policy rule takes the place of a local rule with the same Name
    (Set-NetFirewallRule's documentation of -Name), so the local one is not judged, and never written for RDP."""
    policy = {rule.name.casefold() for rule in rules if not rule.local_policy}
    return [rule for rule in rules if not (rule.local_policy and rule.name.casefold() in policy)]


def plan_firewall(
    raw_rules: t.Sequence[dict[str, t.Any]],
    port: int,
    options: FirewallOptions,
    products: dict[str, t.Any] | None = None,
    active: t.Sequence[ActiveProfile] = (),
) -> FirewallPlan:
    """Raises FirewallPlanError when the plan would need consent the options do not give (nothing is written).

    ``active``: the profiles in force on the host's networks (``active_profiles``). RDP is judged on them too: a
    profile outside ``options.profiles`` whose default inbound action blocks RDP is reported with its cause and the
    options that would open it; nothing is changed for it without those options.
    """
    rules = rules_in_force([Rule.from_raw(raw) for raw in raw_rules])
    plan = FirewallPlan()
    if "server" in options.sides:
        _plan_server(rules, port, options, plan, active)
    if "client" in options.sides:
        _plan_client(rules, options, products, plan)
    return plan


# ---------------------------------------------------------------------------------------------------- reads and apply


@dataclass(frozen=True)
class FirewallReads:
    """Where ``add_reads`` put each read in the batch; ``products`` only when the client side is judged."""

    rules: int
    port: int
    products: int | None


@dataclass(frozen=True)
class FirewallState:
    rules: list[dict[str, t.Any]]
    port: int
    products: dict[str, t.Any] | None
    profiles: list[dict[str, t.Any]] | None
    network_categories: list[str] | None


def add_reads(batch: Batch, options: FirewallOptions) -> FirewallReads:
    return FirewallReads(
        rules=batch.add("firewall.rules.list"),
        port=batch.add("registry.get", path=LISTENER_KEY, names=["PortNumber"]),
        products=batch.add("security_products.list") if "client" in options.sides else None,
    )


def state_from(result: BatchResult, reads: FirewallReads) -> FirewallState:
    """The state from the batch's results; a failed read raises OperationError (nothing is judged on a guess)."""
    listing = result.data(reads.rules)
    return FirewallState(
        rules=list(listing.get("rules") or []),
        port=dword(result.data(reads.port).get("values") or {}, "PortNumber") or DEFAULT_PORT,
        products=result.data(reads.products) if reads.products is not None else None,
        profiles=listing.get("profiles"),
        network_categories=listing.get("network_categories"),
    )


def plan_state(state: FirewallState, options: FirewallOptions) -> FirewallPlan:
    """``plan_firewall`` on a read state; the report also shows the profiles and the connected networks' categories."""
    active = active_profiles(state.profiles, state.network_categories)
    plan = plan_firewall(state.rules, state.port, options, state.products, active)
    plan.report["profiles"] = state.profiles
    plan.report["network_categories"] = state.network_categories
    return plan


def stage_rule_changes(batch: Batch, backup: BackupSet, changes: t.Sequence[RuleChange]) -> int:
    """Every changed rule's whole previous record into the manifest (written first), then the changes; returns the
    manifest's position. The previous record is enough to put a rule back exactly as it was. Each change carries out
    its item, and the done-record follows the last one (``BackupSet.finish_done``)."""
    backup.begin(batch)
    items = []
    for change in changes:
        items.append(backup.record("firewall_rule", name=change.name, operation=change.kind, previous=change.previous))
        backup.planned_actions.append(change.reason)
    manifest = backup.finish(batch)
    for item, change in zip(items, changes, strict=True):
        backup.change(batch, item, change.kind, **change.args)
    backup.finish_done(batch)
    return manifest
