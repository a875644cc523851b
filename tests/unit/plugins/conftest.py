"""Real X.509 certificates for the unit tests of the certificate code (built with cryptography, keys reused)."""

from __future__ import annotations

import ipaddress
import socket
import typing as t
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
REMOTE_DESKTOP_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.311.54.1.2")


class CertFactory:
    """Makes DER certificates whose validity is given relative to ``now`` in days."""

    def __init__(self) -> None:
        # Key generation dominates the cost: one key per type serves every certificate of a test session.
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lab Issuing CA")])

    def make(
        self,
        common_name: str = "web01",
        *,
        now: datetime | None = None,
        days_left: float = 200,
        days_old: float = 30,
        sans: t.Sequence[str] = (),
        eku: t.Sequence[x509.ObjectIdentifier] | None = (SERVER_AUTH,),
        ca_issued: bool = False,
        key_type: str = "rsa",
    ) -> bytes:
        moment = now or datetime.now(UTC)
        key: t.Any = self.ec_key if key_type == "ec" else self.rsa_key
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_name if ca_issued else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(moment - timedelta(days=days_old))
            .not_valid_after(moment + timedelta(days=days_left))
        )
        if sans:
            names: list[x509.GeneralName] = []
            for name in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    names.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        signer = self.ca_key if ca_issued else key
        cert = builder.sign(signer, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="session")
def cert_factory() -> CertFactory:
    return CertFactory()


@pytest.fixture
def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released): a probe there is refused at once."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = int(holder.getsockname()[1])
    holder.close()
    return port
