"""The RDP listener's certificate: which one it presents, what WMI reports, and self-signed renewal.

Sources are cited by the short names of docs/lab.md ([Listener], [AzEvent], [InternalErr], [Repair], [WMI]).
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass
from datetime import timedelta

from rdplab.model import sddl as sddl_mod
from rdplab.model.certs import (
    CAPI_PROVIDER,
    EKU_OIDS,
    RDP_CONTAINER,
    Certificate,
    KeyLink,
    ParsedKeyFile,
    build_certificate,
    container_hash,
    key_file_content,
    parse_key_file,
    private_key_pem,
    rsa_key,
)
from rdplab.model.errors import OpError
from rdplab.model.events import RCM, SCHANNEL
from rdplab.model.filesystem import MACHINE_KEYS
from rdplab.model.registry import POLICY, RDP_TCP, TERMINAL_SERVER
from rdplab.model.stores import RDP_STORE
from rdplab.model.system import BUILD_SERVER_2016

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

PINNED_VALUE = "SSLCertificateSHA1Hash"
# Services the self-signed renewal needs besides SessionEnv/TermService [AzEvent][InternalErr][Repair].
RENEWAL_SERVICES = ("CertPropSvc", "KeyIso", "CryptSvc")
# A regenerated self-signed certificate: NotBefore about a day before its creation, valid 183 days from then, so it
# expires about 182 days after it was made (third-party certificate scans of builds 14393, 17763 and 20348, all
# exactly 183 days between NotBefore and NotAfter; "six-month" [Repair]). Microsoft states neither number.
SELFSIGNED_BACKDATE = timedelta(days=1)
SELFSIGNED_VALIDITY = timedelta(days=183)
# RCM warns (1052) about a configured certificate that expires within this many days (threshold UNCONFIRMED).
EXPIRY_WARNING_DAYS = 30

# The status texts RCM's 1057/1058 carry for an unusable key [AzEvent].
ACCESS_DENIED = "Access is denied"
KEYSET_MISSING = "Keyset does not exist"

HASH_TYPE_NOT_VALID = 0
HASH_TYPE_SELF_SIGNED = 1
HASH_TYPE_GPO = 2
HASH_TYPE_CUSTOM = 3

PROTOCOL_SSL = 0x1
PROTOCOL_HYBRID = 0x2
PROTOCOL_HYBRID_EX = 0x8


def rdp_key_sddl(os_build: int) -> str:
    """The ACL Windows gives the RDP self-signed key file [Repair]: owner SYSTEM, SYSTEM full, NETWORK SERVICE read,
    plus Administrators read (build <= 14393) or NT SERVICE\\SessionEnv full (build >= 17763; builds in between are
    client releases, treated as the newer rule)."""
    if os_build <= BUILD_SERVER_2016:
        return "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)(A;;FR;;;BA)"
    return f"O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)(A;;FA;;;{sddl_mod.SID_SESSIONENV})"


@dataclass(frozen=True)
class KeyStatus:
    """What the certificate's key file looks like on disk, and whether TermService (NETWORK SERVICE) can use it."""

    linked: bool
    exists: bool
    size: int | None
    owner: str | None
    sddl: str | None
    parsed: ParsedKeyFile | None
    readable_by_listener: bool
    problem: str | None  # why it cannot be used, for event messages

    @property
    def usable(self) -> bool:
        return self.problem is None


def key_status(host: WindowsHost, cert: Certificate) -> KeyStatus:
    link = cert.key_link
    if link is None:
        return KeyStatus(False, False, None, None, None, None, False, "the certificate has no private key")
    entry = host.filesystem.get(link.path)
    if entry is None or entry.is_dir:
        return KeyStatus(True, False, None, None, None, None, False, KEYSET_MISSING)
    parsed = parse_key_file(entry.content)
    readable = sddl_mod.network_service_can_read(entry.sddl)
    problem: str | None = None
    if not readable:
        problem = ACCESS_DENIED
    elif parsed is None or not cert.matches_key(parsed.key):
        problem = KEYSET_MISSING
    return KeyStatus(True, True, len(entry.content), entry.owner, entry.sddl, parsed, readable, problem)


def pinned_thumbprint(host: WindowsHost) -> str | None:
    """The administrator-pinned certificate: REG_BINARY SSLCertificateSHA1Hash on RDP-Tcp [Listener][Repair]."""
    value = host.registry.get(RDP_TCP, PINNED_VALUE)
    if value is None or value.type != "REG_BINARY" or not isinstance(value.value, str) or not value.value:
        return None
    return value.value.upper()


def selfsigned_certificate(host: WindowsHost) -> Certificate | None:
    """The certificate of the Remote Desktop store the listener would use: the one that expires last."""
    certificates = host.stores.entries(RDP_STORE)
    return max(certificates, key=lambda cert: cert.not_after) if certificates else None


def _effective_dword(host: WindowsHost, name: str, listener_key: str, default: int) -> int:
    # Policy values override the listener's own [Listener and policy registry values in the reference].
    policy = host.registry.dword(POLICY, name)
    if policy is not None:
        return policy
    own = host.registry.dword(listener_key, name)
    return default if own is None else own


def security_layer(host: WindowsHost) -> int:
    return _effective_dword(host, "SecurityLayer", RDP_TCP, 2)


def user_authentication(host: WindowsHost) -> int:
    return _effective_dword(host, "UserAuthentication", RDP_TCP, 1)


def deny_connections(host: WindowsHost) -> bool:
    # A missing value is treated as denied, as on a fresh install before Remote Desktop is enabled (UNCONFIRMED).
    return _effective_dword(host, "fDenyTSConnections", TERMINAL_SERVER, 1) != 0


def port_number(host: WindowsHost) -> int:
    return host.registry.dword(RDP_TCP, "PortNumber") or 3389


def wmi_setting(host: WindowsHost) -> dict[str, object]:
    """Win32_TSGeneralSetting for RDP-tcp [WMI]: the pinned hash (type 3) or the self-signed one (type 1)."""
    pinned = pinned_thumbprint(host)
    if pinned is not None:
        thumbprint: str | None = pinned
        hash_type = HASH_TYPE_CUSTOM
    else:
        selfsigned = selfsigned_certificate(host)
        thumbprint = selfsigned.thumbprint if selfsigned else None
        hash_type = HASH_TYPE_SELF_SIGNED if selfsigned else HASH_TYPE_NOT_VALID
    return {
        "terminal_name": "RDP-tcp",
        "ssl_certificate_sha1_hash": thumbprint,
        "ssl_certificate_sha1_hash_type": hash_type,
        "security_layer": host.registry.dword(RDP_TCP, "SecurityLayer"),
        "user_authentication": host.registry.dword(RDP_TCP, "UserAuthentication"),
        "min_encryption_level": host.registry.dword(RDP_TCP, "MinEncryptionLevel"),
    }


@dataclass(frozen=True)
class ListenerCredential:
    certificate: Certificate | None
    key_pem: bytes | None
    hash_type: int
    failure: str | None


def _rcm(host: WindowsHost, event_id: int, level: str, message: str, **data: str) -> None:
    host.events.write(RCM, event_id, level=level, time=host.clock(), message=message, data=data)


def choose_credential(host: WindowsHost, log: bool) -> ListenerCredential:
    """The certificate and key a new TLS connection gets, as RCM evaluates it at each connection.

    With ``log`` the connection-time events are written (1051..1058, Schannel 36870); without it nothing changes.
    """
    now = host.clock()

    def event(event_id: int, level: str, message: str, **data: str) -> None:
        if log:
            _rcm(host, event_id, level, message, **data)

    pinned = pinned_thumbprint(host)
    if pinned is not None:
        # RCM's own messages for 1051, 1053, 1054 and 1055 end "The default certificate will be used for RD Session
        # Host Server authentication from now on" (Windows' message table, a third-party dump; 1051 and 1055 also
        # [RDSAuthEnc]): each falls back to the self-signed certificate, an expired pin included.
        cert = host.stores.find("My", pinned)
        fallback = (
            " The default certificate will be used for RD Session Host Server authentication from now on. Please "
            "check the security settings by using the Remote Desktop Session Host Configuration tool in the "
            "Administrative Tools folder."
        )
        if cert is None:
            event(
                1051,
                "Warning",
                "The RD Session Host Server is configured to use SSL with user selected certificate, however, no "
                "usable certificate was found on the server." + fallback,
                thumbprint=pinned,
            )
        elif cert.expired(now):
            event(
                1053,
                "Error",
                "The RD Session Host Server is configured to use a certificate that is expired. The SHA1 hash of the "
                "certificate is in the event data." + fallback,
                thumbprint=pinned,
            )
        elif not cert.usable_for_listener():
            event(
                1054,
                "Error",
                "The RD Session Host Server is configured to use a certificate that does not contain an Enhanced Key "
                "Usage attribute of Server Authentication. The SHA1 hash of the certificate is in the event data."
                + fallback,
                thumbprint=pinned,
            )
        else:
            status = key_status(host, cert)
            if not status.usable:
                event(
                    1055,
                    "Error",
                    "The RD Session Host Server is configured to use a certificate but is unable to access the "
                    "private key associated with this certificate. The SHA1 hash of the certificate is in the event "
                    "data." + fallback,
                    thumbprint=pinned,
                    reason=status.problem or "",
                )
            else:
                if cert.not_after - now <= timedelta(days=EXPIRY_WARNING_DAYS):
                    days = max(0, (cert.not_after - now).days)
                    event(
                        1052,
                        "Warning",
                        f"The RD Session Host Server is configured to use a certificate that will expire in {days} "
                        "days. The SHA1 hash of the certificate is in the event data. Please check the security "
                        "settings by using the Remote Desktop Session Host Configuration tool in the Administrative "
                        "Tools folder.",
                        thumbprint=pinned,
                        days=str(days),
                    )
                assert status.parsed is not None
                return ListenerCredential(cert, _pem(status.parsed), HASH_TYPE_CUSTOM, None)

    selfsigned = selfsigned_certificate(host)
    if selfsigned is None:
        event(
            1057,
            "Error",
            "The RD Session Host Server has failed to create a new self signed certificate to be used for RD Session "
            "Host Server authentication on SSL connections.",
            status=KEYSET_MISSING,
        )
        return ListenerCredential(None, None, HASH_TYPE_NOT_VALID, "reset_after_x224")
    if selfsigned.expired(now):
        # The credential of an expired self-signed certificate that could not be renewed cannot be built [AzEvent]
        # (modelled as a reset after X.224 with 1058; UNCONFIRMED beyond the events).
        event(
            1058,
            "Error",
            "The RD Session Host Server has failed to replace the expired self signed certificate used for RD Session "
            "Host Server authentication on SSL connections.",
            thumbprint=selfsigned.thumbprint,
        )
        return ListenerCredential(selfsigned, None, HASH_TYPE_SELF_SIGNED, "reset_after_x224")
    status = key_status(host, selfsigned)
    if not status.usable:
        if log:
            host.events.write(
                SCHANNEL,
                36870,
                level="Error",
                time=now,
                message=(
                    "A fatal error occurred when attempting to access the TLS server credential private key. "
                    "The error code returned from the cryptographic module is 0x8009030D. The internal error state "
                    "is 10001."
                ),
                data={"ErrorCode": "0x8009030D", "ErrorStatus": "10001"},  # Schannel's own data names (docs/lab.md)
            )
        # [AzEvent] pairs the two statuses with two events: 1057 ("failed to create a new self signed certificate")
        # with "Keyset does not exist", 1058 ("failed to replace the expired self signed certificate") with "Access
        # is denied". The lab follows those pairs, whatever the certificate's age (UNCONFIRMED beyond the examples).
        denied = status.problem == ACCESS_DENIED
        action = "replace the expired" if denied else "create a new"
        event(
            1058 if denied else 1057,
            "Error",
            f"The RD Session Host Server has failed to {action} self signed certificate to be used for RD Session "
            f"Host Server authentication on SSL connections. The relevant status code was {status.problem}.",
            status=status.problem or "",
        )
        return ListenerCredential(selfsigned, None, HASH_TYPE_SELF_SIGNED, "reset_after_x224")
    assert status.parsed is not None
    return ListenerCredential(selfsigned, _pem(status.parsed), HASH_TYPE_SELF_SIGNED, None)


def _pem(parsed: ParsedKeyFile) -> bytes:
    return private_key_pem(parsed.key)


def renew_selfsigned(host: WindowsHost) -> None:
    """What SessionEnv/TermService do when they start: create the self-signed certificate when it is missing or
    expired [AzEvent][InternalErr][Repair].

    A valid certificate is left alone even when its key is unreadable [Repair]. An expired entry whose key file is
    gone blocks the renewal with 1058 "Object already exists" [Repair observation]. Without CertPropSvc, KeyIso and
    CryptSvc running, 1057 (missing) or 1058 (expired) is logged and nothing changes.
    """
    now = host.clock()
    current = host.stores.entries(RDP_STORE)
    if any(not cert.expired(now) for cert in current):
        return
    expired = [cert for cert in current if cert.expired(now)]
    event_id = 1058 if expired else 1057
    action = "replace the expired" if expired else "create a new"
    message = (
        f"The RD Session Host Server has failed to {action} self signed certificate to be used for RD Session Host "
        "Server authentication on SSL connections. The relevant status code was {status}."
    )
    stopped = [name for name in RENEWAL_SERVICES if not host.services.running(name)]
    if stopped:
        status = f"required services not running: {', '.join(stopped)}"
        _rcm(host, event_id, "Error", message.format(status=status), status=status)
        return
    orphaned = [cert for cert in expired if cert.key_link is None or not host.filesystem.exists(cert.key_link.path)]
    if orphaned:
        status = "Object already exists."
        _rcm(host, 1058, "Error", message.format(status=status), status=status, thumbprint=orphaned[0].thumbprint)
        return
    host.selfsigned_generation += 1
    label = f"{host.key_label}:rdp-selfsigned:gen{host.selfsigned_generation}"
    key = rsa_key(label)
    path = f"{MACHINE_KEYS}\\{container_hash(RDP_CONTAINER)}_{host.system.machine_guid}"
    link = KeyLink("capi", CAPI_PROVIDER, RDP_CONTAINER, path)
    not_before = now.replace(second=0, microsecond=0) - SELFSIGNED_BACKDATE
    der = build_certificate(
        label=label,
        key=key,
        subject_cn=host.system.fqdn,
        sans=[],
        ekus=[EKU_OIDS["server_auth"]],
        not_before=not_before,
        not_after=not_before + SELFSIGNED_VALIDITY,
        issuer=None,
    )
    try:
        host.filesystem.write(path, key_file_content(link, key), sddl=rdp_key_sddl(host.system.os_build))
    except OpError as exc:
        _rcm(host, event_id, "Error", message.format(status=exc.message), status=exc.message)
        return
    for cert in expired:
        host.stores.remove(RDP_STORE, cert.thumbprint)
    host.stores.add(RDP_STORE, Certificate(der=der, key_link=link, lab_key=key))


def accepted_protocols(host: WindowsHost) -> tuple[int, bool]:
    """(accepted protocol mask, rdp_only) from SecurityLayer and UserAuthentication."""
    if security_layer(host) == 0:
        return 0, True
    if user_authentication(host) == 1:
        return PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX, False
    return PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX, False
