"""Windows Firewall as the lab models it: rules with their filters, profiles, and whether RDP traffic gets in.

Evaluation follows Windows: a rule applies when it is enabled, has the direction, covers the active profile, and its
protocol, port, remote address and program/service filters match. A matching block rule beats every matching allow
rule (allow-bypass rules are not modelled); without a matching rule the profile's default inbound action decides.
Built-in Remote Desktop rules are identified by Name, as Windows does; their group is the resource string
``@FirewallAPI.dll,-28752`` [windows-rdp-facts: Firewall].
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


def builtin_rdp_rules() -> list[FirewallRule]:
    """The Remote Desktop group as Windows Server ships it (enabled on Azure images)."""
    return [
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


@dataclass
class Firewall:
    rules: dict[str, FirewallRule] = field(default_factory=dict)  # casefolded Name -> rule, in creation order
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
        rule = self.rules.get(name.casefold())
        if rule is None:
            raise NotFound(f"No MSFT_NetFirewallRule objects found with property 'Name' equal to '{name}'.")
        return rule

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
            for rule in self.rules.values()
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
            "rules": [self.rules[key].record() for key in sorted(self.rules)],
            "security_products": self.security_products,
        }


def rdp_blocked(host: WindowsHost, port: int) -> bool:
    """A TCP connection to the listener is refused by the firewall (the lab refuses rather than drops)."""
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
SECTION_FIELDS = ("network_category", "profiles", "client_address", "rules", "remove_rules", "security_products")


def load_section(host: WindowsHost, section: object, fail: t.Callable[[str, str], t.NoReturn]) -> None:
    """The ``firewall`` section of a host file; ``fail(where, problem)`` raises the loader's HostFileError."""
    if section is None:
        return
    if not isinstance(section, dict):
        fail("firewall", "expected a mapping")
    unknown = sorted(str(key) for key in section if key not in SECTION_FIELDS)
    if unknown:
        fail(f"firewall.{unknown[0]}", f"unknown field (allowed: {', '.join(SECTION_FIELDS)})")
    firewall = host.firewall
    category = section.get("network_category", firewall.network_category)
    if category not in CATEGORY_PROFILE:
        fail("firewall.network_category", f"expected one of {', '.join(CATEGORY_PROFILE)}, got {category!r}")
    firewall.network_category = category
    address = section.get("client_address", firewall.client_address)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        fail("firewall.client_address", f"expected an IP address, got {address!r}")
    firewall.client_address = address
    profiles = section.get("profiles") or {}
    if not isinstance(profiles, dict):
        fail("firewall.profiles", "expected a mapping of Domain/Private/Public")
    for name, settings in profiles.items():
        if name not in PROFILE_BITS or not isinstance(settings, dict):
            fail(f"firewall.profiles.{name}", "expected Domain, Private or Public with enabled/default_inbound_action")
        if "enabled" in settings:
            firewall.profiles_enabled[name] = bool(settings["enabled"])
        if "default_inbound_action" in settings:
            if settings["default_inbound_action"] not in ACTIONS:
                fail(f"firewall.profiles.{name}.default_inbound_action", "expected Allow or Block")
            firewall.default_inbound[name] = settings["default_inbound_action"]
    for name in section.get("remove_rules") or []:
        firewall.rules.pop(str(name).casefold(), None)
    for index, spec in enumerate(section.get("rules") or []):
        where = f"firewall.rules[{index}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            fail(where, "expected a mapping with at least a name")
        unknown = sorted(str(key) for key in spec if key not in RULE_FIELDS)
        if unknown:
            fail(f"{where}.{unknown[0]}", f"unknown field (allowed: {', '.join(RULE_FIELDS)})")
        existing = firewall.rules.get(spec["name"].casefold())
        rule = existing or FirewallRule(spec["name"], str(spec.get("display_name") or spec["name"]))
        for key, given in spec.items():
            if key in ("local_ports", "remote_ports", "remote_addresses"):
                given = [str(item) for item in (given if isinstance(given, list) else [given])]  # noqa: PLW2901
            setattr(rule, key, given)
        if rule.direction not in DIRECTIONS or rule.action not in ACTIONS or rule.source not in SOURCES:
            fail(where, "direction must be Inbound/Outbound, action Allow/Block, source Local/GroupPolicy")
        if not isinstance(rule.profiles, int) or not 0 <= rule.profiles <= 7:
            fail(f"{where}.profiles", "expected a mask from 0 (Any) to 7")
        firewall.rules[rule.name.casefold()] = rule
    products = section.get("security_products")
    if products is not None:
        if not isinstance(products, dict):
            fail("firewall.security_products", "expected a mapping with firewall and antivirus lists")
        firewall.security_products = {
            "firewall": list(products.get("firewall") or []),
            "antivirus": list(products.get("antivirus") or []),
        }
