"""Windows Firewall as the lab models it: rules with their filters, profiles, and whether RDP traffic gets in.

Evaluation follows Windows: a rule applies when it is enabled, has the direction, covers the active profile, and its
protocol, port, remote address and program/service filters match. A matching block rule beats every matching allow
rule [MS-FASP] (allow-bypass rules are not modelled); without a matching rule the profile's default inbound action
decides. Built-in Remote Desktop rules are identified by Name, as Windows does [AzInternal]; their group is the
resource string ``@FirewallAPI.dll,-28752`` [FwRule].

Rules live in two policy stores, as Windows keeps them [NetFwRule][MS-FASP]: the local store (PersistentStore, read and
write, where Set-/Remove-/New-NetFirewallRule work by default) and Group Policy's (RSOP, read-only). What is in force
(ActiveStore) is both together, a Group Policy rule taking the place of a local rule with the same Name.
"""

from __future__ import annotations

import ipaddress
import re
import typing as t
from dataclasses import dataclass, field

from rdplab.model.errors import InvalidArgument, NotFound

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

RDP_GROUP = "@FirewallAPI.dll,-28752"
SVCHOST = "%SystemRoot%\\system32\\svchost.exe"
PROFILE_BITS = {"Domain": 1, "Private": 2, "Public": 4}
# Get-NetConnectionProfile's NetworkCategory, and the firewall profile that applies to it.
CATEGORY_PROFILE = {"DomainAuthenticated": "Domain", "Private": "Private", "Public": "Public"}
DIRECTIONS = ("Inbound", "Outbound")
ACTIONS = ("Allow", "Block")
SOURCES = ("Local", "GroupPolicy")
_KEYWORDS = frozenset(
    {
        "localsubnet",
        "localsubnet4",
        "localsubnet6",
        "intranet",
        "intranetremoteaccess",
        "internet",
        "dns",
        "dhcp",
        "wins",
        "defaultgateway",
        "playtodevice",
    }
)
_ENVIRONMENT = {"%systemroot%": "c:\\windows", "%windir%": "c:\\windows", "%programfiles%": "c:\\program files"}


def _norm_program(program: str) -> str | None:
    text = program.strip().lower()
    if text in ("any", "*", ""):
        return None
    for variable, expansion in _ENVIRONMENT.items():
        text = text.replace(variable, expansion)
    return text


@dataclass
class FirewallRule:
    name: str
    display_name: str
    group: str = ""
    direction: str = "Inbound"
    action: str = "Allow"
    enabled: bool = True
    profiles: int = 0
    protocol: str = "TCP"
    local_ports: list[str] = field(default_factory=lambda: ["Any"])
    remote_ports: list[str] = field(default_factory=lambda: ["Any"])
    remote_addresses: list[str] = field(default_factory=lambda: ["Any"])
    program: str = "Any"
    service: str = "Any"
    description: str = ""
    source: str = "Local"

    def record(self) -> dict[str, t.Any]:
        """The rule record of docs/agent-protocol.md."""
        return {
            "name": self.name,
            "display_name": self.display_name,
            "group": self.group,
            "direction": self.direction,
            "action": self.action,
            "enabled": self.enabled,
            "profiles": self.profiles,
            "protocol": self.protocol,
            "local_ports": list(self.local_ports),
            "remote_ports": list(self.remote_ports),
            "remote_addresses": list(self.remote_addresses),
            "program": self.program,
            "service": self.service,
            "policy_store_source_type": self.source,
        }

    def covers_profile(self, profile: str) -> bool:
        return self.profiles == 0 or bool(self.profiles & PROFILE_BITS[profile])

    def matches(  # noqa: PLR0917 - one argument per filter Windows evaluates
        self, direction: str, profile: str, protocol: str, port: int, address: str, program: str | None
    ) -> bool:
        if not self.enabled or self.direction != direction or not self.covers_profile(profile):
            return False
        if self.protocol.upper() not in ("ANY", protocol.upper(), {"TCP": "6", "UDP": "17"}[protocol.upper()]):
            return False
        ports = self.local_ports if direction == "Inbound" else self.remote_ports
        if not _port_in(ports, port) or not _address_in(self.remote_addresses, address):
            return False
        rule_program = _norm_program(self.program)
        if rule_program is not None and rule_program != (_norm_program(program) if program else None):
            return False
        # Inbound RDP is received by the TermService service: a service filter for any other service does not apply.
        return not (direction == "Inbound" and self.service.lower() not in ("any", "*", "", "termservice"))


def _port_in(ports: list[str], port: int) -> bool:
    for item in ports:
        text = item.strip()
        if text.lower() in ("any", "*"):
            return True
        if text.isdigit() and int(text) == port:
            return True
        match = re.fullmatch(r"(\d+)-(\d+)", text)
        if match and int(match[1]) <= port <= int(match[2]):
            return True
    return False


def _address_in(addresses: list[str], address: str) -> bool:
    client = ipaddress.ip_address(address)
    for item in addresses:
        text = item.strip().lower()
        if text in ("any", "*"):
            return True
        if text in _KEYWORDS:
            # The lab's clients are on loopback or a private network: every keyword scope includes them.
            if client.is_private or client.is_loopback:
                return True
            continue
        try:
            if "-" in text:
                low, high = (ipaddress.ip_address(part) for part in text.split("-", 1))
                if low.version == client.version and low <= client <= high:  # type: ignore[operator]
                    return True
            elif client in ipaddress.ip_network(text, strict=False):
                return True
        except ValueError:
            continue
    return False


def builtin_rdp_rules(enabled: bool = True) -> list[FirewallRule]:
    """The Remote Desktop group as Windows Server ships it: off on a fresh install, on once Remote Desktop is turned
    on in System Properties and on Azure marketplace images."""
    rules = [
        FirewallRule(
            "RemoteDesktop-UserMode-In-TCP",
            "Remote Desktop - User Mode (TCP-In)",
            RDP_GROUP,
            protocol="TCP",
            local_ports=["3389"],
            program=SVCHOST,
            service="termservice",
        ),
        FirewallRule(
            "RemoteDesktop-UserMode-In-UDP",
            "Remote Desktop - User Mode (UDP-In)",
            RDP_GROUP,
            protocol="UDP",
            local_ports=["3389"],
            program=SVCHOST,
            service="termservice",
        ),
        FirewallRule(
            "RemoteDesktop-Shadow-In-TCP",
            "Remote Desktop - Shadow (TCP-In)",
            RDP_GROUP,
            protocol="TCP",
            local_ports=["Any"],
            program="%SystemRoot%\\system32\\RdpSa.exe",
        ),
    ]
    for rule in rules:
        rule.enabled = enabled
    return rules


@dataclass
class Firewall:
    # The local store (PersistentStore): casefolded Name -> rule, in creation order.
    rules: dict[str, FirewallRule] = field(default_factory=dict)
    # Group Policy's store (RSOP): the rules every applied GPO delivers; read-only on the host.
    policy_rules: dict[str, FirewallRule] = field(default_factory=dict)
    # A failure of the firewall's WMI provider when rules are read (host file: firewall.rule_read_error).
    rule_read_error: str | None = None
    profiles_enabled: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PROFILE_BITS, True))
    default_inbound: dict[str, str] = field(default_factory=lambda: dict.fromkeys(PROFILE_BITS, "Block"))
    network_category: str = "DomainAuthenticated"
    # Where the lab's RDP clients come from, for the remote address filters.
    client_address: str = "127.0.0.1"
    # root\SecurityCenter2 content on client SKUs; None on servers (the namespace does not exist there).
    security_products: dict[str, list[dict[str, t.Any]]] | None = None

    @classmethod
    def windows_default(cls) -> Firewall:
        firewall = cls()
        for rule in builtin_rdp_rules():
            firewall.rules[rule.name.casefold()] = rule
        return firewall

    @property
    def active_profile(self) -> str:
        return CATEGORY_PROFILE[self.network_category]

    def get(self, name: str) -> FirewallRule:
        """A rule of the local store, as Get-/Set-NetFirewallRule find it by default (PersistentStore)."""
        rule = self.rules.get(name.casefold())
        if rule is None:
            raise NotFound(f"No MSFT_NetFirewallRule objects found with property 'Name' equal to '{name}'.")
        return rule

    def store(self, source: str) -> dict[str, FirewallRule]:
        return self.policy_rules if source == "GroupPolicy" else self.rules

    def active_rules(self) -> list[FirewallRule]:
        """ActiveStore: the local rules and Group Policy's, a policy rule replacing a local one of the same Name
        [NetFwRule]."""
        return [rule for key, rule in self.rules.items() if key not in self.policy_rules] + list(
            self.policy_rules.values()
        )

    def add(self, rule: FirewallRule) -> None:
        if rule.name.casefold() in self.rules:
            raise InvalidArgument(f"a firewall rule with the Name '{rule.name}' exists")
        self.rules[rule.name.casefold()] = rule

    def inbound_allowed(self, protocol: str, port: int) -> bool:
        """Whether a packet from ``client_address`` to the RDP listener gets in on the active profile."""
        profile = self.active_profile
        if not self.profiles_enabled[profile]:
            return True
        matching = [
            rule
            for rule in self.active_rules()
            if rule.matches("Inbound", profile, protocol, port, self.client_address, SVCHOST)
        ]
        if any(rule.action == "Block" for rule in matching):
            return False
        if any(rule.action == "Allow" for rule in matching):
            return True
        return self.default_inbound[profile] == "Allow"

    def snapshot(self) -> dict[str, t.Any]:
        return {
            "network_category": self.network_category,
            "profiles_enabled": dict(self.profiles_enabled),
            "default_inbound": dict(self.default_inbound),
            "rules": [self.rules[key].record() for key in sorted(self.rules)]
            + [self.policy_rules[key].record() for key in sorted(self.policy_rules)],
            "rule_read_error": self.rule_read_error,
            "security_products": self.security_products,
        }


def rdp_blocked(host: WindowsHost, port: int) -> bool:
    """The firewall drops a TCP connection to the listener (stealth mode: no answer, the client times out)."""
    return not host.firewall.inbound_allowed("TCP", port)


# -- host files --------------------------------------------------------------------------------------------------

RULE_FIELDS = (
    "name",
    "display_name",
    "group",
    "direction",
    "action",
    "enabled",
    "profiles",
    "protocol",
    "local_ports",
    "remote_ports",
    "remote_addresses",
    "program",
    "service",
    "description",
    "source",
)
SECTION_FIELDS = (
    "network_category",
    "profiles",
    "client_address",
    "remote_desktop_rules",
    "rules",
    "remove_rules",
    "rule_read_error",
    "security_products",
)
REMOTE_DESKTOP_RULES = ("enabled", "disabled")
PROFILE_FIELDS = ("enabled", "default_inbound_action")
PRODUCT_KINDS = ("firewall", "antivirus")
PRODUCT_FIELDS = ("name", "state", "path")
_RULE_STRINGS = ("display_name", "group", "program", "service", "description")
_PROTOCOLS = ("TCP", "UDP", "ANY", "6", "17")

Fail = t.Callable[[str, str], t.NoReturn]


def _unknown(mapping: dict[t.Any, t.Any], allowed: t.Sequence[str], where: str, fail: Fail) -> None:
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        fail(f"{where}.{unknown[0]}", f"unknown field (allowed: {', '.join(allowed)})")


def _valid_port(text: str) -> bool:
    # Port keywords (RPC endpoint mapper, Teredo...) are not modelled: the evaluator would never match them.
    if text.lower() in ("any", "*"):
        return True
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if match is None:
        return False
    low, high = int(match[1]), int(match[2] or match[1])
    return low <= high <= 65535


def _valid_address(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("any", "*") or lowered in _KEYWORDS:
        return True
    try:
        if "-" in text:
            low, high = (ipaddress.ip_address(part) for part in text.split("-", 1))
            return low.version == high.version
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _rule_field(key: str, given: object, where: str, fail: Fail) -> object:
    """One rule field from a host file, checked for type and value the way Set-NetFirewallRule would refuse it."""
    if key in ("local_ports", "remote_ports", "remote_addresses"):
        items = given if isinstance(given, list) else [given]
        # Ports may be written as YAML numbers; nothing else may be anything but a non-empty string.
        if not items or not all(
            (isinstance(item, str) and item) or (isinstance(item, int) and not isinstance(item, bool)) for item in items
        ):
            fail(where, f"expected a value or a list of values, got {given!r}")
        texts = [str(item).strip() for item in items]
        check = _valid_address if key == "remote_addresses" else _valid_port
        bad = [text for text in texts if not check(text)]
        if bad:
            expected = (
                "Any, an address, a network (CIDR), a range a-b or a keyword such as LocalSubnet"
                if key == "remote_addresses"
                else "Any, a port number or a range a-b"
            )
            fail(where, f"expected {expected}, got {bad[0]!r}")
        return texts
    if key == "enabled":
        if not isinstance(given, bool):
            fail(where, f"expected true or false, got {given!r}")
        return given
    if key == "profiles":
        if isinstance(given, bool) or not isinstance(given, int) or not 0 <= given <= 7:
            fail(where, f"expected a mask from 0 (Any) to 7, got {given!r}")
        return given
    if key == "protocol":
        if not isinstance(given, str) or given.upper() not in _PROTOCOLS:
            fail(where, f"expected TCP, UDP, Any, '6' or '17' (a string), got {given!r}")
        return given
    choices = {"direction": DIRECTIONS, "action": ACTIONS, "source": SOURCES}.get(key)
    if choices is not None:
        if given not in choices:
            fail(where, f"expected one of {', '.join(choices)}, got {given!r}")
        return given
    # name, display_name, program and service must say something; group and description may be empty.
    required = key in ("name", "display_name", "program", "service")
    if not isinstance(given, str) or (required and not given):
        fail(where, f"expected a {'non-empty ' if required else ''}string, got {given!r}")
    return given


def _load_profiles(firewall: Firewall, profiles: object, fail: Fail) -> None:
    if profiles is None:
        return
    if not isinstance(profiles, dict):
        fail("firewall.profiles", "expected a mapping of Domain/Private/Public")
    for name, settings in profiles.items():
        where = f"firewall.profiles.{name}"
        if name not in PROFILE_BITS:
            fail(where, "unknown profile (allowed: Domain, Private, Public)")
        if not isinstance(settings, dict):
            fail(where, "expected a mapping with enabled and/or default_inbound_action")
        _unknown(settings, PROFILE_FIELDS, where, fail)
        if "enabled" in settings:
            if not isinstance(settings["enabled"], bool):
                fail(f"{where}.enabled", f"expected true or false, got {settings['enabled']!r}")
            firewall.profiles_enabled[name] = settings["enabled"]
        if "default_inbound_action" in settings:
            if settings["default_inbound_action"] not in ACTIONS:
                fail(
                    f"{where}.default_inbound_action",
                    f"expected Allow or Block, got {settings['default_inbound_action']!r}",
                )
            firewall.default_inbound[name] = settings["default_inbound_action"]


def _load_products(products: object, fail: Fail) -> dict[str, list[dict[str, t.Any]]]:
    """root\\SecurityCenter2's products as security_products.list returns them: {name, state, path} each."""
    where = "firewall.security_products"
    if not isinstance(products, dict):
        fail(where, "expected a mapping with firewall and antivirus lists")
    _unknown(products, PRODUCT_KINDS, where, fail)
    loaded: dict[str, list[dict[str, t.Any]]] = {}
    for kind in PRODUCT_KINDS:
        items = products.get(kind) or []
        if not isinstance(items, list):
            fail(f"{where}.{kind}", f"expected a list of products, got {items!r}")
        loaded[kind] = []
        for index, item in enumerate(items):
            item_where = f"{where}.{kind}[{index}]"
            if not isinstance(item, dict):
                fail(item_where, "expected a mapping with name, state and path")
            _unknown(item, PRODUCT_FIELDS, item_where, fail)
            name, state, path = item.get("name"), item.get("state"), item.get("path", "")
            if not isinstance(name, str) or not name:
                fail(f"{item_where}.name", f"expected a non-empty string, got {name!r}")
            # productState is a raw integer; the lab stores it as given and never interprets it.
            if isinstance(state, bool) or not isinstance(state, int) or state < 0:
                fail(f"{item_where}.state", f"expected the productState integer, got {state!r}")
            if not isinstance(path, str):
                fail(f"{item_where}.path", f"expected a string, got {path!r}")
            loaded[kind].append({"name": name, "state": state, "path": path})
    return loaded


def load_section(host: WindowsHost, section: object, fail: Fail) -> None:
    """The ``firewall`` section of a host file; ``fail(where, problem)`` raises the loader's HostFileError."""
    if section is None:
        return
    if not isinstance(section, dict):
        fail("firewall", "expected a mapping")
    _unknown(section, SECTION_FIELDS, "firewall", fail)
    firewall = host.firewall
    category = section.get("network_category", firewall.network_category)
    if category not in CATEGORY_PROFILE:
        fail("firewall.network_category", f"expected one of {', '.join(CATEGORY_PROFILE)}, got {category!r}")
    firewall.network_category = category
    address = section.get("client_address", firewall.client_address)
    try:
        # ip_address() would also take an integer: only the written form of an address is a valid entry.
        if not isinstance(address, str):
            raise ValueError(address)
        ipaddress.ip_address(address)
    except ValueError:
        fail("firewall.client_address", f"expected an IP address, got {address!r}")
    firewall.client_address = address
    _load_profiles(firewall, section.get("profiles"), fail)
    group_state = section.get("remote_desktop_rules", "enabled")
    if group_state not in REMOTE_DESKTOP_RULES:
        fail("firewall.remote_desktop_rules", f"expected enabled or disabled, got {group_state!r}")
    for builtin in builtin_rdp_rules():
        if builtin.name.casefold() in firewall.rules:
            firewall.rules[builtin.name.casefold()].enabled = group_state == "enabled"
    read_error = section.get("rule_read_error")
    if read_error is not None and (not isinstance(read_error, str) or not read_error):
        fail("firewall.rule_read_error", f"expected the provider's error message, got {read_error!r}")
    firewall.rule_read_error = read_error
    removed = section.get("remove_rules") or []
    if not isinstance(removed, list):
        fail("firewall.remove_rules", f"expected a list of rule Names, got {removed!r}")
    for index, name in enumerate(removed):
        if not isinstance(name, str) or firewall.rules.pop(name.casefold(), None) is None:
            fail(f"firewall.remove_rules[{index}]", f"no rule with the Name {name!r}")
    rules = section.get("rules") or []
    if not isinstance(rules, list):
        fail("firewall.rules", f"expected a list of rules, got {type(rules).__name__}")
    for index, spec in enumerate(rules):
        where = f"firewall.rules[{index}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            fail(where, "expected a mapping with at least a name")
        _unknown(spec, RULE_FIELDS, where, fail)
        # Check every field before touching the rule, so that a built-in rule is never left half changed.
        values = {key: _rule_field(key, given, f"{where}.{key}", fail) for key, given in spec.items()}
        # Each store has its own Names: a Group Policy rule may share the Name of a local (built-in) one.
        store = firewall.store(str(values.get("source", "Local")))
        existing = store.get(spec["name"].casefold())
        rule = existing or FirewallRule(spec["name"], str(values.get("display_name") or spec["name"]))
        for key, value in values.items():
            setattr(rule, key, value)
        store[rule.name.casefold()] = rule
    products = section.get("security_products")
    if products is not None:
        firewall.security_products = _load_products(products, fail)
