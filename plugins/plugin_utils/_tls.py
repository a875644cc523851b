# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Plan the TLS side of the RDP listener: Schannel server protocols, cipher suites, security layer and NLA.

Pure: ``add_reads`` puts the reads of the registry values, the effective cipher-suite list and the listener's
certificate into a batch (the action plugin's and the audit's), ``state_from`` parses their results, ``plan_tls``
decides, and the action applies the returned registry changes with another batch.

Rules the plan follows (house rules, not tunables):
- it only ever turns protocols *on*: TLS 1.2, TLS 1.3 where the build supports it, and TLS 1.0/1.1 only when the
  user lists them in ``legacy_protocols`` (with a warning). Weak protocols it finds enabled are reported, not changed;
- SecurityLayer and UserAuthentication only go up, unless the user explicitly asks for ``nla: disabled``;
- the cipher-suite policy is replaced only when the effective list is empty or has no suite usable with the listener
  certificate's key type;
- Group Policy wins: values under ``HKLM:\\SOFTWARE\\Policies`` (SecurityLayer, UserAuthentication, the cipher-suite
  order) are reported as enforced by policy, with the note that a local change comes back at the next policy
  refresh, and written only when the user asks with ``override_policy`` (with a warning).
Schannel reads protocol keys and the cipher-suite policy at boot, so those changes set ``reboot_required``.
"""

from __future__ import annotations

import base64
import typing as t
from dataclasses import dataclass, field

from ansible_collections.rdpfix.rdp.plugins.module_utils._x509 import CertificateParseError, summarize_certificate

from ._agent import Batch, BatchResult
from ._findings import finding, fix
from ._transport import POLICY_KEY, RegistryChange, dword

SCHANNEL_PROTOCOLS_KEY = r"HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols"
PROTOCOLS = ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3")
WEAK_PROTOCOLS = ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1")
LEGACY_CHOICES = ("TLS 1.0", "TLS 1.1")
# Windows Server 2022 (and Windows 11) is the first build whose Schannel speaks TLS 1.3 (Microsoft: "Not supported" on
# Server 2019 and every Windows 10). Before it the TLS 1.3 Server key has no effect, except on Windows 10 1903 (18362)
# to 22H2, where it switches on an experimental pre-draft TLS 1.3 that Microsoft calls not a safe configuration.
TLS13_MIN_BUILD = 20348
TLS13_EXPERIMENTAL_BUILD = 18362

LISTENER_KEY = r"HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp"
CIPHER_POLICY_KEY = r"HKLM:\SOFTWARE\Policies\Microsoft\Cryptography\Configuration\SSL\00010002"
CIPHER_POLICY_VALUE = "Functions"
FIPS_KEY = r"HKLM:\SYSTEM\CurrentControlSet\Control\Lsa\FIPSAlgorithmPolicy"
# Schannel reads its settings at boot and Windows keeps no record of a change waiting for one, so rdpfix writes the
# boot time (system.info) during which it changed them: a later run that finds the same boot time knows the reboot is
# still pending, even when that run has nothing left to change (a first run without rdpfix_server_allow_reboot, a
# second with it).
PENDING_KEY = r"HKLM:\SOFTWARE\rdpfix\rdp"
PENDING_VALUE = "SchannelChangedDuringBoot"

SECURITY_LAYER = "SecurityLayer"
USER_AUTHENTICATION = "UserAuthentication"
MIN_ENCRYPTION_LEVEL = "MinEncryptionLevel"
SECURITY_LAYER_RDP = 0
SECURITY_LAYER_NEGOTIATE = 1
SECURITY_LAYER_TLS = 2
NLA_CHOICES = ("enabled", "disabled", "keep")

# Written only when the effective list is empty or unusable: AEAD suites only, all FIPS-approved, TLS 1.3 first.
# Both RSA and ECDSA listener keys find a suite in it.
RESTORED_CIPHER_SUITES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
)


def protocol_key(protocol: str) -> str:
    return f"{SCHANNEL_PROTOCOLS_KEY}\\{protocol}\\Server"


def default_enabled(protocol: str, os_build: int) -> bool:
    """Whether Schannel enables a server protocol when its key has no values.

    SSL 2.0/3.0 are off on every supported build; TLS 1.0-1.2 are on (Server 2016-2022); TLS 1.3 from build 20348.
    """
    if protocol in ("SSL 2.0", "SSL 3.0"):
        return False
    if protocol == "TLS 1.3":
        return os_build >= TLS13_MIN_BUILD
    return True


def protocol_enabled(protocol: str, values: dict[str, t.Any], os_build: int) -> bool:
    """Whether the listener can negotiate ``protocol``: Enabled=0 turns it off, and so does DisabledByDefault=1
    (a server protocol that is disabled by default is only used by applications that ask for it; RDP does not).
    TLS 1.3 does not exist before build 20348, whatever its key says."""
    if protocol == "TLS 1.3" and os_build < TLS13_MIN_BUILD:
        return False
    enabled = dword(values, "Enabled")
    disabled_by_default = dword(values, "DisabledByDefault")
    if enabled == 0 or disabled_by_default == 1:
        return False
    if enabled is not None:
        return True
    return default_enabled(protocol, os_build)


def suite_protocols(name: str) -> tuple[str, ...]:
    """The TLS versions a suite can be negotiated with ("Cipher suites can only be negotiated for TLS versions which
    support them", Microsoft's TLS cipher suite tables): TLS 1.3 suites over TLS 1.3 only; AEAD (GCM) and SHA-256/384
    MAC suites over TLS 1.2 only; SHA-1 or MD5 MAC suites (``*_CBC_SHA``, 3DES, RC4) over TLS 1.0, 1.1 and 1.2. NULL
    suites are "only used when an application explicitly requests" them: none for the listener."""
    if name.startswith(("TLS_AES_", "TLS_CHACHA20_")):
        return ("TLS 1.3",)
    if "_NULL_" in name:
        return ()
    if name.endswith(("_SHA", "_MD5")):
        return ("TLS 1.0", "TLS 1.1", "TLS 1.2")
    return ("TLS 1.2",)


def suite_key_types(name: str) -> frozenset[str]:
    """The listener key types a suite can authenticate with (TLS 1.3 suites: any, the signature is negotiated)."""
    if name.startswith(("TLS_AES_", "TLS_CHACHA20_")):
        return frozenset({"RSA", "EC"})
    if "_ECDSA_" in name:
        return frozenset({"EC"})
    if name.startswith(("TLS_RSA_", "TLS_ECDHE_RSA_", "TLS_DHE_RSA_", "SSL_RSA_")):
        return frozenset({"RSA"})
    if "_DSS_" in name:
        return frozenset({"DSA"})
    return frozenset()


def usable_suites(suites: t.Sequence[str], key_type: str | None, enabled_protocols: t.Collection[str]) -> list[str]:
    """Suites a client could agree on with this listener: key type fits (unknown key: any) and a protocol is on."""
    usable: list[str] = []
    for name in suites:
        if key_type is not None and key_type not in suite_key_types(name):
            continue
        if not any(protocol in enabled_protocols for protocol in suite_protocols(name)):
            continue
        usable.append(name)
    return usable


def validate(legacy_protocols: object, nla: object, bool_options: dict[str, object]) -> list[str]:
    """Messages for invalid options (checked before any host is touched)."""
    problems: list[str] = []
    if not isinstance(legacy_protocols, list) or any(item not in LEGACY_CHOICES for item in legacy_protocols):
        problems.append(f"legacy_protocols must be a list of {', '.join(LEGACY_CHOICES)}, got {legacy_protocols!r}")
    if nla not in NLA_CHOICES:
        problems.append(f"nla must be one of {', '.join(NLA_CHOICES)}, not {nla!r}")
    for name, value in bool_options.items():
        if not isinstance(value, bool):
            problems.append(f"{name} must be true or false, not {value!r}")
    return problems


@dataclass(frozen=True)
class TlsOptions:
    enable_tls12: bool = True
    enable_tls13: bool = True
    legacy_protocols: tuple[str, ...] = ()
    restore_security_layer: bool = True
    nla: str = "enabled"
    restore_cipher_suites: bool = True
    # Write values under HKLM:\SOFTWARE\Policies (Group Policy's place): only when explicitly asked.
    override_policy: bool = False


@dataclass(frozen=True)
class TlsState:
    """What the read batch found. ``protocols`` maps a protocol to its Server key's values ({} when absent);
    ``cipher_suites`` is the effective list (Get-TlsCipherSuite) or None when the build cannot list it."""

    os_build: int
    protocols: dict[str, dict[str, t.Any]]
    cipher_suites: list[str] | None
    cipher_policy: dict[str, t.Any]
    key_type: str | None
    fips: dict[str, t.Any]
    listener: dict[str, t.Any]
    policy: dict[str, t.Any]
    # When the host last booted (system.info) and rdpfix's record of the boot during which it last changed a setting
    # Schannel only reads at boot: equal means that change still waits for a reboot.
    boot_time: str | None = None
    pending_marker: dict[str, t.Any] | None = None  # {type, value} of PENDING_VALUE, None when absent

    @property
    def changed_during_boot(self) -> str | None:
        value = self.pending_marker.get("value") if self.pending_marker else None
        return value if isinstance(value, str) else None


# The stores the listener's certificate can come from: a pinned or template certificate (My), the self-signed one.
CERT_STORES = ("My", "Remote Desktop")
# Registry keys read whole besides the protocol keys.
TLS_KEYS = (CIPHER_POLICY_KEY, FIPS_KEY, LISTENER_KEY, POLICY_KEY, PENDING_KEY)


@dataclass(frozen=True)
class TlsReads:
    """Where ``add_reads`` put each read in the batch."""

    system: int
    protocols: dict[str, int]
    keys: dict[str, int]
    suites: int
    listener: int
    stores: tuple[int, ...]


def add_reads(batch: Batch) -> TlsReads:
    return TlsReads(
        system=batch.add("system.info"),
        protocols={protocol: batch.add("registry.get", path=protocol_key(protocol)) for protocol in PROTOCOLS},
        keys={key: batch.add("registry.get", path=key) for key in TLS_KEYS},
        suites=batch.add("tls.cipher_suites.list"),
        listener=batch.add("listener.get"),
        stores=tuple(batch.add("cert.list", store=store) for store in CERT_STORES),
    )


def listener_key_type(result: BatchResult, listener: int, stores: t.Sequence[int]) -> str | None:
    """The key type of the certificate the listener presents (the pinned one, else the self-signed one).

    Only the cipher-suite check needs it, and that check treats an unknown key type as "any": a store or listener
    read that failed costs precision, not the plan, so failures give None rather than an error.
    """
    listener_data = result[listener].data if result[listener].ok else {}
    wanted = (listener_data.get("ssl_certificate_sha1_hash") or "").upper()
    candidates: list[dict[str, t.Any]] = []
    for position in stores:
        if result[position].ok:
            candidates.extend(result[position].data.get("certificates") or [])
    chosen = next((c for c in candidates if str(c.get("thumbprint", "")).upper() == wanted), None) if wanted else None
    if chosen is None:
        chosen = next((c for c in candidates if c.get("has_private_key")), None)
    if chosen is None:
        return None
    try:
        return t.cast(str | None, summarize_certificate(base64.b64decode(chosen["der_b64"])).get("key_type"))
    except (CertificateParseError, KeyError, ValueError):
        return None


def state_from(result: BatchResult, reads: TlsReads) -> TlsState:
    """The state from the batch's results; a failed registry, system or suite read raises OperationError."""
    system = result.data(reads.system)
    suites = result.data(reads.suites)
    values = {key: result.data(position).get("values") or {} for key, position in reads.keys.items()}
    return TlsState(
        os_build=int(system.get("os_build") or 0),
        protocols={p: result.data(position).get("values") or {} for p, position in reads.protocols.items()},
        cipher_suites=[s["name"] for s in suites.get("suites") or []] if suites.get("available") else None,
        cipher_policy=values[CIPHER_POLICY_KEY],
        key_type=listener_key_type(result, reads.listener, reads.stores),
        fips=values[FIPS_KEY],
        listener=values[LISTENER_KEY],
        policy=values[POLICY_KEY],
        boot_time=system.get("boot_time"),
        pending_marker=values[PENDING_KEY].get(PENDING_VALUE),
    )


@dataclass
class TlsPlan:
    findings: list[dict[str, t.Any]] = field(default_factory=list)
    changes: list[RegistryChange] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reboot_required: bool = False
    report: dict[str, t.Any] = field(default_factory=dict)
    before: dict[str, t.Any] = field(default_factory=dict)
    after: dict[str, t.Any] = field(default_factory=dict)


def _fix(options: dict[str, t.Any], description: str) -> dict[str, t.Any]:
    return fix("tls", options, description)


POLICY_REFRESH_NOTE = (
    "a value changed here comes back at the next Group Policy refresh (every 90 minutes or so, and at boot) while a "
    "GPO sets it: change the GPO, or run with override_policy: true to write it anyway until then"
)


def _policy_title(value_name: str, path: str) -> str:
    return f"; enforced by Group Policy ({path}\\{value_name}): {POLICY_REFRESH_NOTE}"


def _policy_warning(value_name: str, path: str, value: object) -> str:
    return (
        f"Writing the Group Policy value {path}\\{value_name} = {value} because override_policy asks for it: Group "
        "Policy puts its own value back at the next refresh unless the GPO that sets it is changed"
    )


def _effective(listener: int | None, policy: int | None) -> dict[str, t.Any]:
    """The policy value wins over the listener value when present."""
    if policy is not None:
        return {"listener": listener, "policy": policy, "effective": policy, "source": "policy"}
    return {"listener": listener, "policy": None, "effective": listener, "source": "listener"}


def _policy_suites(cipher_policy: dict[str, t.Any]) -> list[str] | None:
    entry = cipher_policy.get(CIPHER_POLICY_VALUE)
    if not isinstance(entry, dict):
        return None
    value = entry.get("value")
    if isinstance(value, list):
        return [str(item).strip() for item in value if str(item).strip()]
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return None


def _enable_protocol(plan: TlsPlan, protocol: str, values: dict[str, t.Any]) -> None:
    path = protocol_key(protocol)
    if dword(values, "Enabled") != 1:
        plan.changes.append(RegistryChange(path, "Enabled", "REG_DWORD", 1, values.get("Enabled")))
    if dword(values, "DisabledByDefault") not in (None, 0):
        plan.changes.append(RegistryChange(path, "DisabledByDefault", "REG_DWORD", 0, values.get("DisabledByDefault")))
    plan.reboot_required = True


def plan_tls(state: TlsState, options: TlsOptions) -> TlsPlan:
    plan = TlsPlan()
    build = state.os_build

    # --- protocols ---------------------------------------------------------------------------------------------
    enabled_before = {p: protocol_enabled(p, state.protocols.get(p, {}), build) for p in PROTOCOLS}
    enabled_after = dict(enabled_before)

    for protocol, option_on in (("TLS 1.2", options.enable_tls12), ("TLS 1.3", options.enable_tls13)):
        if enabled_before[protocol]:
            continue
        if protocol == "TLS 1.3" and build < TLS13_MIN_BUILD:
            continue
        values = state.protocols.get(protocol, {})
        severity = "critical" if protocol == "TLS 1.2" else "warning"
        description = f"enable {protocol} for the Schannel server (Enabled=1, DisabledByDefault=0), then reboot"
        plan.findings.append(
            finding(
                f"tls.{protocol.replace(' ', '').replace('.', '').lower()}_disabled",
                severity,
                f"{protocol} is disabled for the Schannel server",
                "tls",
                {"path": protocol_key(protocol), "values": values, "os_build": build},
                _fix({"enable_" + protocol.replace(" ", "").replace(".", "").lower(): True}, description)
                if option_on
                else None,
            )
        )
        if option_on:
            _enable_protocol(plan, protocol, values)
            enabled_after[protocol] = True

    tls13_values = state.protocols.get("TLS 1.3", {})
    tls13_switched_on = dword(tls13_values, "Enabled") not in (None, 0) and (
        dword(tls13_values, "DisabledByDefault") != 1
    )
    if build < TLS13_EXPERIMENTAL_BUILD and tls13_switched_on:
        # Server 2019 and older have no TLS 1.3: the value does nothing (a client offering TLS 1.3 gets TLS 1.2).
        plan.findings.append(
            finding(
                "tls.tls13_no_effect",
                "info",
                f"The TLS 1.3 Schannel server key is switched on, but build {build} has no TLS 1.3 (Microsoft: not "
                "supported before Windows 11 / Server 2022): the value has no effect and is left alone",
                "tls",
                {"path": protocol_key("TLS 1.3"), "values": tls13_values, "os_build": build},
                None,
            )
        )
    elif build < TLS13_MIN_BUILD and tls13_switched_on:
        # Windows 10 1903-22H2: the value switches on an experimental pre-draft TLS 1.3, which Microsoft calls not a
        # safe configuration before Windows 11 / Server 2022. Removing it leaves TLS 1.3 as the build has it (none)
        # and turns nothing weaker on.
        plan.findings.append(
            finding(
                "tls.tls13_forced_unsupported",
                "warning",
                f"TLS 1.3 is switched on for the Schannel server of build {build}, whose TLS 1.3 is experimental "
                "(Windows 10 1903 to 22H2): Microsoft calls enabling it before Windows 11 / Server 2022 not a safe "
                "configuration",
                "tls",
                {"path": protocol_key("TLS 1.3"), "values": tls13_values, "os_build": build},
                _fix({}, "remove the TLS 1.3 Server Enabled value (build default), then reboot"),
            )
        )
        plan.changes.append(RegistryChange(protocol_key("TLS 1.3"), "Enabled", None, None, tls13_values.get("Enabled")))
        plan.reboot_required = True

    for protocol in options.legacy_protocols:
        if enabled_before[protocol]:
            continue
        _enable_protocol(plan, protocol, state.protocols.get(protocol, {}))
        enabled_after[protocol] = True
        plan.warnings.append(
            f"{protocol} is being enabled for the Schannel server because legacy_protocols asks for it: it is a "
            "deprecated protocol with known weaknesses; remove it again once the old clients are gone"
        )

    weak_on = [p for p in WEAK_PROTOCOLS if enabled_before[p] and p not in options.legacy_protocols]
    if weak_on:
        plan.findings.append(
            finding(
                "tls.weak_protocols_enabled",
                "security",
                f"Deprecated protocols are enabled for the Schannel server: {', '.join(weak_on)}",
                "tls",
                {"protocols": weak_on, "os_build": build},
                None,
            )
        )

    # --- cipher suites -----------------------------------------------------------------------------------------
    policy_suites = _policy_suites(state.cipher_policy)
    effective_suites = state.cipher_suites if state.cipher_suites is not None else policy_suites
    on_after = [p for p, on in enabled_after.items() if on]
    usable: list[str] | None = None
    if effective_suites is not None:
        usable = usable_suites(effective_suites, state.key_type, on_after)
        # Schannel loads the policy at boot: when the policy already lists usable suites (an earlier run, or someone
        # else, wrote it since the last boot), writing it again changes nothing - the reboot is what is missing.
        policy_usable = bool(policy_suites) and bool(usable_suites(policy_suites or [], state.key_type, on_after))
        if not usable:
            empty = not effective_suites
            title = (
                "The effective cipher-suite list is empty"
                if empty
                else f"No enabled cipher suite works with the listener's {state.key_type or 'certificate'} key over "
                f"an enabled protocol ({', '.join(p for p in on_after if p.startswith('TLS')) or 'none'})"
            )
            policy_set = CIPHER_POLICY_VALUE in state.cipher_policy
            if policy_usable:
                title += "; the cipher-suite policy already lists usable suites, which Schannel loads at the next boot"
                plan.reboot_required = True
            elif policy_set:
                title += _policy_title(CIPHER_POLICY_VALUE, CIPHER_POLICY_KEY)
            else:
                # The only fix rdpfix has writes the policy value: that, too, waits for an explicit override_policy.
                title += (
                    f"; the fix writes the cipher-suite order policy value ({CIPHER_POLICY_KEY}\\"
                    f"{CIPHER_POLICY_VALUE}), which needs override_policy: true"
                )
            # The AEAD list serves TLS 1.2 and 1.3 only: with neither on, writing it would change nothing usable.
            restorable = bool(usable_suites(RESTORED_CIPHER_SUITES, state.key_type, on_after))
            if not restorable and not policy_usable:
                title += "; a list of AEAD suites needs TLS 1.2 or 1.3, which are off (enable_tls12)"
            can_fix = options.restore_cipher_suites and not policy_usable and restorable
            will_fix = can_fix and options.override_policy
            plan.findings.append(
                finding(
                    "tls.cipher_suites_empty" if empty else "tls.cipher_suites_incompatible",
                    "critical",
                    title,
                    "tls",
                    {
                        "effective": effective_suites,
                        "policy": policy_suites,
                        "key_type": state.key_type,
                        "enabled_protocols": on_after,
                        "policy_path": CIPHER_POLICY_KEY,
                        "enforced_by_policy": policy_set,
                    },
                    _fix(
                        {"restore_cipher_suites": True, "override_policy": True},
                        "write a list of AEAD cipher suites to the cipher-suite order policy, then reboot",
                    )
                    if can_fix
                    else None,
                )
            )
            if will_fix:
                plan.warnings.append(
                    _policy_warning(CIPHER_POLICY_VALUE, CIPHER_POLICY_KEY, "(a list of AEAD cipher suites)")
                )
                previous = state.cipher_policy.get(CIPHER_POLICY_VALUE)
                # Keep the value type Windows already uses there; the policy editor writes one comma-separated string.
                as_list = isinstance(previous, dict) and previous.get("type") == "REG_MULTI_SZ"
                plan.changes.append(
                    RegistryChange(
                        CIPHER_POLICY_KEY,
                        CIPHER_POLICY_VALUE,
                        "REG_MULTI_SZ" if as_list else "REG_SZ",
                        list(RESTORED_CIPHER_SUITES) if as_list else ",".join(RESTORED_CIPHER_SUITES),
                        previous,
                    )
                )
                plan.reboot_required = True

    # --- FIPS --------------------------------------------------------------------------------------------------
    fips_on = dword(state.fips, "Enabled") == 1
    if fips_on:
        plan.findings.append(
            finding(
                "tls.fips_policy_enabled",
                "info",
                "The FIPS algorithm policy is on: only FIPS-approved suites and protocols are used",
                "tls",
                {"path": FIPS_KEY, "enabled": 1},
                None,
            )
        )

    # --- security layer and NLA ----------------------------------------------------------------------------------
    layer = _effective(dword(state.listener, SECURITY_LAYER), dword(state.policy, SECURITY_LAYER))
    nla = _effective(dword(state.listener, USER_AUTHENTICATION), dword(state.policy, USER_AUTHENTICATION))
    encryption = _effective(dword(state.listener, MIN_ENCRYPTION_LEVEL), dword(state.policy, MIN_ENCRYPTION_LEVEL))
    layer_after = dict(layer)
    nla_after = dict(nla)

    evidence_layer = {"listener": layer["listener"], "policy": layer["policy"], "effective_from": layer["source"]}
    if layer["listener"] == SECURITY_LAYER_RDP:
        in_effect = layer["source"] == "listener"
        plan.findings.append(
            finding(
                "tls.security_layer_rdp",
                "security" if in_effect else "info",
                "SecurityLayer is 0 (native RDP security, no TLS)"
                + ("" if in_effect else " in the listener value, not in effect: the policy value wins"),
                "security_downgrade",
                evidence_layer,
                _fix({"restore_security_layer": True}, "set SecurityLayer to 2 (TLS)")
                if options.restore_security_layer
                else None,
            )
        )
        if options.restore_security_layer:
            plan.changes.append(
                RegistryChange(
                    LISTENER_KEY, SECURITY_LAYER, "REG_DWORD", SECURITY_LAYER_TLS, state.listener.get(SECURITY_LAYER)
                )
            )
            layer_after["listener"] = SECURITY_LAYER_TLS
    if layer["policy"] == SECURITY_LAYER_RDP:
        plan.findings.append(
            finding(
                "tls.security_layer_rdp_policy",
                "security",
                "SecurityLayer is 0 (native RDP security, no TLS)" + _policy_title(SECURITY_LAYER, POLICY_KEY),
                "security_downgrade",
                {**evidence_layer, "policy_path": POLICY_KEY, "enforced_by_policy": True},
                _fix(
                    {"restore_security_layer": True, "override_policy": True},
                    "set the policy value SecurityLayer to 2 (TLS); better: change the GPO that sets it",
                )
                if options.restore_security_layer
                else None,
            )
        )
        if options.restore_security_layer and options.override_policy:
            plan.changes.append(
                RegistryChange(
                    POLICY_KEY, SECURITY_LAYER, "REG_DWORD", SECURITY_LAYER_TLS, state.policy.get(SECURITY_LAYER)
                )
            )
            plan.warnings.append(_policy_warning(SECURITY_LAYER, POLICY_KEY, SECURITY_LAYER_TLS))
            layer_after["policy"] = SECURITY_LAYER_TLS
    layer_after["effective"] = layer_after["policy"] if layer_after["policy"] is not None else layer_after["listener"]
    if (
        SECURITY_LAYER_RDP not in (layer["listener"], layer["policy"])
        and layer["effective"] == SECURITY_LAYER_NEGOTIATE
    ):
        plan.findings.append(
            finding(
                "tls.security_layer_negotiate",
                "info",
                "SecurityLayer is 1 (negotiate): a client that cannot do TLS falls back to native RDP security",
                "security_downgrade",
                evidence_layer,
                None,
            )
        )

    evidence_nla = {"listener": nla["listener"], "policy": nla["policy"], "effective_from": nla["source"]}
    if options.nla == "enabled":
        if nla["listener"] == 0:
            in_effect = nla["source"] == "listener"
            plan.findings.append(
                finding(
                    "tls.nla_disabled",
                    "security" if in_effect else "info",
                    "Network Level Authentication is off"
                    + ("" if in_effect else " in the listener value, not in effect: the policy value wins"),
                    "security_downgrade",
                    evidence_nla,
                    _fix({"nla": "enabled"}, "set UserAuthentication to 1"),
                )
            )
            plan.changes.append(
                RegistryChange(
                    LISTENER_KEY, USER_AUTHENTICATION, "REG_DWORD", 1, state.listener.get(USER_AUTHENTICATION)
                )
            )
            nla_after["listener"] = 1
        if nla["policy"] == 0:
            plan.findings.append(
                finding(
                    "tls.nla_disabled_policy",
                    "security",
                    "Network Level Authentication is off" + _policy_title(USER_AUTHENTICATION, POLICY_KEY),
                    "security_downgrade",
                    {**evidence_nla, "policy_path": POLICY_KEY, "enforced_by_policy": True},
                    _fix(
                        {"nla": "enabled", "override_policy": True},
                        "set the policy value UserAuthentication to 1; better: change the GPO that sets it",
                    ),
                )
            )
            if options.override_policy:
                plan.changes.append(
                    RegistryChange(
                        POLICY_KEY, USER_AUTHENTICATION, "REG_DWORD", 1, state.policy.get(USER_AUTHENTICATION)
                    )
                )
                plan.warnings.append(_policy_warning(USER_AUTHENTICATION, POLICY_KEY, 1))
                nla_after["policy"] = 1
    elif options.nla == "disabled":
        if nla["listener"] != 0:
            plan.changes.append(
                RegistryChange(
                    LISTENER_KEY, USER_AUTHENTICATION, "REG_DWORD", 0, state.listener.get(USER_AUTHENTICATION)
                )
            )
            nla_after["listener"] = 0
        if nla["policy"] not in (None, 0):
            if options.override_policy:
                plan.changes.append(
                    RegistryChange(
                        POLICY_KEY, USER_AUTHENTICATION, "REG_DWORD", 0, state.policy.get(USER_AUTHENTICATION)
                    )
                )
                plan.warnings.append(_policy_warning(USER_AUTHENTICATION, POLICY_KEY, 0))
                nla_after["policy"] = 0
            else:
                plan.warnings.append(
                    f"Network Level Authentication stays on: Group Policy enforces it ({POLICY_KEY}\\"
                    f"{USER_AUTHENTICATION} = {nla['policy']}), and nla=disabled does not override a policy value "
                    "without override_policy: true"
                )
        if any(change.name == USER_AUTHENTICATION for change in plan.changes):
            plan.warnings.append(
                "Network Level Authentication is being turned off because nla=disabled asks for it: the server then "
                "shows its logon screen to anyone who can reach it; turn it back on (nla: enabled) when done"
            )
    elif nla["effective"] == 0:
        plan.findings.append(
            finding(
                "tls.nla_disabled_policy" if nla["source"] == "policy" else "tls.nla_disabled",
                "security",
                "Network Level Authentication is off"
                + (_policy_title(USER_AUTHENTICATION, POLICY_KEY) if nla["source"] == "policy" else ""),
                "security_downgrade",
                evidence_nla,
                None,
            )
        )
    nla_after["effective"] = nla_after["policy"] if nla_after["policy"] is not None else nla_after["listener"]

    # --- a reboot still pending from an earlier run ---------------------------------------------------------------
    if plan.reboot_required and state.boot_time:
        if state.changed_during_boot != state.boot_time:
            plan.changes.append(
                RegistryChange(PENDING_KEY, PENDING_VALUE, "REG_SZ", state.boot_time, state.pending_marker)
            )
    elif state.boot_time and state.changed_during_boot == state.boot_time:
        plan.reboot_required = True
        plan.findings.append(
            finding(
                "tls.reboot_pending",
                "warning",
                "Schannel settings were changed since the last boot and take effect only after a reboot",
                "tls",
                {"path": PENDING_KEY, "changed_during_boot": state.changed_during_boot, "boot_time": state.boot_time},
                None,
            )
        )

    plan.report = {
        "os_build": build,
        "protocols": {p: {"enabled": enabled_before[p], "values": state.protocols.get(p, {})} for p in PROTOCOLS},
        "cipher_suites": {
            "effective": effective_suites,
            "policy": policy_suites,
            "key_type": state.key_type,
            "usable": usable,
        },
        "fips": fips_on,
        "security_layer": layer,
        "user_authentication": nla,
        "min_encryption_level": encryption,
    }
    plan.before = {
        "protocols": {p: enabled_before[p] for p in PROTOCOLS},
        "security_layer": layer["effective"],
        "user_authentication": nla["effective"],
        "cipher_policy": policy_suites,
    }
    restored = [c for c in plan.changes if c.path == CIPHER_POLICY_KEY]
    plan.after = {
        "protocols": {p: enabled_after[p] for p in PROTOCOLS},
        "security_layer": layer_after["effective"],
        "user_authentication": nla_after["effective"],
        "cipher_policy": list(RESTORED_CIPHER_SUITES) if restored else policy_suites,
    }
    return plan
