"""dir.stat / acl.set / file.move / dir.move: the operations rdpfix.rdp.machinekeys added.

They act on the model's file system exactly as the PowerShell agent's entries of the same names act on
Windows (docs/agent-protocol.md). A move is a rename on the same volume: bytes, owner and ACL travel unchanged, which is
what lets a moved key file or a moved MachineKeys folder be put back byte-identical.
"""

from __future__ import annotations

import hashlib
import typing as t

from rdplab.model import sddl as sddl_mod
from rdplab.model.errors import InvalidArgument, NotFound
from rdplab.model.filesystem import Entry, name_of, normalize, parent_of, validate_path
from rdplab.ops import _access, _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def _stat_entry(host: WindowsHost, entry: Entry) -> dict[str, t.Any]:
    # Owner and SDDL read with backup semantics: null where the caller's token may not read them.
    owner, sddl = _access.security_or_none(host, entry)
    return {
        "name": name_of(entry.path),
        "is_dir": entry.is_dir,
        "size": None if entry.is_dir else len(entry.content),
        "owner": owner,
        "sddl": sddl,
    }


def dir_stat(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    """A folder's owner and SDDL and those of each child, in one call (Get-Acl on the folder and each child)."""
    path = validate_path(args.get("path"))
    entry = host.filesystem.get(path)
    if entry is None:
        return {"exists": False, "owner": None, "sddl": None, "entries": []}
    if not entry.is_dir:
        raise InvalidArgument(f"the path is a file: {path}")
    owner, sddl = _access.security_or_none(host, entry)
    return {
        "exists": True,
        "owner": owner,
        "sddl": sddl,
        "entries": [_stat_entry(host, child) for child in host.filesystem.children(path)],
    }


def acl_set(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = validate_path(args.get("path"))
    sddl = _args.string(args, "sddl")
    if not sddl_mod.is_valid(sddl):
        raise InvalidArgument(f"argument 'sddl' must be an SDDL string with owner and DACL, got {sddl!r}")
    entry = host.filesystem.get(path)
    if entry is None:
        raise NotFound(f"Cannot find path '{path}' because it does not exist.")
    # The agent enables SeTakeOwnershipPrivilege here, besides the privileges it enables once per run.
    host.process.start_agent()
    host.process.enable("SeTakeOwnershipPrivilege")
    previous = _access.security_or_none(host, entry)[1]
    host.process.check_write_dac(path, entry.sddl)
    if sddl_mod.owner_sid(sddl) != sddl_mod.owner_sid(entry.sddl):
        host.process.check_owner(path, sddl)
    host.filesystem.set_sddl(path, sddl)
    return {"previous": previous}


def _move(host: WindowsHost, source_path: str, dest_path: str, want_dir: bool) -> Entry:
    source = host.filesystem.get(source_path)
    if source is None:
        raise NotFound(f"Cannot find path '{source_path}' because it does not exist.")
    if source.is_dir != want_dir:
        kind = "a directory" if source.is_dir else "a file"
        raise InvalidArgument(f"{source_path} is {kind}")
    if host.filesystem.exists(dest_path):
        raise InvalidArgument(f"Cannot create '{dest_path}' because a file or directory with the same name exists.")
    parent = parent_of(dest_path)
    parent_entry = host.filesystem.get(parent) if parent else None
    if parent_entry is None or not parent_entry.is_dir:
        raise NotFound(f"Could not find a part of the path '{dest_path}'.")
    # Both ends are written: a fault on either refuses the whole move, leaving everything where it was.
    host.filesystem.check_writable(source_path)
    host.filesystem.check_writable(dest_path)
    source_parent = parent_of(source_path)
    source_parent_entry = host.filesystem.get(source_parent) if source_parent else None
    host.process.check_rename(
        source_path,
        source.sddl,
        source_parent_entry.sddl if source_parent_entry else None,
        parent_entry.sddl,
        source.is_dir,
    )
    old_key = normalize(source_path)
    old_prefix_length = len(source.path)  # read before the loop renames the folder's own entry
    moved: dict[str, Entry] = {}
    for key in [key for key in host.filesystem.entries if key == old_key or key.startswith(old_key + "\\")]:
        entry = host.filesystem.entries.pop(key)
        suffix = entry.path[old_prefix_length:]
        entry.path = dest_path + suffix
        moved[normalize(entry.path)] = entry
    host.filesystem.entries.update(moved)
    return host.filesystem.entries[normalize(dest_path)]


def file_move(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    source_path = validate_path(args.get("src"))
    dest_path = validate_path(args.get("dest"))
    source = host.filesystem.get(source_path)
    # The agent hashes before it moves (backup semantics): a hash that fails refuses the move, nothing moved.
    sha256 = hashlib.sha256(_access.read_bytes(host, source)).hexdigest() if source and not source.is_dir else None
    entry = _move(host, source_path, dest_path, want_dir=False)
    return {"size": len(entry.content), "sha256": sha256}


def dir_move(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    source_path = validate_path(args.get("src"))
    dest_path = validate_path(args.get("dest"))
    if normalize(dest_path).startswith(normalize(source_path) + "\\"):
        raise InvalidArgument(f"cannot move {source_path} into itself")
    _move(host, source_path, dest_path, want_dir=True)
    return {"moved": True}
