"""Real X.509 certificates and RSA keys for the model, and the key-file format of the simulated MachineKeys.

Keys are RSA 2048 and cached on disk by a label (host, certificate id, generation), so starting a fleet costs one key
generation per label once, and a host file gives the same thumbprints every time it is loaded on the same day.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property, lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EKU_OIDS: dict[str, str] = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,  # 1.3.6.1.5.5.7.3.1
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,  # 1.3.6.1.5.5.7.3.2
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING.dotted_string,
    "remote_desktop_auth": "1.3.6.1.4.1.311.54.1.2",
}
# EKUs the RDP listener accepts for its certificate [Listener].
LISTENER_EKUS = frozenset({EKU_OIDS["server_auth"], EKU_OIDS["remote_desktop_auth"]})

KEY_CACHE_ENV = "RDPLAB_KEY_CACHE"
KEY_FILE_MAGIC = b"RDPLAB-KEY 1\n"

_memory_cache: dict[str, rsa.RSAPrivateKey] = {}
_cache_lock = threading.Lock()


def key_cache_dir() -> Path:
    configured = os.environ.get(KEY_CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdplab" / "keys"


def rsa_key(label: str) -> rsa.RSAPrivateKey:
    """The RSA 2048 key for a label: from memory, from the disk cache, or generated and cached."""
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:32]
    with _cache_lock:
        cached = _memory_cache.get(digest)
        if cached is not None:
            return cached
        path = key_cache_dir() / f"{digest}.pem"
        key: rsa.RSAPrivateKey | None = None
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size == 2048:
                key = loaded
        except (OSError, ValueError):
            key = None
        if key is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_bytes(private_key_pem(key))
                temporary.replace(path)
            except OSError:
                pass  # an unwritable cache only costs speed
        _memory_cache[digest] = key
        return key


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def serial_of(label: str) -> int:
    # Positive, < 2**159 as RFC 5280 wants, and fixed per label so rebuilt certificates are byte-identical.
    return int.from_bytes(hashlib.sha256(label.encode("utf-8")).digest()[:19], "big") | 1


@dataclass(frozen=True)
class Issuer:
    name: x509.Name
    key: rsa.RSAPrivateKey


def build_certificate(
    *,
    label: str,
    key: rsa.RSAPrivateKey,
    subject_cn: str,
    sans: list[str],
    ekus: list[str],
    not_before: datetime,
    not_after: datetime,
    issuer: Issuer | None,
    is_ca: bool = False,
) -> bytes:
    """DER of a certificate; self-signed when ``issuer`` is None."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial_of(label))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=is_ca)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not is_ca,
                data_encipherment=not is_ca,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in sans]), critical=False
        )
    if ekus:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.ObjectIdentifier(oid) for oid in ekus]), critical=False
        )
    signer = issuer.key if issuer else key
    certificate = builder.sign(signer, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.DER)


@dataclass
class LabCA:
    """A root CA shared by the hosts of a fleet; its certificate goes into their Root stores."""

    name: str
    anchor: datetime
    key: rsa.RSAPrivateKey = field(init=False)
    der: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.key = rsa_key(f"lab-ca:{self.name}")
        self.der = build_certificate(
            label=f"lab-ca:{self.name}",
            key=self.key,
            subject_cn=self.name,
            sans=[],
            ekus=[],
            not_before=self.anchor - timedelta(days=365),
            not_after=self.anchor + timedelta(days=3650),
            issuer=None,
            is_ca=True,
        )

    @property
    def issuer(self) -> Issuer:
        return Issuer(name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)]), key=self.key)


@dataclass(frozen=True)
class KeyLink:
    """Where a certificate's private key lives (the CERT_KEY_PROV_INFO property of a Windows store entry)."""

    provider_kind: str  # "capi" | "cng"
    provider_name: str
    container: str
    path: str


CAPI_PROVIDER = "Microsoft Enhanced RSA and AES Cryptographic Provider"
CNG_PROVIDER = "Microsoft Software Key Storage Provider"
RDP_CONTAINER = "TSSecKeySet1"
# The MachineKeys file name of TSSecKeySet1 on every Windows build [Repair][AzEvent].
RDP_CONTAINER_HASH = "f686aace6942fb7f7ceb231212eef4a4"


def container_hash(container: str) -> str:
    """File-name hash of a key container. Windows' own hash is only known for TSSecKeySet1; other names use MD5 of
    the lower-cased name in the lab (UNCONFIRMED as Windows' algorithm, and nothing depends on it)."""
    if container == RDP_CONTAINER:
        return RDP_CONTAINER_HASH
    return hashlib.md5(container.lower().encode("utf-8"), usedforsecurity=False).hexdigest()


def key_file_content(link: KeyLink, key: rsa.RSAPrivateKey) -> bytes:
    """What the lab stores in a key file: a small header naming the container, then the PKCS#8 PEM key."""
    header = f"container: {link.container}\nprovider: {link.provider_kind}|{link.provider_name}\n".encode()
    return KEY_FILE_MAGIC + header + private_key_pem(key)


@dataclass(frozen=True)
class ParsedKeyFile:
    container: str
    provider_kind: str
    provider_name: str
    key: rsa.RSAPrivateKey


@lru_cache(maxsize=1024)
def parse_key_file(content: bytes) -> ParsedKeyFile | None:
    """The key a key file holds, or None when it is empty, truncated or not a key (as CryptAcquireContext fails).

    Cached by content: loading an RSA key validates it (about 0.1 s), and the RDP endpoint looks at every host's view
    several times a second; the result depends on the bytes alone and is immutable.
    """
    if not content.startswith(KEY_FILE_MAGIC):
        return None
    lines = content[len(KEY_FILE_MAGIC) :].split(b"\n", 2)
    if len(lines) < 3 or not lines[0].startswith(b"container: ") or not lines[1].startswith(b"provider: "):
        return None
    kind, _bar, name = lines[1][len(b"provider: ") :].decode("utf-8", "replace").partition("|")
    try:
        key = serialization.load_pem_private_key(lines[2], password=None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, rsa.RSAPrivateKey):
        return None
    return ParsedKeyFile(
        container=lines[0][len(b"container: ") :].decode("utf-8", "replace"),
        provider_kind=kind,
        provider_name=name,
        key=key,
    )


@dataclass
class Certificate:
    """One store entry: the certificate bytes and, when it has one, the link to its private key file."""

    der: bytes
    key_link: KeyLink | None = None
    # The key the lab built the certificate with (not part of what Windows shows; used by faults to re-sign it).
    lab_key: rsa.RSAPrivateKey | None = field(default=None, compare=False, repr=False)

    @cached_property
    def x509(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    @cached_property
    def thumbprint(self) -> str:
        return hashlib.sha1(self.der, usedforsecurity=False).hexdigest().upper()

    @property
    def not_before(self) -> datetime:
        return self.x509.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.x509.not_valid_after_utc

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after

    @property
    def subject(self) -> str:
        return self.x509.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        return self.x509.issuer.rfc4514_string()

    @property
    def self_signed(self) -> bool:
        return self.x509.subject == self.x509.issuer

    @property
    def ekus(self) -> list[str]:
        try:
            extension = self.x509.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        except x509.ExtensionNotFound:
            return []
        return [oid.dotted_string for oid in extension.value]

    @property
    def sans(self) -> list[str]:
        try:
            extension = self.x509.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return []
        return [str(name) for name in extension.value.get_values_for_type(x509.DNSName)]

    def usable_for_listener(self) -> bool:
        """Server Authentication or Remote Desktop Authentication EKU; no EKU extension means any purpose."""
        ekus = self.ekus
        return not ekus or bool(LISTENER_EKUS & set(ekus))

    def matches_key(self, key: rsa.RSAPrivateKey) -> bool:
        public = self.x509.public_key()
        return isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == key.public_key().public_numbers()

    @property
    def pem(self) -> bytes:
        return self.x509.public_bytes(serialization.Encoding.PEM)
