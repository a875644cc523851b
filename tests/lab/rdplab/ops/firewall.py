"""firewall.rules.list / firewall.rule.set / .new / .remove, security_products.list and tls.cipher_suites.list."""

from __future__ import annotations

import typing as t

from rdplab import agent_code
from rdplab.model import schannel
from rdplab.model.errors import Failed, InvalidArgument, NotFound
from rdplab.model.firewall import ACTIONS, CATEGORY_PROFILE, DIRECTIONS, FirewallRule
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def _as_agent_returns(record: dict[str, t.Any], code: agent_code.AgentCode) -> dict[str, t.Any]:
    """A rule record as the agent's code serialises it: PowerShell unrolls a list assigned from a statement without
    ``@(...)``, so one element reaches JSON as a string and none as null."""
    for name in code.unrolled_rule_lists:
        items = record[name]
        record[name] = None if not items else items[0] if len(items) == 1 else items
    return record


def rule_records(host: WindowsHost) -> list[dict[str, t.Any]]:
    """Every rule of the local store, then Group Policy's, as firewall.rules.list reports them."""
    firewall = host.firewall
    code = agent_code.current()
    if firewall.rule_read_error is not None:
        if code.rule_read_errors_silenced:
            # -ErrorAction SilentlyContinue: the failure leaves nothing, which reads as "no rules".
            return []
        raise Failed(firewall.rule_read_error)
    local = [rule.record() for rule in firewall.rules.values()]
    policy = [rule.record() for rule in firewall.policy_rules.values()]
    if code.filters_joined_across_stores:
        # Filters read from ActiveStore and joined by InstanceID alone: a local rule and a Group Policy rule with
        # the same ID (the Name) both get the filters read last, Group Policy's (UNCONFIRMED order).
        by_name = {record["name"].casefold(): record for record in policy}
        for record in local:
            twin = by_name.get(record["name"].casefold())
            if twin is not None:
                for key in ("protocol", "local_ports", "remote_ports", "remote_addresses", "program", "service"):
                    record[key] = twin[key]
    return [_as_agent_returns(record, code) for record in local + policy]


def rules_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    firewall = host.firewall
    categories = {profile: category for category, profile in CATEGORY_PROFILE.items()}
    return {
        "rules": rule_records(host),
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


def _local_rule(host: WindowsHost, name: str) -> FirewallRule:
    """The rule the agent changes: the local store's (PersistentStore, the cmdlets' default). A Name only Group Policy
    has is NotFound there, as Set-/Remove-NetFirewallRule answer [NetFwRule]; the agent says so in its message."""
    rule = host.firewall.rules.get(name.casefold())
    if rule is None:
        policy = " (Group Policy has a rule with this Name, which is not changed here)"
        raise NotFound(
            f"no firewall rule of the local store has the Name '{name}'"
            + (policy if name.casefold() in host.firewall.policy_rules else "")
        )
    return rule


def _record(host: WindowsHost, rule: FirewallRule) -> dict[str, t.Any]:
    return _as_agent_returns(rule.record(), agent_code.current())


def rule_set(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    rule = _local_rule(host, _args.string(args, "name"))
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
    previous = _record(host, rule)
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
    # The agent looks in both stores; an agent that looked in the local store only would create a local twin.
    local_only = agent_code.current().rule_new_checks_local_store_only
    for store in ("PersistentStore",) if local_only else ("PersistentStore", "RSOP"):
        if name.casefold() in (host.firewall.rules if store == "PersistentStore" else host.firewall.policy_rules):
            raise InvalidArgument(f"a firewall rule with the Name '{name}' exists ({store})")
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
        # Only the local store is looked at and written: a Group Policy rule of this Name stays.
        return {"previous": None}
    del host.firewall.rules[name.casefold()]
    return {"previous": _record(host, rule)}


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
