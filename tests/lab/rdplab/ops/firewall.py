"""firewall.rules.list / firewall.rule.set / .new / .remove, security_products.list and tls.cipher_suites.list."""

from __future__ import annotations

import typing as t

from rdplab.model import schannel
from rdplab.model.errors import InvalidArgument
from rdplab.model.firewall import ACTIONS, CATEGORY_PROFILE, DIRECTIONS, FirewallRule
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def rules_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    firewall = host.firewall
    categories = {profile: category for category, profile in CATEGORY_PROFILE.items()}
    return {
        "rules": [rule.record() for rule in firewall.rules.values()],
        "profiles": [
            {
                "name": name,
                "enabled": firewall.profiles_enabled[name],
                "default_inbound_action": firewall.default_inbound[name],
                "default_outbound_action": "Allow",
            }
            for name in ("Domain", "Private", "Public")
        ],
        "network_categories": [categories[firewall.active_profile]],
    }


def _profiles(args: dict[str, t.Any], required: bool) -> int | None:
    if "profiles" not in args and not required:
        return None
    return _args.integer(args, "profiles", 0, 7)


def _refuse_policy_rule(rule: FirewallRule, what: str) -> None:
    # A rule delivered by Group Policy lives in the GPO store: the local store cannot change or delete it, and the
    # next policy refresh would bring it back anyway.
    if rule.source != "Local":
        raise InvalidArgument(f"the rule '{rule.name}' comes from {rule.source} and cannot be {what} here")


def rule_set(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    rule = host.firewall.get(_args.string(args, "name"))
    # Validate everything before changing anything, as Set-NetFirewallRule does.
    enabled = args.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise InvalidArgument(f"argument 'enabled' must be true or false, got {enabled!r}")
    profiles = _profiles(args, required=False)
    local_ports = _args.string_list(args, "local_ports", required=False)
    addresses = _args.string_list(args, "remote_addresses", required=False)
    program = args.get("program")
    if program is not None and (not isinstance(program, str) or not program):
        raise InvalidArgument(f"argument 'program' must be a non-empty string, got {program!r}")
    _refuse_policy_rule(rule, "changed")
    previous = rule.record()
    if enabled is not None:
        rule.enabled = enabled
    if profiles is not None:
        rule.profiles = profiles
    if local_ports is not None:
        rule.local_ports = local_ports
    if addresses is not None:
        rule.remote_addresses = addresses
    if program is not None:
        rule.program = program
    return {"previous": previous}


def rule_new(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    name = _args.string(args, "name")
    direction = _args.string(args, "direction")
    action = _args.string(args, "action")
    if direction not in DIRECTIONS or action not in ACTIONS:
        raise InvalidArgument(f"direction must be one of {DIRECTIONS} and action one of {ACTIONS}")
    protocol = _args.string(args, "protocol")
    if protocol.upper() not in ("TCP", "UDP", "ANY"):
        raise InvalidArgument(f"protocol must be TCP, UDP or Any, got {protocol!r}")
    rule = FirewallRule(
        name=name,
        display_name=_args.string(args, "display_name"),
        group=_args.string(args, "group"),
        direction=direction,
        action=action,
        enabled=_args.boolean(args, "enabled", True),
        profiles=t.cast(int, _profiles(args, required=True)),
        protocol=protocol,
        local_ports=_args.string_list(args, "local_ports", required=False) or ["Any"],
        remote_addresses=t.cast(list[str], _args.string_list(args, "remote_addresses", required=True)),
        program=_args.string(args, "program"),
        service=_args.string(args, "service", default="Any"),
        description=str(args.get("description") or ""),
    )
    host.firewall.add(rule)
    return {"name": name}


def rule_remove(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    name = _args.string(args, "name")
    rule = host.firewall.rules.get(name.casefold())
    if rule is None:
        return {"previous": None}
    _refuse_policy_rule(rule, "removed")
    del host.firewall.rules[name.casefold()]
    return {"previous": rule.record()}


def security_products_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    products = host.firewall.security_products
    if products is None:
        return {"available": False, "firewall": [], "antivirus": []}
    return {"available": True, "firewall": list(products["firewall"]), "antivirus": list(products["antivirus"])}


def cipher_suites_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    # Get-TlsCipherSuite arrived with Windows Server 2016 (build 14393).
    if host.system.os_build < 14393:
        return {"available": False, "suites": []}
    return {"available": True, "suites": schannel.cipher_suite_records(host)}
