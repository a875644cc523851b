"""cert.list / cert.remove / cert.import / cert.repair_key_link."""

from __future__ import annotations

import base64
import binascii
import typing as t

from cryptography import x509

from rdplab.model.certs import Certificate, KeyLink, parse_key_file
from rdplab.model.errors import InvalidArgument, NotFound
from rdplab.model.filesystem import CNG_KEYS, MACHINE_KEYS
from rdplab.model.listener import key_status
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def _key_json(host: WindowsHost, cert: Certificate) -> dict[str, t.Any] | None:
    link = cert.key_link
    if link is None:
        return None
    status = key_status(host, cert)
    return {
        "provider_kind": link.provider_kind,
        "provider_name": link.provider_name,
        "container": link.container,
        "path": link.path,
        "exists": status.exists,
        "size": status.size,
        "owner": status.owner,
        "sddl": status.sddl,
    }


def cert_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    store = _args.string(args, "store")
    certificates = [
        {
            "thumbprint": cert.thumbprint,
            "der_b64": base64.b64encode(cert.der).decode("ascii"),
            "has_private_key": cert.key_link is not None,
            "key": _key_json(host, cert),
        }
        for cert in host.stores.entries(store)
    ]
    return {"store": store, "exists": host.stores.exists(store), "certificates": certificates}


def cert_remove(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    store = _args.string(args, "store")
    thumbprint = _args.thumbprint(args)
    # Remove-Item on a certificate leaves its key file behind (no -DeleteKey).
    return {"removed": host.stores.remove(store, thumbprint)}


def cert_import(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    store = _args.string(args, "store")
    try:
        der = base64.b64decode(_args.string(args, "der_b64"), validate=True)
        x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"der_b64 is not a DER certificate in base64: {exc}") from None
    added = host.stores.add(store, Certificate(der=der))
    return {"thumbprint": added.thumbprint}


def cert_repair_key_link(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    """certutil -repairstore: find a key file holding the certificate's private key and link it again."""
    store = _args.string(args, "store")
    thumbprint = _args.thumbprint(args)
    cert = host.stores.find(store, thumbprint)
    if cert is None:
        raise NotFound(f"certificate {thumbprint} is not in LocalMachine\\{store}")
    for folder in (MACHINE_KEYS, CNG_KEYS):
        for entry in host.filesystem.children(folder):
            if entry.is_dir:
                continue
            parsed = parse_key_file(entry.content)
            if parsed is not None and cert.matches_key(parsed.key):
                cert.key_link = KeyLink(parsed.provider_kind, parsed.provider_name, parsed.container, entry.path)
                cert.lab_key = parsed.key
                return {"has_private_key": True}
    return {"has_private_key": cert.key_link is not None}
