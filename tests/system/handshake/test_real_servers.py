"""The handshake probe against real RDP servers (xrdp, FreeRDP's shadow server) in known configurations.

Every expected answer is what the server was configured to do; nothing here is taken from the probe's own output.
"""

from __future__ import annotations

import hashlib
import json
import socket
import typing as t

import pytest

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe

pytestmark = pytest.mark.system

# The conftest's certificates name this host; the fixtures' types are t.Any here (conftest is not importable).
SERVER_NAME = "rdp-test.example"
XrdpFactory = t.Callable[..., t.Any]
ShadowFactory = t.Callable[[str], t.Any]
CertFiles = t.Any


def run_probe(port: int, **kwargs: t.Any) -> dict[str, t.Any]:
    kwargs.setdefault("server_name", SERVER_NAME)
    kwargs.setdefault("read_timeout", 3.0)
    kwargs.setdefault("udp_timeout", 0.3)
    kwargs.setdefault("resolver", lambda name: ["127.0.0.1"])
    result = probe("127.0.0.1", port, **kwargs)
    json.dumps(result)
    assert result["internal_error"] is None
    return result


def ids(result: dict[str, t.Any], severity: str | None = None) -> set[str]:
    return {item["id"] for item in result["findings"] if severity is None or item["severity"] == severity}


# --- xrdp ----------------------------------------------------------------------------------------------------------


def test_xrdp_negotiate_with_a_valid_certificate(xrdp: XrdpFactory, certs: dict[str, CertFiles]) -> None:
    server = xrdp(certs["valid"], security_layer="negotiate", ssl_protocols="TLSv1.2, TLSv1.3")
    result = run_probe(server.port)
    negotiation = result["negotiation"]
    # Negotiate: native RDP and TLS both allowed; xrdp has no CredSSP and answers a CredSSP request with TLS.
    assert negotiation["accepted"] == ["rdp", "tls"]
    assert negotiation["trials"]["credssp"]["status"] == "selected_other"
    assert negotiation["trials"]["credssp"]["selected_protocol"] == "tls"
    assert negotiation["nla_required"] is False
    tls = result["tls"]
    assert tls["accepted_versions"] == ["TLSv1.2", "TLSv1.3"]
    assert tls["negotiated"]["version"] == "TLSv1.3"
    certificate = tls["certificate"]
    assert certificate["thumbprint"] == hashlib.sha1(certs["valid"].der).hexdigest().upper()
    assert certificate["common_name"] == SERVER_NAME
    assert certificate["expired"] is False and 88 <= certificate["days_left"] <= 90
    assert result["names"]["certificate_matches_connect_name"] is True
    assert result["credssp"]["status"] == "skipped"
    assert not ids(result, "critical")
    assert "handshake.nla_not_offered" in ids(result)
    assert result["verdict"] == "connects_with_warnings"


def test_xrdp_expired_certificate(xrdp: XrdpFactory, certs: dict[str, CertFiles]) -> None:
    server = xrdp(certs["expired"], security_layer="tls")
    result = run_probe(server.port, checks=["negotiation", "tls"])
    certificate = result["tls"]["certificate"]
    assert certificate["thumbprint"] == hashlib.sha1(certs["expired"].der).hexdigest().upper()
    assert certificate["expired"] is True and certificate["days_left"] < 0
    assert "handshake.certificate_expired" in ids(result, "warning")
    assert result["verdict"] == "connects_with_prompt"


def test_xrdp_tls_only(xrdp: XrdpFactory, certs: dict[str, CertFiles]) -> None:
    server = xrdp(certs["valid"], security_layer="tls")
    result = run_probe(server.port, checks=["negotiation", "tls"])
    trials = result["negotiation"]["trials"]
    assert trials["rdp"]["status"] == "negotiation_failure"
    assert trials["rdp"]["failure_name"] == "SSL_REQUIRED_BY_SERVER"
    assert result["negotiation"]["accepted"] == ["tls"]
    assert result["tls"]["accepted_versions"] == ["TLSv1.2", "TLSv1.3"]


def test_xrdp_native_rdp_only(xrdp: XrdpFactory, certs: dict[str, CertFiles]) -> None:
    server = xrdp(certs["valid"], security_layer="rdp")
    result = run_probe(server.port, checks=["negotiation", "tls"])
    assert result["negotiation"]["accepted"] == ["rdp"]
    # xrdp answers a TLS request by selecting native RDP rather than with SSL_NOT_ALLOWED_BY_SERVER.
    assert result["negotiation"]["trials"]["tls"]["selected_protocol"] == "rdp"
    assert result["tls"]["status"] == "skipped"
    assert "handshake.native_rdp_only" in ids(result, "security")


def test_xrdp_tls_1_0_only(xrdp: XrdpFactory, certs: dict[str, CertFiles]) -> None:
    server = xrdp(certs["valid"], security_layer="tls", ssl_protocols="TLSv1", tls_ciphers="DEFAULT:@SECLEVEL=0")
    result = run_probe(server.port, checks=["negotiation", "tls"])
    versions = result["tls"]["versions"]
    assert result["tls"]["accepted_versions"] == ["TLSv1.0"]
    assert {versions[name]["status"] for name in ("TLSv1.1", "TLSv1.2", "TLSv1.3")} <= {"tls_alert", "wrong_version"}
    assert "handshake.tls_legacy_only" in ids(result, "warning")


def test_xrdp_that_cannot_build_its_tls_credential_is_the_0x904_case(
    xrdp: XrdpFactory, certs: dict[str, CertFiles]
) -> None:
    server = xrdp(certs["mismatched"], security_layer="tls")
    result = run_probe(server.port, checks=["negotiation", "tls"])
    assert result["negotiation"]["accepted"] == ["tls"]
    assert {item["status"] for item in result["tls"]["versions"].values()} <= {"closed", "reset"}
    critical = [item for item in result["findings"] if item["severity"] == "critical"]
    assert [item["id"] for item in critical] == ["handshake.tls_closed"]
    assert critical[0]["effect"] == "0x904/0x7"
    assert result["verdict"] == "fails"
    # The server's own log confirms why it closed.
    assert "do not match" in server.log.read_text(errors="replace")


# --- FreeRDP shadow server -----------------------------------------------------------------------------------------


def test_shadow_server_requiring_nla(shadow: ShadowFactory) -> None:
    server = shadow("nla")
    result = run_probe(server.port, checks=["negotiation", "tls", "credssp", "names"])
    negotiation = result["negotiation"]
    assert negotiation["accepted"] == ["credssp"]
    assert negotiation["nla_required"] is True
    assert negotiation["trials"]["tls"]["failure_name"] == "HYBRID_REQUIRED_BY_SERVER"
    assert negotiation["trials"]["rdp"]["failure_name"] == "HYBRID_REQUIRED_BY_SERVER"
    assert result["tls"]["carrier"] == "credssp"
    assert "TLSv1.2" in result["tls"]["accepted_versions"]
    credssp = result["credssp"]
    assert credssp["status"] == "challenge"
    # FreeRDP's NTLM server names itself after this machine.
    own_name = socket.gethostname().split(".")[0]
    assert credssp["ntlm"]["netbios_computer"].upper() == own_name.upper()[:15]
    assert abs(credssp["ntlm"]["clock_skew_seconds"]) < 5
    assert result["names"]["server_netbios_name"] == credssp["ntlm"]["netbios_computer"]
    assert "handshake.nla_required" in ids(result, "info")
    assert not ids(result, "critical")


def test_shadow_server_tls_only(shadow: ShadowFactory) -> None:
    server = shadow("tls")
    result = run_probe(server.port, checks=["negotiation", "tls", "credssp"])
    assert result["negotiation"]["accepted"] == ["tls"]
    assert result["negotiation"]["trials"]["rdp"]["failure_name"] == "SSL_REQUIRED_BY_SERVER"
    assert result["credssp"]["status"] == "skipped"
    assert result["tls"]["certificate"]["thumbprint"]


def test_shadow_server_native_rdp_only(shadow: ShadowFactory) -> None:
    server = shadow("rdp")
    result = run_probe(server.port, checks=["negotiation", "tls"])
    assert result["negotiation"]["accepted"] == ["rdp"]
    assert result["negotiation"]["trials"]["tls"]["failure_name"] == "SSL_NOT_ALLOWED_BY_SERVER"
    assert "handshake.native_rdp_only" in ids(result)
