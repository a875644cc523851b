"""summarize_certificate: what it reports for real certificates, and that garbage never escapes as another error."""

from __future__ import annotations

import contextlib
import hashlib
import typing as t
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.rdpfix.rdp.plugins.module_utils._x509 import CertificateParseError, summarize_certificate

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
CLIENT_AUTH = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
REMOTE_DESKTOP_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.311.54.1.2")


def test_self_signed_rsa_server_certificate(cert_factory: t.Any) -> None:
    der = cert_factory.make("web01.corp.example", now=NOW, days_left=100.5, sans=["web01.corp.example", "10.0.0.4"])
    summary = summarize_certificate(der, NOW)
    assert summary["thumbprint"] == hashlib.sha1(der).hexdigest().upper()
    assert summary["sha256"] == hashlib.sha256(der).hexdigest().upper()
    assert summary["subject"] == "CN=web01.corp.example"
    assert summary["common_name"] == "web01.corp.example"
    assert summary["sans"] == ["web01.corp.example", "10.0.0.4"]
    assert summary["self_signed"] is True
    assert summary["days_left"] == 100
    assert summary["expired"] is False
    assert summary["not_after"] == "2027-03-05T22:00:00Z"
    assert summary["not_before"] == "2026-10-26T10:00:00Z"
    assert summary["eku"] == ["1.3.6.1.5.5.7.3.1"]
    assert summary["server_auth"] is True
    assert (summary["key_type"], summary["key_size"]) == ("RSA", 2048)


def test_expired_by_an_hour_counts_as_negative_days(cert_factory: t.Any) -> None:
    der = cert_factory.make(now=NOW, days_left=-1 / 24)
    summary = summarize_certificate(der, NOW)
    assert summary["expired"] is True
    assert summary["days_left"] == -1


def test_ca_issued_ec_certificate_is_not_self_signed(cert_factory: t.Any) -> None:
    summary = summarize_certificate(cert_factory.make(now=NOW, ca_issued=True, key_type="ec"), NOW)
    assert summary["self_signed"] is False
    assert summary["issuer"] == "CN=Lab Issuing CA"
    assert (summary["key_type"], summary["key_size"]) == ("EC", 256)


@pytest.mark.parametrize(
    ("eku", "server_auth"),
    [
        ([CLIENT_AUTH], False),
        ([REMOTE_DESKTOP_AUTH], True),
        ([CLIENT_AUTH, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH], True),
        ([x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], False),
        (None, True),  # no EKU extension: no restriction (RFC 5280 4.2.1.12)
    ],
)
def test_server_auth_rule(cert_factory: t.Any, eku: t.Any, server_auth: t.Any) -> None:
    summary = summarize_certificate(cert_factory.make(now=NOW, eku=eku), NOW)
    assert summary["server_auth"] is server_auth
    assert summary["eku_present"] is (eku is not None)


def test_pem_input_gives_the_der_thumbprint(cert_factory: t.Any) -> None:
    der = cert_factory.make(now=NOW)
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    assert summarize_certificate(pem, NOW)["thumbprint"] == hashlib.sha1(der).hexdigest().upper()


def test_not_yet_valid(cert_factory: t.Any) -> None:
    summary = summarize_certificate(cert_factory.make(now=NOW + timedelta(days=40), days_old=1), NOW)
    assert summary["not_yet_valid"] is True
    assert summary["expired"] is False


@pytest.mark.parametrize("garbage", [b"", b"\x30\x82\x01", b"-----BEGIN CERTIFICATE-----\nAAAA\n", "text"])
def test_garbage_raises_a_value_error_subclass(garbage: t.Any) -> None:
    with pytest.raises(CertificateParseError) as caught:
        summarize_certificate(garbage)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)


def test_truncated_certificate(cert_factory: t.Any) -> None:
    der = cert_factory.make(now=NOW)
    with pytest.raises(CertificateParseError, match=r"not a readable X\.509 certificate"):
        summarize_certificate(der[: len(der) // 2], NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_certificate_parse_error(data: t.Any) -> None:
    try:
        summary = summarize_certificate(data, NOW)
    except CertificateParseError:
        return
    assert len(summary["thumbprint"]) == 40  # pragma: no cover - random bytes are practically never a certificate


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_corrupted_certificates_never_raise_other_errors(cert_factory: t.Any, position: t.Any, value: t.Any) -> None:
    der = bytearray(cert_factory.make(now=NOW))
    der[position % len(der)] = value
    with contextlib.suppress(CertificateParseError):
        summarize_certificate(bytes(der), NOW)
