# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Summarize an X.509 certificate the way an RDP administrator reads it.

Shared by the certificate action plugin (certificates read from the host's stores) and the handshake module (the
certificate a listener presents on the wire). Both feed it bytes they did not produce, so it never lets a parser
exception escape: anything that is not a certificate raises ``CertificateParseError``, a ``ValueError``.
"""

from __future__ import annotations

import hashlib
import math
import typing as t
import warnings
from datetime import UTC, datetime

try:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR: str | None = None
except ImportError as import_error:  # the handshake module reports this instead of failing with a traceback
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR = str(import_error)

SERVER_AUTH_OID = "1.3.6.1.5.5.7.3.1"
# "Remote Desktop Authentication": accepted by the RDP listener in place of Server Authentication.
REMOTE_DESKTOP_AUTH_OID = "1.3.6.1.4.1.311.54.1.2"
RDP_EKU_OIDS = frozenset({SERVER_AUTH_OID, REMOTE_DESKTOP_AUTH_OID})


class CertificateParseError(ValueError):
    """The bytes are not a certificate this module can read."""


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_description(cert: t.Any) -> tuple[str, int | None]:
    try:
        public_key = cert.public_key()
    except Exception:  # unsupported or malformed key algorithm: still report the rest of the certificate
        return "unknown", None
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC", public_key.curve.key_size
    if isinstance(public_key, dsa.DSAPublicKey):
        return "DSA", public_key.key_size
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448", 456
    return "unknown", None


def _is_self_signed(cert: t.Any) -> bool:
    """Subject equals issuer and, when the algorithm allows checking it, the certificate's own key signed it."""
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except TypeError:
        return True  # a key type the verifier does not support: the names alone decide
    except Exception:  # InvalidSignature or an unsupported signature algorithm: self-issued, not self-signed
        return False
    return True


def _extension_value(cert: t.Any, extension_class: t.Any) -> t.Any:
    try:
        return cert.extensions.get_extension_for_class(extension_class).value
    except x509.ExtensionNotFound:
        return None


def summarize_certificate(der: bytes, now: datetime | None = None) -> dict[str, t.Any]:
    """Describe a DER (or PEM) certificate; raise CertificateParseError for anything else.

    ``server_auth`` is true when the Extended Key Usage extension lists Server Authentication or Remote Desktop
    Authentication, or when the certificate has no EKU extension at all: RFC 5280 section 4.2.1.12 says an absent
    extension places no restriction on the key's purpose, and Windows shows such a certificate as valid for all
    purposes. ``anyExtendedKeyUsage`` alone does not count, since Microsoft documents only the two EKUs above for the
    listener. ``eku_present`` tells callers which case applied, so a stricter check remains possible.
    """
    if not HAS_CRYPTOGRAPHY:
        raise CertificateParseError(f"the Python library 'cryptography' is required: {CRYPTOGRAPHY_IMPORT_ERROR}")
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise CertificateParseError(f"expected certificate bytes, got {type(der).__name__}")
    raw = bytes(der)
    if not raw:
        raise CertificateParseError("empty certificate data")
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        # Certificates in the wild break RFC 5280 rules (negative serials...): describe them, do not warn about them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if raw.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(raw.strip())
                raw = cert.public_bytes(Encoding.DER)
            else:
                cert = x509.load_der_x509_certificate(raw)
            return _summarize(cert, raw, moment)
    except CertificateParseError:
        raise
    except Exception as exc:  # every parser error of a hostile or truncated input becomes one documented type
        raise CertificateParseError(f"not a readable X.509 certificate: {exc}") from exc


def _summarize(cert: t.Any, der: bytes, moment: datetime) -> dict[str, t.Any]:
    not_before: datetime = cert.not_valid_before_utc
    not_after: datetime = cert.not_valid_after_utc
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(common_names[0].value) if common_names else None

    sans: list[str] = []
    san_value = _extension_value(cert, x509.SubjectAlternativeName)
    if san_value is not None:
        sans.extend(str(name) for name in san_value.get_values_for_type(x509.DNSName))
        sans.extend(str(address) for address in san_value.get_values_for_type(x509.IPAddress))

    eku_value = _extension_value(cert, x509.ExtendedKeyUsage)
    eku = [usage.dotted_string for usage in eku_value] if eku_value is not None else []
    server_auth = eku_value is None or bool(RDP_EKU_OIDS.intersection(eku))

    key_type, key_size = _key_description(cert)
    seconds_left = (not_after - moment).total_seconds()
    return {
        "thumbprint": hashlib.sha1(der).hexdigest().upper(),
        "sha256": hashlib.sha256(der).hexdigest().upper(),
        "subject": cert.subject.rfc4514_string(),
        "common_name": common_name,
        "sans": sans,
        "issuer": cert.issuer.rfc4514_string(),
        "self_signed": _is_self_signed(cert),
        "serial_number": format(cert.serial_number, "X"),
        "not_before": _iso_utc(not_before),
        "not_after": _iso_utc(not_after),
        "days_left": math.floor(seconds_left / 86400),
        "expired": seconds_left < 0,
        "not_yet_valid": moment < not_before,
        "eku": eku,
        "eku_present": eku_value is not None,
        "server_auth": server_auth,
        "key_type": key_type,
        "key_size": key_size,
    }
