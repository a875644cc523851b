"""cert.list / cert.remove / cert.import / cert.repair_key_link."""

from __future__ import annotations

import base64
import binascii
import typing as t

from cryptography import x509

from rdplab.model.certs import Certificate, KeyLink, parse_key_file
from rdplab.model.errors import AccessDenied, InvalidArgument, NotFound
from rdplab.model.filesystem import CNG_KEYS, MACHINE_KEYS
from rdplab.ops import _access, _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def _open_error(host: WindowsHost, cert: Certificate) -> str | None:
    """Why the key provider cannot open the certificate's key, as the agent reports it (``open_error``). Providers
    open key files with the caller's token and without backup semantics (the CAPI provider in process, the CNG
    provider impersonating the caller: UNCONFIRMED for the latter), so the DACL decides."""
    link = cert.key_link
    entry = host.filesystem.get(link.path) if link else None
    if entry is None or entry.is_dir:
        return "NotFound"
    try:
        host.process.check_read_data(entry.path, entry.sddl, backup=False)
    except AccessDenied:
        return "AccessDenied"
    if parse_key_file(entry.content) is None:
        return "NotFound"  # "Keyset does not exist": an empty or foreign file
    return None


def _find_cng_key_file(host: WindowsHost, container: str) -> str | None:
    """Find-CngKeyFileName: the one file of Crypto\\Keys naming the key, read with backup semantics."""
    found = []
    for entry in host.filesystem.children(CNG_KEYS):
        if entry.is_dir:
            continue
        try:
            parsed = parse_key_file(_access.read_bytes(host, entry))
        except AccessDenied:
            continue
        if parsed is not None and parsed.container.casefold() == container.casefold():
            found.append(entry.path)
    return found[0] if len(found) == 1 else None


def _key_json(host: WindowsHost, cert: Certificate) -> dict[str, t.Any] | None:
    link = cert.key_link
    if link is None:
        return None
    host.process.start_agent()
    open_error = _open_error(host, cert)
    path: str | None = link.path
    if link.provider_kind == "cng" and open_error is not None:
        # The unique name comes from the opened key; without it the agent looks for the file by the key's name.
        path = None if open_error == "NotFound" else _find_cng_key_file(host, link.container)
    record: dict[str, t.Any] = {
        "provider_kind": link.provider_kind,
        "provider_name": link.provider_name,
        "container": link.container,
        "path": path,
        "exists": False if path is None and open_error == "NotFound" else None,
        "size": None,
        "owner": None,
        "sddl": None,
        "open_error": open_error,
    }
    if path is not None:
        entry = host.filesystem.get(path)
        record["exists"] = entry is not None
        if entry is not None:
            record["size"] = len(entry.content)
            record["owner"], record["sddl"] = _access.security_or_none(host, entry)
    return record


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
            # certutil opens each candidate through the key provider: the caller's token, no backup semantics.
            try:
                host.process.check_read_data(entry.path, entry.sddl, backup=False)
            except AccessDenied:
                continue
            parsed = parse_key_file(entry.content)
            if parsed is not None and cert.matches_key(parsed.key):
                cert.key_link = KeyLink(parsed.provider_kind, parsed.provider_name, parsed.container, entry.path)
                cert.lab_key = parsed.key
                return {"has_private_key": True}
    return {"has_private_key": cert.key_link is not None}
