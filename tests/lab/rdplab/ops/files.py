"""file.stat / file.read / dir.list / dir.read_each / dir.create / file.write / file.copy."""

from __future__ import annotations

import base64
import binascii
import hashlib
import typing as t

from rdplab.model import sddl as sddl_mod
from rdplab.model.errors import AlreadyClaimed, InvalidArgument, NotFound, OpError
from rdplab.model.filesystem import name_of, validate_path
from rdplab.ops import _access

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def file_stat(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    entry = host.filesystem.get(validate_path(args.get("path")))
    if entry is None:
        return {"exists": False, "is_dir": False, "size": None, "sha256": None, "owner": None, "sddl": None}
    # The size comes from the folder listing; the hash and the ACL need the file opened (backup semantics), and are
    # null where the caller's token may not (docs/agent-protocol.md).
    owner, sddl = _access.security_or_none(host, entry)
    return {
        "exists": True,
        "is_dir": entry.is_dir,
        "size": None if entry.is_dir else len(entry.content),
        "sha256": None if entry.is_dir else _access.sha256_or_none(host, entry),
        "owner": owner,
        "sddl": sddl,
    }


def file_read(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = validate_path(args.get("path"))
    entry = host.filesystem.get(path)
    if entry is None:
        return {"exists": False, "content_b64": None}
    if entry.is_dir:
        raise InvalidArgument(f"the path is a directory: {path}")
    return {"exists": True, "content_b64": base64.b64encode(_access.read_bytes(host, entry)).decode("ascii")}


def dir_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = validate_path(args.get("path"))
    entry = host.filesystem.get(path)
    if entry is None:
        return {"exists": False, "entries": []}
    if not entry.is_dir:
        raise InvalidArgument(f"the path is a file: {path}")
    entries = [
        {"name": name_of(child.path), "is_dir": child.is_dir, "size": None if child.is_dir else len(child.content)}
        for child in host.filesystem.children(path)
    ]
    return {"exists": True, "entries": entries}


def dir_read_each(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    """Every direct subfolder of ``path`` with the named files in it (base64, null when absent), by folder name."""
    path = validate_path(args.get("path"))
    names = args.get("names")
    if not isinstance(names, list) or not 1 <= len(names) <= 8:
        raise InvalidArgument(f"argument 'names' must list 1 to 8 file names, got {names!r}")
    for name in names:
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "\\/:"):
            raise InvalidArgument(f"names must be plain file names, got {name!r}")
    entry = host.filesystem.get(path)
    if entry is None:
        return {"exists": False, "folders": []}
    if not entry.is_dir:
        raise InvalidArgument(f"the path is a file: {path}")
    folders = []
    for child in sorted(host.filesystem.children(path), key=lambda item: name_of(item.path).casefold()):
        if not child.is_dir:
            continue
        files: dict[str, str | None] = {}
        errors: dict[str, str] = {}
        for name in names:
            found = host.filesystem.get(f"{child.path}\\{name}")
            if found is None or found.is_dir:
                files[name] = None
                continue
            try:
                files[name] = base64.b64encode(_access.read_bytes(host, found)).decode("ascii")
            except OpError as exc:
                # One unreadable file does not hide the others, as in the agent.
                errors[name] = f"{exc.error_type}: {exc.message}"
        folders.append({"name": name_of(child.path), "files": files, "errors": errors})
    return {"exists": True, "folders": folders}


def dir_create(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = validate_path(args.get("path"))
    sddl = args.get("sddl")
    if sddl is not None and (not isinstance(sddl, str) or not sddl_mod.is_valid(sddl)):
        raise InvalidArgument(f"argument 'sddl' must be an SDDL string with owner and DACL, got {sddl!r}")
    claim = args.get("claim")
    if claim is not None and (not isinstance(claim, str) or claim in (".", "..") or any(c in claim for c in "\\/:")):
        raise InvalidArgument(f"claim must be a plain file name, got {claim!r}")
    claim_text = args.get("claim_text")
    if claim_text is not None and not isinstance(claim_text, str):
        raise InvalidArgument(f"argument 'claim_text' must be a string, got {claim_text!r}")
    must_claim = args.get("must_claim", True)
    if not isinstance(must_claim, bool):
        raise InvalidArgument("argument 'must_claim' must be true or false")
    if sddl is not None and not host.filesystem.exists(path):
        # The agent creates the folder, then applies the SDDL; an owner it may not set removes the folder again.
        host.process.start_agent()
        host.process.check_owner(path, sddl)
    created = host.filesystem.make_dirs(path, sddl)
    if not claim:
        return {"created": created}
    # The agent creates the claim file with FileMode.CreateNew, atomic on Windows: whether the folder was new or not,
    # the caller that finds the file already there fails and writes nothing (docs/lab.md, "dir.create's claim").
    claim_path = f"{path}\\{claim}"
    if host.filesystem.exists(claim_path):
        if not must_claim:
            return {"created": created, "claimed": False}
        # The agent reports the existing claim's text (the controller tells its own claim from another run's).
        entry = host.filesystem.get(claim_path)
        existing = entry.content.decode("utf-8", "replace") if entry is not None and not entry.is_dir else None
        raise AlreadyClaimed(f"'{claim_path}' exists: the folder was claimed first", {"claim_text": existing})
    host.filesystem.write(claim_path, (claim_text or "").encode("utf-8"))
    return {"created": created, "claimed": True}


def file_write(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = validate_path(args.get("path"))
    try:
        encoded = args.get("content_b64")
        if not isinstance(encoded, str):
            raise InvalidArgument(f"argument 'content_b64' must be a base64 string, got {encoded!r}")
        content = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("content_b64 is not valid base64") from None
    entry = host.filesystem.write(path, content)
    return {"size": len(entry.content), "sha256": hashlib.sha256(entry.content).hexdigest()}


def file_copy(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    source_path = validate_path(args.get("src"))
    dest_path = validate_path(args.get("dest"))
    source = host.filesystem.get(source_path)
    if source is None:
        raise NotFound(f"Cannot find path '{source_path}' because it does not exist.")
    if source.is_dir:
        raise InvalidArgument(f"file.copy copies files; {source_path} is a directory")
    # The agent reads the source with backup semantics; the copy gets the ACL inherited at the destination.
    entry = host.filesystem.write(dest_path, _access.read_bytes(host, source))
    return {"size": len(entry.content), "sha256": hashlib.sha256(entry.content).hexdigest()}
