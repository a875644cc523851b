# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Name checks: the name a user connects with versus the server's own names, its certificate and DNS.

The trap this catches: a client resolves the name it was given to a different machine (stale DNS record, hosts
file, split DNS) or connects by IP/alias so that the certificate and Kerberos names cannot match.
"""

from __future__ import annotations

import ipaddress
import socket
import typing as t

Resolver = t.Callable[[str], list[str]]


def system_resolver(name: str) -> list[str]:
    """Every address the system resolver gives for ``name`` (IPv4 and IPv6), in resolver order, deduplicated."""
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def short_name(name: str) -> str:
    return normalize(name).split(".", 1)[0]


def same_host_name(connect_name: str, fqdn: str | None, netbios: str | None) -> bool:
    """The user's name designates the server if it is its FQDN, or its single-label (NetBIOS-style) name."""
    wanted = normalize(connect_name)
    if fqdn and wanted == normalize(fqdn):
        return True
    return bool(netbios) and "." not in wanted and wanted == normalize(netbios or "")


def certificate_matches(connect_name: str, common_name: str | None, sans: list[str]) -> tuple[bool, str | None]:
    """Whether a client checking ``connect_name`` against the certificate finds it; returns (match, matched entry).

    Follows RFC 6125 as Windows applies it: with any DNS/IP subjectAltName the CN is ignored; a wildcard stands for
    exactly one left-most label; an IP address only matches an IP entry.
    """
    wanted = normalize(connect_name)
    ip_entries = [entry for entry in sans if is_ip_address(entry)]
    dns_entries = [entry for entry in sans if not is_ip_address(entry)]
    if is_ip_address(wanted):
        target = ipaddress.ip_address(wanted.strip("[]"))
        for entry in ip_entries:
            if ipaddress.ip_address(entry.strip("[]")) == target:
                return True, entry
        if not sans and common_name and normalize(common_name) == wanted:
            return True, common_name
        return False, None
    candidates = dns_entries if sans else ([common_name] if common_name else [])
    for entry in candidates:
        if _dns_name_matches(wanted, normalize(entry)):
            return True, entry
    return False, None


def _dns_name_matches(wanted: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        head, _dot, rest = wanted.partition(".")
        return bool(head) and rest == pattern[2:] and "." in pattern[2:]
    return wanted == pattern


def resolve(name: str | None, resolver: Resolver) -> dict[str, t.Any]:
    """Resolve ``name`` and say what happened; never raises."""
    if not name:
        return {"name": name, "addresses": [], "error": "no name"}
    if is_ip_address(name):
        return {"name": name, "addresses": [name.strip("[]")], "error": None}
    try:
        return {"name": name, "addresses": resolver(name), "error": None}
    except (OSError, UnicodeError, ValueError) as exc:
        return {"name": name, "addresses": [], "error": f"{type(exc).__name__}: {exc}"}


def check_names(
    connect_name: str,
    probed_address: str | None,
    ntlm: dict[str, t.Any] | None,
    certificate: dict[str, t.Any] | None,
    resolver: Resolver,
) -> dict[str, t.Any]:
    """Compare the connect name with the server's names, the certificate, and DNS; return the report section."""
    fqdn = (ntlm or {}).get("dns_computer")
    netbios = (ntlm or {}).get("netbios_computer")
    connect_resolution = resolve(connect_name, resolver)
    report: dict[str, t.Any] = {
        "connect_name": connect_name,
        "connect_name_is_ip": is_ip_address(connect_name),
        "probed_address": probed_address,
        "connect_name_resolves_to": connect_resolution["addresses"],
        "connect_name_resolution_error": connect_resolution["error"],
        "connect_name_reaches_probed_address": None,
        "server_dns_name": fqdn,
        "server_netbios_name": netbios,
        "matches_server_name": None,
        "server_dns_name_resolves_to": None,
        "server_dns_name_resolution_error": None,
        "server_dns_name_reaches_probed_address": None,
        "certificate_names": None,
        "certificate_matches_connect_name": None,
        "certificate_matched_entry": None,
        "certificate_matches_server_dns_name": None,
    }
    if probed_address and connect_resolution["addresses"]:
        report["connect_name_reaches_probed_address"] = _same_address(probed_address, connect_resolution["addresses"])
    if fqdn or netbios:
        report["matches_server_name"] = same_host_name(connect_name, fqdn, netbios)
    if fqdn:
        fqdn_resolution = resolve(fqdn, resolver)
        report["server_dns_name_resolves_to"] = fqdn_resolution["addresses"]
        report["server_dns_name_resolution_error"] = fqdn_resolution["error"]
        if probed_address and fqdn_resolution["addresses"]:
            report["server_dns_name_reaches_probed_address"] = _same_address(
                probed_address, fqdn_resolution["addresses"]
            )
    if certificate:
        sans = [str(entry) for entry in certificate.get("sans") or []]
        common_name = certificate.get("common_name")
        report["certificate_names"] = {"common_name": common_name, "sans": sans}
        matched, entry = certificate_matches(connect_name, common_name, sans)
        report["certificate_matches_connect_name"] = matched
        report["certificate_matched_entry"] = entry
        if fqdn:
            report["certificate_matches_server_dns_name"] = certificate_matches(fqdn, common_name, sans)[0]
    return report


def _same_address(probed: str, addresses: list[str]) -> bool:
    try:
        wanted = ipaddress.ip_address(probed)
        return any(ipaddress.ip_address(address) == wanted for address in addresses if is_ip_address(address))
    except ValueError:
        return probed in addresses
