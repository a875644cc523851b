"""Host files: YAML → WindowsHost, with errors that name the file and the field (docs/lab.md, "Host files")."""

from __future__ import annotations

import base64
import binascii
import re
import typing as t
import uuid
from datetime import datetime
from pathlib import Path

import yaml

from rdplab.model import firewall, listener, schannel
from rdplab.model import sddl as sddl_mod
from rdplab.model import token as token_mod
from rdplab.model.certs import (
    CAPI_PROVIDER,
    CNG_PROVIDER,
    EKU_OIDS,
    RDP_CONTAINER,
    Certificate,
    KeyLink,
    LabCA,
    build_certificate,
    container_hash,
    key_file_content,
    rsa_key,
)
from rdplab.model.errors import HostFileError, OpError
from rdplab.model.events import DEFAULT_LOCALE, LEVELS, LOCALES, RECORD_FAULTS
from rdplab.model.filesystem import CNG_KEYS, MACHINE_KEYS, validate_path
from rdplab.model.host import WindowsHost
from rdplab.model.registry import CRYPTOGRAPHY, POLICY, RDP_TCP, TERMINAL_SERVER, make_value
from rdplab.model.services import START_TYPES, STATUSES, Service
from rdplab.model.sessions import WTS_STATES
from rdplab.model.system import DOTNET_FRAMEWORKS, SystemInfo
from rdplab.model.timeutil import anchor_of, parse_time, shifted_clock, utc_now

DEFAULT_CA_NAME = "rdplab Lab Root CA"
CAPTIONS = {
    14393: "Microsoft Windows Server 2016 Datacenter",
    17763: "Microsoft Windows Server 2019 Datacenter",
    20348: "Microsoft Windows Server 2022 Datacenter",
    26100: "Microsoft Windows Server 2025 Datacenter",
}
# Keys the lab imports for CA-issued certificates: SYSTEM and Administrators only. NETWORK SERVICE must be granted
# read before the listener can use such a key [Listener], a real trap the host files can reproduce.
IMPORTED_KEY_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)"
KEY_STATES = ("present", "missing", "empty", "none")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_THUMBPRINT = re.compile(r"^[0-9A-Fa-f]{40}$")


class _Reader:
    """Typed access to one YAML document, raising HostFileError("<file>: <field>: <problem>")."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> t.NoReturn:
        raise HostFileError(f"{self.source}: {where}: {problem}")

    def mapping(self, value: object, where: str, allowed: t.Iterable[str] | None = None) -> dict[str, t.Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            unknown = sorted(str(key) for key in value if key not in set(allowed))
            if unknown:
                self.fail(
                    f"{where}.{unknown[0]}" if where else unknown[0],
                    f"unknown field (allowed: {', '.join(sorted(allowed))})",
                )
        return t.cast(dict[str, t.Any], value)

    def string(self, value: object, where: str, default: str | None = None, required: bool = False) -> str:
        if value is None:
            if required or default is None:
                self.fail(where, "required string is missing")
            return default
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def integer(self, value: object, where: str, default: int, low: int, high: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(where, f"expected an integer from {low} to {high}, got {value!r}")
        return value

    def boolean(self, value: object, where: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {value!r}")
        return value

    def strings(self, value: object, where: str, default: list[str]) -> list[str]:
        if value is None:
            return list(default)
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.fail(where, f"expected a list of strings, got {value!r}")
        return list(value)

    def items(self, value: object, where: str) -> list[t.Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(where, f"expected a list, got {type(value).__name__}")
        return value

    def time(self, value: object, where: str, default: str, anchor: datetime) -> datetime:
        try:
            return parse_time(default if value is None else value, anchor)
        except ValueError as exc:
            self.fail(where, str(exc))

    def choice(self, value: object, where: str, choices: t.Sequence[str], default: str) -> str:
        if value is None:
            return default
        if value not in choices:
            self.fail(where, f"expected one of {', '.join(choices)}, got {value!r}")
        return t.cast(str, value)


HOST_FIELDS = (
    "name",
    "description",
    "groups",
    "credentials",
    "system",
    "listener",
    "policy",
    "registry",
    "certificates",
    "trust_lab_ca",
    "services",
    "sessions",
    "files",
    "events",
    "firewall",
    "faults",
    "caller",
)


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HostFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HostFileError(f"{path}: not valid YAML: {exc}") from None


def load_host_file(path: Path, *, ca: LabCA | None = None, now: datetime | None = None) -> WindowsHost:
    return build_host(read_yaml(path), path, ca=ca, now=now)


def build_host(document: object, source: Path, *, ca: LabCA | None = None, now: datetime | None = None) -> WindowsHost:
    reader = _Reader(source)
    if not isinstance(document, dict):
        reader.fail("(top level)", "a host file is a mapping with at least 'name' and 'credentials'")
    doc = reader.mapping(document, "", HOST_FIELDS)
    name = reader.string(doc.get("name"), "name", required=True)
    if not _NAME.match(name):
        reader.fail("name", f"an inventory name uses letters, digits, '.', '_' and '-' only, got {name!r}")
    anchor = anchor_of(now or utc_now())
    groups = reader.strings(doc.get("groups"), "groups", [])
    for group in groups:
        if not _NAME.match(group) or "-" in group or "." in group:
            reader.fail("groups", f"an Ansible group name uses letters, digits and '_' only, got {group!r}")
    credentials = reader.mapping(doc.get("credentials"), "credentials", ("username", "password"))
    if not credentials:
        reader.fail("credentials", "required mapping with username and password is missing")
    username = reader.string(credentials.get("username"), "credentials.username", required=True)
    password = reader.string(credentials.get("password"), "credentials.password", required=True)

    system = _system(reader, doc.get("system"), name, anchor)
    host = WindowsHost(
        name=name,
        groups=groups,
        username=username,
        password=password,
        system=system,
        clock=utc_now if now is None else shifted_clock(now),
        source=source,
    )
    host.registry.set(CRYPTOGRAPHY, "MachineGuid", make_value("REG_SZ", system.machine_guid))
    _listener(reader, host, doc.get("listener"))
    _policy(reader, host, doc.get("policy"))
    _registry(reader, host, doc.get("registry"))
    lab_ca = ca or LabCA(DEFAULT_CA_NAME, anchor)
    _certificates(reader, host, doc, lab_ca, anchor)
    _services(reader, host, doc.get("services"))
    _sessions(reader, host, doc.get("sessions"))
    _files(reader, host, doc.get("files"))
    _caller(reader, host, doc.get("caller"))
    _events(reader, host, doc.get("events"), anchor)
    firewall.load_section(host, doc.get("firewall"), reader.fail)
    # The file describes the host as it booted: Schannel starts with the file's registry. Faults come after the boot.
    schannel.reboot(host)
    for index, item in enumerate(reader.items(doc.get("faults"), "faults")):
        where = f"faults[{index}]"
        fault = reader.mapping(item, where, ("name", "params"))
        fault_name = reader.string(fault.get("name"), f"{where}.name", required=True)
        try:
            host.inject_fault(fault_name, reader.mapping(fault.get("params"), f"{where}.params"))
        except ValueError as exc:
            reader.fail(where, str(exc))
    return host


def _caller(reader: _Reader, host: WindowsHost, value: object) -> None:
    """``caller:``: who the agent runs as (docs/lab.md, "The caller's token")."""
    section = reader.mapping(value, "caller", ("identity", "privileges"))
    identity = reader.choice(section.get("identity"), "caller.identity", token_mod.IDENTITIES, "administrator")
    base = (
        token_mod.CallerToken.system()
        if identity == "system"
        else token_mod.CallerToken.administrator(host.system.hostname, host.username)
    )
    changes: dict[str, str] = {}
    for name, state in reader.mapping(section.get("privileges"), "caller.privileges").items():
        where = f"caller.privileges.{name}"
        if not isinstance(name, str) or not re.match(r"^Se[A-Za-z]+Privilege$", name):
            reader.fail(where, "expected a privilege name such as SeBackupPrivilege")
        changes[name] = reader.choice(state, where, ("enabled", "disabled", "absent"), "disabled")
    host.caller = base.with_privileges(changes)
    host.process = host.caller.start_process()


def _system(reader: _Reader, value: object, name: str, anchor: datetime) -> SystemInfo:
    fields = (
        "hostname",
        "domain",
        "os_build",
        "os_caption",
        "machine_guid",
        "connection_broker",
        "boot_time",
        "locale",
        "dotnet_framework",
    )
    system = reader.mapping(value, "system", fields)
    hostname = reader.string(
        system.get("hostname"), "system.hostname", default=name.split(".", maxsplit=1)[0].upper()[:15]
    )
    if len(hostname) > 15:
        reader.fail("system.hostname", f"a NetBIOS host name has at most 15 characters, got {hostname!r}")
    domain = system.get("domain")
    if domain is not None:
        domain = reader.string(domain, "system.domain")
    os_build = reader.integer(system.get("os_build"), "system.os_build", 20348, 9200, 99999)
    caption = reader.string(
        system.get("os_caption"), "system.os_caption", default=CAPTIONS.get(os_build, "Microsoft Windows Server")
    )
    guid_text = system.get("machine_guid")
    if guid_text is None:
        machine_guid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.rdplab"))
    else:
        try:
            machine_guid = str(uuid.UUID(reader.string(guid_text, "system.machine_guid")))
        except ValueError:
            reader.fail("system.machine_guid", f"expected a GUID, got {guid_text!r}")
    return SystemInfo(
        hostname=hostname,
        domain=domain,
        os_build=os_build,
        os_caption=caption,
        machine_guid=machine_guid,
        connection_broker=reader.boolean(system.get("connection_broker"), "system.connection_broker", False),
        boot_time=reader.time(system.get("boot_time"), "system.boot_time", "-3d", anchor),
        # The UI language: level names and messages of the event log are rendered in it.
        locale=reader.choice(system.get("locale"), "system.locale", LOCALES, DEFAULT_LOCALE),
        dotnet_framework=reader.choice(
            system.get("dotnet_framework"), "system.dotnet_framework", DOTNET_FRAMEWORKS, "4.8"
        ),
    )


def _dword(host: WindowsHost, path: str, name: str, value: int) -> None:
    host.registry.set(path, name, make_value("REG_DWORD", value))


def _listener(reader: _Reader, host: WindowsHost, value: object) -> None:
    fields = (
        "port",
        "security_layer",
        "user_authentication",
        "min_encryption_level",
        "deny_connections",
        "pinned_thumbprint",
    )
    settings = reader.mapping(value, "listener", fields)
    deny = reader.boolean(settings.get("deny_connections"), "listener.deny_connections", False)
    _dword(host, TERMINAL_SERVER, "fDenyTSConnections", int(deny))
    host.registry.set(RDP_TCP, "SelfSignedCertStore", make_value("REG_SZ", "Remote Desktop"))
    _dword(host, RDP_TCP, "PortNumber", reader.integer(settings.get("port"), "listener.port", 3389, 1, 65535))
    _dword(
        host,
        RDP_TCP,
        "SecurityLayer",
        reader.integer(settings.get("security_layer"), "listener.security_layer", 2, 0, 2),
    )
    _dword(
        host,
        RDP_TCP,
        "UserAuthentication",
        reader.integer(settings.get("user_authentication"), "listener.user_authentication", 1, 0, 1),
    )
    _dword(
        host,
        RDP_TCP,
        "MinEncryptionLevel",
        reader.integer(settings.get("min_encryption_level"), "listener.min_encryption_level", 2, 1, 4),
    )
    _dword(host, RDP_TCP, "fAllowSecProtocolNegotiation", 1)
    pinned = settings.get("pinned_thumbprint")
    if pinned is not None:
        if not isinstance(pinned, str) or not _THUMBPRINT.match(pinned):
            reader.fail("listener.pinned_thumbprint", f"expected 40 hex digits, got {pinned!r}")
        _pin(host, pinned)


def _pin(host: WindowsHost, thumbprint: str) -> None:
    host.registry.set(RDP_TCP, listener.PINNED_VALUE, make_value("REG_BINARY", thumbprint.lower()))


def _policy(reader: _Reader, host: WindowsHost, value: object) -> None:
    settings = reader.mapping(value, "policy", ("security_layer", "user_authentication", "deny_connections"))
    if "security_layer" in settings:
        _dword(
            host, POLICY, "SecurityLayer", reader.integer(settings["security_layer"], "policy.security_layer", 2, 0, 2)
        )
    if "user_authentication" in settings:
        level = reader.integer(settings["user_authentication"], "policy.user_authentication", 1, 0, 1)
        _dword(host, POLICY, "UserAuthentication", level)
    if "deny_connections" in settings:
        deny = reader.boolean(settings["deny_connections"], "policy.deny_connections", False)
        _dword(host, POLICY, "fDenyTSConnections", int(deny))


def _registry(reader: _Reader, host: WindowsHost, value: object) -> None:
    for path, values in reader.mapping(value, "registry").items():
        where = f"registry[{path!r}]"
        for value_name, typed in reader.mapping(values, where).items():
            entry = reader.mapping(typed, f"{where}.{value_name}", ("type", "value"))
            try:
                host.registry.set(str(path), str(value_name), make_value(entry.get("type"), entry.get("value")))
            except OpError as exc:
                reader.fail(f"{where}.{value_name}", exc.message)
        if not values:
            try:
                host.registry.create_key(str(path))
            except OpError as exc:
                reader.fail(where, exc.message)


CERT_FIELDS = ("id", "store", "kind", "subject", "sans", "ekus", "not_before", "not_after", "key", "pinned")
KEY_FIELDS = ("state", "sddl", "provider", "container")


def _certificates(reader: _Reader, host: WindowsHost, doc: dict[str, t.Any], ca: LabCA, anchor: datetime) -> None:
    if "certificates" in doc:
        entries = reader.items(doc["certificates"], "certificates")
    else:
        # No certificates section: a healthy self-signed RDP certificate, as every Windows server has.
        entries = [{"id": "rdp-selfsigned", "store": "Remote Desktop"}]
    seen: set[str] = set()
    uses_ca = False
    for index, item in enumerate(entries):
        where = f"certificates[{index}]"
        spec = reader.mapping(item, where, CERT_FIELDS)
        cert_id = reader.string(spec.get("id"), f"{where}.id", required=True)
        if cert_id in seen:
            reader.fail(f"{where}.id", f"duplicate certificate id {cert_id!r}")
        seen.add(cert_id)
        store = reader.string(spec.get("store"), f"{where}.store", default="My")
        default_kind = "rdp_selfsigned" if store == "Remote Desktop" else "ca_issued"
        kind = reader.choice(
            spec.get("kind"), f"{where}.kind", ("rdp_selfsigned", "selfsigned", "ca_issued"), default_kind
        )
        fqdn = host.system.fqdn
        subject = reader.string(spec.get("subject"), f"{where}.subject", default=fqdn)
        default_sans = [] if kind == "rdp_selfsigned" else sorted({fqdn, host.system.hostname})
        sans = reader.strings(spec.get("sans"), f"{where}.sans", default_sans)
        eku_names = reader.strings(spec.get("ekus"), f"{where}.ekus", ["server_auth"])
        ekus: list[str] = []
        for eku in eku_names:
            oid = EKU_OIDS.get(eku, eku)
            if not re.match(r"^\d+(\.\d+)+$", oid):
                reader.fail(f"{where}.ekus", f"unknown EKU {eku!r} (use {', '.join(EKU_OIDS)} or a dotted OID)")
            ekus.append(oid)
        # Windows' own self-signed certificate is valid 183 days (docs/lab.md, "Certificates"): -31d .. +152d.
        default_before = "-31d" if kind == "rdp_selfsigned" else "-30d"
        not_before = reader.time(spec.get("not_before"), f"{where}.not_before", default_before, anchor)
        default_after = "+152d" if kind == "rdp_selfsigned" else "+335d"
        not_after = reader.time(spec.get("not_after"), f"{where}.not_after", default_after, anchor)
        if not_after <= not_before:
            reader.fail(f"{where}.not_after", "must be later than not_before")
        label = f"{host.key_label}:{cert_id}"
        key = rsa_key(label)
        issuer = ca.issuer if kind == "ca_issued" else None
        uses_ca = uses_ca or kind == "ca_issued"
        der = build_certificate(
            label=label,
            key=key,
            subject_cn=subject,
            sans=sans,
            ekus=ekus,
            not_before=not_before,
            not_after=not_after,
            issuer=issuer,
        )
        link = _key_file(
            reader, host=host, value=spec.get("key"), where=f"{where}.key", kind=kind, cert_id=cert_id, key=key
        )
        certificate = Certificate(der=der, key_link=link, lab_key=key)
        if store != "none":
            host.stores.add(store, certificate)
        if reader.boolean(spec.get("pinned"), f"{where}.pinned", False):
            _pin(host, certificate.thumbprint)
        elif store == "none":
            reader.fail(f"{where}.store", "'none' (in no store) only makes sense for a pinned certificate")
    if reader.boolean(doc.get("trust_lab_ca"), "trust_lab_ca", uses_ca):
        host.stores.add("Root", Certificate(der=ca.der, lab_key=ca.key))


def _key_file(
    reader: _Reader, *, host: WindowsHost, value: object, where: str, kind: str, cert_id: str, key: t.Any
) -> KeyLink | None:
    if value is None or isinstance(value, str):
        spec: dict[str, t.Any] = {"state": value}
    else:
        spec = reader.mapping(value, where, KEY_FIELDS)
    state = reader.choice(spec.get("state"), f"{where}.state", KEY_STATES, "present")
    if state == "none":
        return None
    rdp = kind == "rdp_selfsigned"
    provider = reader.choice(spec.get("provider"), f"{where}.provider", ("capi", "cng"), "capi" if rdp else "cng")
    default_container = RDP_CONTAINER if rdp else f"rdplab-{cert_id}-{host.system.machine_guid[:8]}"
    container = reader.string(spec.get("container"), f"{where}.container", default=default_container)
    folder = MACHINE_KEYS if provider == "capi" else CNG_KEYS
    path = f"{folder}\\{container_hash(container)}_{host.system.machine_guid}"
    link = KeyLink(provider, CAPI_PROVIDER if provider == "capi" else CNG_PROVIDER, container, path)
    default_sddl = listener.rdp_key_sddl(host.system.os_build) if rdp else IMPORTED_KEY_SDDL
    sddl = reader.string(spec.get("sddl"), f"{where}.sddl", default=default_sddl)
    if not sddl_mod.is_valid(sddl):
        reader.fail(f"{where}.sddl", f"expected an SDDL string with owner and DACL (O:..D:...), got {sddl!r}")
    if state == "missing":
        return link
    if host.filesystem.exists(path):
        reader.fail(where, f"two certificates use the key container {container!r}")
    content = b"" if state == "empty" else key_file_content(link, key)
    host.filesystem.write(path, content, sddl=sddl)
    return link


def _services(reader: _Reader, host: WindowsHost, value: object) -> None:
    for service_name, item in reader.mapping(value, "services").items():
        where = f"services.{service_name}"
        spec = reader.mapping(item, where, ("status", "start_type", "hangs_on_stop"))
        existing = host.services.get(str(service_name))
        status = reader.choice(
            spec.get("status"), f"{where}.status", STATUSES, existing.status if existing else "Running"
        )
        start_type = reader.choice(
            spec.get("start_type"), f"{where}.start_type", START_TYPES, existing.start_type if existing else "Manual"
        )
        hangs = reader.boolean(spec.get("hangs_on_stop"), f"{where}.hangs_on_stop", False)
        host.services.put(Service(existing.name if existing else str(service_name), status, start_type, hangs))
    if not host.services.running("TermService"):
        # A stopped TermService has no sessions but the console's and session 0.
        host.sessions.drop_user_sessions()


def _sessions(reader: _Reader, host: WindowsHost, value: object) -> None:
    for index, item in enumerate(reader.items(value, "sessions")):
        where = f"sessions[{index}]"
        spec = reader.mapping(item, where, ("user", "state", "station", "id"))
        user = reader.string(spec.get("user"), f"{where}.user", required=True)
        state = reader.choice(spec.get("state"), f"{where}.state", WTS_STATES, "Active")
        session = host.sessions.add(user, state)
        if "station" in spec:
            session.station = reader.string(spec["station"], f"{where}.station", default="")
        if "id" in spec:
            session.id = reader.integer(spec["id"], f"{where}.id", session.id, 2, 65535)


def _files(reader: _Reader, host: WindowsHost, value: object) -> None:
    for index, item in enumerate(reader.items(value, "files")):
        where = f"files[{index}]"
        spec = reader.mapping(item, where, ("path", "content", "content_b64", "dir", "sddl"))
        try:
            path = validate_path(spec.get("path"))
        except OpError as exc:
            reader.fail(f"{where}.path", exc.message)
        sddl = spec.get("sddl")
        if sddl is not None and (not isinstance(sddl, str) or not sddl_mod.is_valid(sddl)):
            reader.fail(f"{where}.sddl", f"expected an SDDL string with owner and DACL, got {sddl!r}")
        if reader.boolean(spec.get("dir"), f"{where}.dir", False):
            if not host.filesystem.make_dirs(path, sddl) and sddl is not None:
                # A folder Windows already has (MachineKeys...) takes the ACL the host file gives it.
                host.filesystem.set_sddl(path, sddl)
            continue
        if "content_b64" in spec:
            try:
                content = base64.b64decode(str(spec["content_b64"]), validate=True)
            except (binascii.Error, ValueError):
                reader.fail(f"{where}.content_b64", "not valid base64")
        else:
            content = str(spec.get("content", "")).encode("utf-8")
        parent = path.rsplit("\\", 1)[0]
        host.filesystem.make_dirs(parent)
        host.filesystem.write(path, content, sddl=sddl)


def _events(reader: _Reader, host: WindowsHost, value: object, anchor: datetime) -> None:
    for index, item in enumerate(reader.items(value, "events")):
        where = f"events[{index}]"
        spec = reader.mapping(item, where, ("log", "provider", "id", "level", "time", "message", "data", "fault"))
        data = reader.mapping(spec.get("data"), f"{where}.data")
        if "id" not in spec:
            reader.fail(f"{where}.id", "required event id is missing")
        host.events.write(
            provider=reader.string(spec.get("provider"), f"{where}.provider", required=True),
            event_id=reader.integer(spec.get("id"), f"{where}.id", 0, 0, 65535),
            level=reader.choice(spec.get("level"), f"{where}.level", LEVELS, "Error"),
            time=reader.time(spec.get("time"), f"{where}.time", "now", anchor),
            message=reader.string(spec.get("message"), f"{where}.message", default=""),
            data={str(key): str(val) for key, val in data.items()},
            log=reader.string(spec.get("log"), f"{where}.log", default="System"),
            # A record Windows cannot read, or whose description it cannot render (docs/lab.md, "Event log").
            fault=reader.choice(spec.get("fault"), f"{where}.fault", RECORD_FAULTS, "read")
            if spec.get("fault") is not None
            else None,
            generated=False,
        )
