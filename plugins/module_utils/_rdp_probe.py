# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connect to an RDP listener the way mstsc does and report what it met.

Entry point: ``probe(host, port=3389, ...) -> dict`` (JSON-serialisable). Each trial uses a fresh TCP connection,
since a server commits to one security layer and one TLS version per connection. Every failure a peer can cause is
caught and reported as a status; ``probe`` itself does not raise except for invalid arguments (ValueError), which
``validate_options`` reports before any connection is made.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import typing as t
from dataclasses import dataclass, field

from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_credssp as credssp
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_ntlm as ntlm
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_tls as tls
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_x224 as x224
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_names import (
    Resolver,
    check_names,
    is_ip_address,
    system_resolver,
)
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_udp import probe_udp
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_verdict import assess
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import (
    UTC,
    ProtocolViolation,
    Stopwatch,
    classify_exception,
    close_quietly,
    connect_tcp,
)

try:
    from ansible_collections.rdpfix.rdp.plugins.module_utils._x509 import summarize_certificate
except ImportError as import_error:  # pragma: no cover - only without the collection's own module_utils
    summarize_certificate = None  # type: ignore[assignment]
    X509_IMPORT_ERROR: str | None = str(import_error)
else:
    X509_IMPORT_ERROR = None

ALL_CHECKS = ("tcp", "negotiation", "tls", "credssp", "names", "udp")
ALL_PROTOCOLS = tuple(x224.TRIAL_REQUESTS)
ALL_TLS_VERSIONS = tuple(tls.TLS_VERSIONS)
# Trials whose acceptance means a TLS handshake follows, in the order the TLS probe prefers them.
TLS_CARRIERS = ("tls", "credssp", "credssp_early_user_auth")
CREDSSP_CARRIERS = ("credssp", "credssp_early_user_auth")


@dataclass
class ProbeOptions:
    host: str
    port: int = 3389
    server_name: str | None = None
    checks: list[str] = field(default_factory=lambda: list(ALL_CHECKS))
    protocols: list[str] = field(default_factory=lambda: list(ALL_PROTOCOLS))
    tls_versions: list[str] = field(default_factory=lambda: list(ALL_TLS_VERSIONS))
    connect_timeout: float = 5.0
    read_timeout: float = 5.0
    udp_port: int | None = None
    udp_timeout: float = 2.0
    expected_thumbprint: str | None = None
    cert_warn_days: int = 30
    max_clock_skew: float = 300.0
    cookie: str | None = None


def normalize_thumbprint(value: str) -> str:
    """Windows shows thumbprints with spaces or colons and sometimes an invisible U+200E: keep hex digits only."""
    return "".join(ch for ch in value if ch in "0123456789abcdefABCDEF").upper()


def validate_options(options: ProbeOptions) -> list[str]:
    """Every problem with the options, as messages an administrator understands; empty when all is well."""
    problems: list[str] = []
    if not options.host or not options.host.strip() or any(ch.isspace() for ch in options.host.strip()):
        problems.append(f"host must be a host name or IP address, got {options.host!r}")
    for name, port in (("port", options.port), ("udp_port", options.udp_port)):
        if port is not None and not 1 <= port <= 65535:
            problems.append(f"{name} must be between 1 and 65535, got {port}")
    for name, value in (
        ("connect_timeout", options.connect_timeout),
        ("read_timeout", options.read_timeout),
        ("udp_timeout", options.udp_timeout),
    ):
        if not 0 < value <= 300:
            problems.append(f"{name} must be more than 0 and at most 300 seconds, got {value}")
    for name, given, allowed in (
        ("checks", options.checks, ALL_CHECKS),
        ("protocols", options.protocols, ALL_PROTOCOLS),
        ("tls_versions", options.tls_versions, ALL_TLS_VERSIONS),
    ):
        unknown = [item for item in given if item not in allowed]
        if unknown:
            problems.append(
                f"{name}: unknown value(s) {', '.join(map(str, unknown))}; choose from {', '.join(allowed)}"
            )
    if options.expected_thumbprint is not None and len(normalize_thumbprint(options.expected_thumbprint)) != 40:
        problems.append("expected_thumbprint must be a SHA-1 thumbprint: 40 hexadecimal digits")
    if options.cert_warn_days < 0:
        problems.append("cert_warn_days must not be negative")
    if options.max_clock_skew <= 0:
        problems.append("max_clock_skew must be positive")
    if options.cookie is not None:
        try:
            x224.build_connection_request(0, options.cookie)
        except ValueError as exc:
            problems.append(f"cookie: {exc}")
    if options.server_name is not None and (not options.server_name.strip() or " " in options.server_name.strip()):
        problems.append(f"server_name must be a host name or IP address, got {options.server_name!r}")
    return problems


@dataclass
class _Target:
    family: int
    sockaddr: tuple[t.Any, ...]

    @property
    def address(self) -> str:
        return str(self.sockaddr[0])


class _Prober:
    def __init__(self, options: ProbeOptions, resolver: Resolver, now: datetime.datetime | None) -> None:
        self.options = options
        self.resolver = resolver
        self.now = now
        self.target: _Target | None = None
        self.connect_name = (options.server_name or options.host).strip()
        # SNI is sent as mstsc does (with the name typed), but never for an IP address, which SNI forbids.
        self.sni = None if is_ip_address(self.connect_name) else self.connect_name

    # --- TCP -----------------------------------------------------------------------------------------
    def check_tcp(self) -> dict[str, t.Any]:
        watch = Stopwatch()
        host = self.options.host.strip().strip("[]")
        try:
            addresses = [host] if is_ip_address(host) else self.resolver(host)
        except Exception as exc:
            # Whatever the resolver raised (gaierror, UnicodeError for an invalid IDNA label...), DNS failed.
            _status, detail = classify_exception(exc)
            return {"status": "unresolved", "detail": detail, "address": None, "elapsed_ms": watch.elapsed_ms()}
        if not addresses:
            return {
                "status": "unresolved",
                "detail": f"{host} has no address",
                "address": None,
                "elapsed_ms": watch.elapsed_ms(),
            }
        attempts: list[dict[str, t.Any]] = []
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr: tuple[t.Any, ...] = (address, self.options.port)
            attempt_watch = Stopwatch()
            sock: socket.socket | None = None
            try:
                sock = connect_tcp(sockaddr, family, self.options.connect_timeout)
            except Exception as exc:
                status, detail = classify_exception(exc)
                attempts.append(
                    {"address": address, "status": status, "detail": detail, "elapsed_ms": attempt_watch.elapsed_ms()}
                )
                continue
            finally:
                close_quietly(sock)
            self.target = _Target(family=family, sockaddr=sockaddr)
            attempts.append({"address": address, "status": "open", "elapsed_ms": attempt_watch.elapsed_ms()})
            break
        last = attempts[-1]
        result: dict[str, t.Any] = {
            "status": last["status"],
            "address": last["address"],
            "port": self.options.port,
            "elapsed_ms": last["elapsed_ms"],
            "total_elapsed_ms": watch.elapsed_ms(),
        }
        if "detail" in last:
            result["detail"] = last["detail"]
        if len(attempts) > 1:
            result["attempts"] = attempts
        return result

    def _connect(self) -> socket.socket:
        if self.target is None:  # only called after check_tcp found an open address
            raise RuntimeError("no open address to connect to: check_tcp must succeed first")
        sock = connect_tcp(self.target.sockaddr, self.target.family, self.options.connect_timeout)
        sock.settimeout(self.options.read_timeout)
        return sock

    # --- X.224 ---------------------------------------------------------------------------------------
    def negotiation_trial(self, name: str) -> dict[str, t.Any]:
        requested = x224.TRIAL_REQUESTS[name]
        trial: dict[str, t.Any] = {
            "requested": [x224.protocol_name(bit) for bit in (1, 2, 4, 8, 16) if requested & bit] or ["rdp"],
            "requested_value": requested,
        }
        watch = Stopwatch()
        sock: socket.socket | None = None
        try:
            sock = self._connect()
            confirm = x224.negotiate(sock, requested, self.options.cookie)
        except Exception as exc:
            trial["status"], trial["detail"] = classify_exception(exc)
            trial["elapsed_ms"] = watch.elapsed_ms()
            return trial
        finally:
            close_quietly(sock)
        trial["elapsed_ms"] = watch.elapsed_ms()
        trial["confirm"] = confirm.as_dict()
        selected = x224.selects(confirm)
        if confirm.kind == "failure":
            trial["status"] = "negotiation_failure"
            trial["failure_code"] = confirm.failure_code
            trial["failure_name"] = x224.failure_name(confirm.failure_code or 0)
        elif selected == x224.TRIAL_TARGETS[name]:
            trial["status"] = "accepted"
        else:
            # xrdp answers a CredSSP request by selecting TLS: a positive answer that is NOT acceptance.
            trial["status"] = "selected_other"
            trial["selected_protocol"] = x224.protocol_name(selected if selected is not None else -1)
        return trial

    def check_negotiation(self) -> dict[str, t.Any]:
        trials = {name: self.negotiation_trial(name) for name in self.options.protocols}
        accepted = [name for name, trial in trials.items() if trial["status"] == "accepted"]
        failures = {name: trial["failure_name"] for name, trial in trials.items() if "failure_name" in trial}
        nla_required: bool | None = None
        if "tls" in trials and trials["tls"]["status"] in ("accepted", "negotiation_failure", "selected_other"):
            nla_required = trials["tls"].get("failure_code") in (5, 6)
        legacy = any(trial.get("confirm", {}).get("kind") == "legacy" for trial in trials.values())
        return {
            "trials": trials,
            "accepted": accepted,
            "failure_codes": failures,
            "nla_required": nla_required,
            "legacy_server": legacy,
        }

    # --- TLS -----------------------------------------------------------------------------------------
    def _open_tls(self, carrier: str, version: str | None) -> tuple[tls.TlsChannel, tls.TlsSession]:
        """Fresh connection, X.224 with the carrier's request, then the TLS handshake."""
        sock = self._connect()
        try:
            confirm = x224.negotiate(sock, x224.TRIAL_REQUESTS[carrier], self.options.cookie)
            selected = x224.selects(confirm)
            if not x224.uses_tls(selected):
                raise ProtocolViolation(
                    f"the server did not select a TLS-based protocol this time ({confirm.as_dict()})"
                )
            return tls.handshake(sock, self.sni, version)
        except BaseException:
            close_quietly(sock)
            raise

    def check_tls(self, negotiation: dict[str, t.Any]) -> dict[str, t.Any]:
        carrier = next((name for name in TLS_CARRIERS if name in negotiation["accepted"]), None)
        if carrier is None:
            return {"status": "skipped", "detail": "the server accepted no TLS-based security layer"}
        versions: dict[str, dict[str, t.Any]] = {}
        best: tls.TlsSession | None = None
        for version in self.options.tls_versions:
            watch = Stopwatch()
            if not tls.client_supports(version):
                versions[version] = {"status": "untested", "detail": "this machine's OpenSSL cannot offer it"}
                continue
            try:
                channel, session = self._open_tls(carrier, version)
            except Exception as exc:
                status, detail = classify_exception(exc)
                versions[version] = {"status": status, "detail": detail, "elapsed_ms": watch.elapsed_ms()}
                continue
            channel.close()
            versions[version] = {"status": "accepted", **session.summary(), "elapsed_ms": watch.elapsed_ms()}
            best = session  # versions run oldest first, so the last success is the newest version
        accepted_versions = [name for name, item in versions.items() if item["status"] == "accepted"]
        result: dict[str, t.Any] = {
            "status": "probed",
            "carrier": carrier,
            "versions": versions,
            "accepted_versions": accepted_versions,
            "negotiated": best.summary() if best else None,
            "certificate": None,
        }
        if best is not None and best.certificate_der:
            result.update(self.describe_certificate(best.certificate_der))
        elif best is not None:
            result["certificate_error"] = "the server completed TLS without presenting a certificate"
        return result

    def describe_certificate(self, der: bytes) -> dict[str, t.Any]:
        # Without the full summary, the SHA-1 thumbprint (what Windows calls a thumbprint) still identifies the cert.
        if summarize_certificate is None:
            return {
                "certificate": {"thumbprint": hashlib.sha1(der).hexdigest().upper()},
                "certificate_error": f"certificate details unavailable: {X509_IMPORT_ERROR}",
            }
        try:
            return {"certificate": summarize_certificate(der, now=self.now)}
        except ValueError as exc:
            return {
                "certificate": {"thumbprint": hashlib.sha1(der).hexdigest().upper()},
                "certificate_error": str(exc),
            }

    # --- CredSSP -------------------------------------------------------------------------------------
    def check_credssp(
        self, negotiation: dict[str, t.Any], tls_report: dict[str, t.Any] | None = None
    ) -> dict[str, t.Any]:
        carrier = next((name for name in CREDSSP_CARRIERS if name in negotiation["accepted"]), None)
        if carrier is None:
            return {"status": "skipped", "detail": "the server did not select CredSSP (NLA)"}
        # The newest TLS version the TLS trials saw accepted: a server that resets one version (a device on the path
        # that does not know TLS 1.3, say) is reported by those trials, and must not be mistaken here for a failing
        # CredSSP provider.
        accepted = (tls_report or {}).get("accepted_versions") or []
        version = accepted[-1] if accepted else None
        watch = Stopwatch()
        result: dict[str, t.Any] = {"carrier": carrier}
        if version is not None:
            result["tls_version"] = version
        channel: tls.TlsChannel | None = None
        try:
            channel, _session = self._open_tls(carrier, version)
            channel.sendall(credssp.build_tsrequest(ntlm.build_negotiate()))
            reply = credssp.parse_tsrequest(credssp.read_tsrequest(channel))
            received_at = datetime.datetime.now(UTC)
        except Exception as exc:
            status, detail = classify_exception(exc)
            result.update(status=status, detail=f"CredSSP did not answer an NTLM NEGOTIATE: {detail}")
            result["elapsed_ms"] = watch.elapsed_ms()
            return result
        finally:
            if channel is not None:
                channel.close()
        result["elapsed_ms"] = watch.elapsed_ms()
        result["tsrequest_version"] = reply.version
        if reply.error_code is not None:
            result["error_code"] = f"0x{reply.error_code:08X}"
        if not reply.nego_tokens:
            result.update(status="invalid", detail="the TSRequest answer carries no NTLM token")
            return result
        try:
            challenge = ntlm.parse_challenge(reply.nego_tokens[0])
        except ProtocolViolation as exc:
            result.update(status="invalid", detail=str(exc))
            return result
        result["status"] = "challenge"
        result["detail"] = "CredSSP answered an NTLM NEGOTIATE with a CHALLENGE (no credentials were sent)"
        result["ntlm"] = challenge.as_dict(now=self.now or received_at)
        return result

    # --- UDP -----------------------------------------------------------------------------------------
    def check_udp(self) -> dict[str, t.Any]:
        if self.target is None:  # like _connect: the UDP check follows a successful check_tcp
            raise RuntimeError("no address to probe over UDP: check_tcp must succeed first")
        port = self.options.udp_port or self.options.port
        return probe_udp((self.target.address, port), self.target.family, self.options.udp_timeout)


def probe(
    host: str,
    port: int = 3389,
    *,
    server_name: str | None = None,
    checks: t.Sequence[str] | None = None,
    protocols: t.Sequence[str] | None = None,
    tls_versions: t.Sequence[str] | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 5.0,
    udp_port: int | None = None,
    udp_timeout: float = 2.0,
    expected_thumbprint: str | None = None,
    cert_warn_days: int = 30,
    max_clock_skew: float = 300.0,
    cookie: str | None = None,
    resolver: Resolver | None = None,
    now: datetime.datetime | None = None,
) -> dict[str, t.Any]:
    """Probe one RDP listener; see the module documentation for the returned structure.

    Raises ValueError (with every problem listed) for invalid options, before any packet is sent.
    """
    options = ProbeOptions(
        host=host,
        port=port,
        server_name=server_name,
        checks=list(ALL_CHECKS if checks is None else checks),
        protocols=list(ALL_PROTOCOLS if protocols is None else protocols),
        tls_versions=list(ALL_TLS_VERSIONS if tls_versions is None else tls_versions),
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        udp_port=udp_port,
        udp_timeout=udp_timeout,
        expected_thumbprint=expected_thumbprint,
        cert_warn_days=cert_warn_days,
        max_clock_skew=max_clock_skew,
        cookie=cookie,
    )
    problems = validate_options(options)
    if problems:
        raise ValueError("; ".join(problems))
    return run_probe(options, resolver=resolver, now=now)


def run_probe(
    options: ProbeOptions, resolver: Resolver | None = None, now: datetime.datetime | None = None
) -> dict[str, t.Any]:
    """Run the checks for already validated options. Never raises: an internal error becomes a finding."""
    watch = Stopwatch()
    prober = _Prober(options, resolver or system_resolver, now)
    # TLS and CredSSP trials need to know which request makes the server select TLS.
    wanted = set(options.checks)
    if wanted & {"tls", "credssp"}:
        wanted.add("negotiation")
    report: dict[str, t.Any] = {
        "target": {"host": options.host, "port": options.port, "server_name": prober.connect_name},
        "checks": [check for check in ALL_CHECKS if check in wanted or check == "tcp"],
        "tcp": None,
        "negotiation": None,
        "tls": None,
        "credssp": None,
        "names": None,
        "udp": None,
    }
    try:
        report["tcp"] = prober.check_tcp()
        report["target"]["address"] = report["tcp"].get("address")
        if report["tcp"]["status"] == "open":
            if "negotiation" in wanted:
                negotiation = prober.check_negotiation()
                report["negotiation"] = negotiation
                if "tls" in wanted:
                    report["tls"] = prober.check_tls(negotiation)
                if "credssp" in wanted:
                    report["credssp"] = prober.check_credssp(negotiation, report["tls"])
            if "udp" in wanted:
                report["udp"] = prober.check_udp()
        if "names" in wanted:
            report["names"] = check_names(
                prober.connect_name,
                report["tcp"].get("address"),
                (report["credssp"] or {}).get("ntlm"),
                (report["tls"] or {}).get("certificate"),
                prober.resolver,
            )
        report["internal_error"] = None
    except Exception as exc:  # a bug of ours must still come back as a report, not a traceback
        report["internal_error"] = f"{type(exc).__name__}: {exc}"
    try:
        report.update(assess(report, options))
    except Exception as exc:  # same rule for the verdict: report, never raise
        report["internal_error"] = report["internal_error"] or f"{type(exc).__name__}: {exc}"
        report.update(
            findings=[],
            verdict="unknown",
            connectable=None,
            summary=f"the probe could not assess its results: {type(exc).__name__}: {exc}",
        )
    report["elapsed_ms"] = watch.elapsed_ms()
    return report
