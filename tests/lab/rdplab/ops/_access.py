"""How the agent's operations touch files, as the agent does it: every read of a file's bytes or ACL is an open with
backup semantics (``Open-BackupReadStream`` / ``Read-FileSecurity`` in _agent.ps1), after the agent enabled its
privileges. The checks themselves are the caller token's (rdplab.model.token)."""

from __future__ import annotations

import hashlib
import typing as t

from rdplab.model.errors import AccessDenied

if t.TYPE_CHECKING:
    from rdplab.model.filesystem import Entry
    from rdplab.model.host import WindowsHost


def read_bytes(host: WindowsHost, entry: Entry) -> bytes:
    """A backup-semantics read of a file's bytes; AccessDenied when neither the privilege nor the DACL allows it."""
    host.process.start_agent()
    host.process.check_read_data(entry.path, entry.sddl, backup=True)
    return entry.content


def sha256_or_none(host: WindowsHost, entry: Entry) -> str | None:
    try:
        return hashlib.sha256(read_bytes(host, entry)).hexdigest()
    except AccessDenied:
        return None


def security_or_none(host: WindowsHost, entry: Entry) -> tuple[str | None, str | None]:
    """Owner and SDDL read with backup semantics; (None, None) where access to them is denied."""
    host.process.start_agent()
    try:
        host.process.check_read_acl(entry.path, entry.sddl, backup=True)
    except AccessDenied:
        return None, None
    return entry.owner, entry.sddl
