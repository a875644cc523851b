# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How the agent touches key files (issue: Administrators cannot read the 17763+ RDP key file).

No PowerShell runs here: these checks read the agent's text. Every read of a file's bytes or ACL goes through the one
helper that opens with FILE_FLAG_BACKUP_SEMANTICS, the agent enables SeBackupPrivilege and SeRestorePrivilege (the
same list the lab models), and file.move hashes before it moves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
AGENT = (ROOT / "plugins" / "plugin_utils" / "_agent.ps1").read_text(encoding="ascii")


def _code(text: str) -> str:
    """The PowerShell without comment lines and without the embedded C# here-strings."""
    text = re.sub(r"@'\r?\n.*?\r?\n'@", "", text, flags=re.DOTALL)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _operation(name: str) -> str:
    start = AGENT.index(f"    '{name}' = {{")
    end = AGENT.index("\n    }\n", start)
    return AGENT[start:end]


def _function(name: str) -> str:
    start = AGENT.index(f"function {name} {{")
    return AGENT[start : AGENT.index("\n}\n", start)]


@pytest.mark.parametrize(
    "plain",
    ["[System.IO.File]::ReadAllBytes", "[System.IO.File]::Copy", "[System.IO.File]::Open(", "Get-Acl ", "OpenRead("],
)
def test_no_plain_file_read_outside_the_backup_helper(plain: str) -> None:
    code = _code(AGENT).replace(_function("Open-BackupReadStream"), "")
    assert plain not in code, f"{plain} reads without backup semantics"


def test_the_helper_opens_with_backup_semantics() -> None:
    csharp = AGENT[AGENT.index("$TokenSource = @'") : AGENT.index("\n'@\n", AGENT.index("$TokenSource = @'"))]
    assert "FILE_FLAG_BACKUP_SEMANTICS = 0x02000000" in csharp
    assert re.search(
        r"CreateFileW\(path, access, FILE_SHARE_ALL, IntPtr\.Zero, OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS", csharp
    )
    assert "GetSecurityInfo(handle" in csharp  # the ACL is read through the same kind of handle
    assert "Initialize-AgentToken" in _function("Open-BackupReadStream")
    assert "Initialize-AgentToken" in _function("Read-FileSecurity")


@pytest.mark.parametrize(
    ("where", "helper"),
    [
        ("Get-FileSha256Hex", "Open-BackupReadStream"),
        ("Read-FileBytes", "Open-BackupReadStream"),
        ("Write-FileAtomically", "Open-BackupReadStream"),
        ("Get-SecurityRecord", "Read-FileSecurity"),
    ],
)
def test_reads_hashes_copies_and_acl_reads_use_the_helper(where: str, helper: str) -> None:
    assert helper in _function(where)


@pytest.mark.parametrize(("op", "helper"), [("file.read", "Read-FileBytes"), ("dir.read_each", "Read-FileBytes")])
def test_file_reading_operations_use_the_helper(op: str, helper: str) -> None:
    assert helper in _operation(op)


def test_file_move_hashes_before_it_moves() -> None:
    body = _code(_operation("file.move"))
    hashed = body.index("Get-FileSha256Hex -Path $sourceItem.FullName")
    moved = body.index("[System.IO.File]::Move(")
    assert hashed < moved, "a hash after the move can fail after the key has left its certificate"
    assert "Get-FileSha256Hex -Path $destination" not in body


def test_the_agent_enables_the_privileges_the_lab_models() -> None:
    from rdplab.model.token import AGENT_PRIVILEGES

    match = re.search(r"^\$AgentPrivileges = @\(([^)]*)\)", AGENT, flags=re.MULTILINE)
    assert match, "the agent names the privileges it enables in $AgentPrivileges"
    assert (
        tuple(re.findall(r"'(\w+)'", match.group(1)))
        == AGENT_PRIVILEGES
        == (
            "SeBackupPrivilege",
            "SeRestorePrivilege",
        )
    )


def test_owner_and_acl_writes_enable_their_privileges() -> None:
    assert "Initialize-AgentToken" in _operation("dir.create")
    acl_set = _operation("acl.set")
    assert "Initialize-AgentToken" in acl_set and "Enable('SeTakeOwnershipPrivilege')" in acl_set
    # An owner the token may not set arrives as InvalidOperationException from .NET: reported as AccessDenied.
    assert "catch [System.InvalidOperationException]" in _function("Invoke-SecurityWrite")


def test_system_info_reports_the_caller() -> None:
    assert "caller = Get-CallerRecord" in _operation("system.info")
    record = _function("Get-CallerRecord")
    for field in ("user =", "sid =", "system =", "administrator =", "groups =", "privileges =", "agent_enabled ="):
        assert field in record


def test_a_key_that_cannot_be_opened_says_why() -> None:
    resolve = _function("Resolve-CertificateKey")
    assert "OpenError = Get-KeyOpenError" in resolve
    assert "Find-CngKeyFileName" in resolve
    assert "open_error = $resolved.OpenError" in _function("Get-CertificateKeyRecord")
    mapping = _function("Get-KeyOpenError")
    # NTE_BAD_KEYSET: the key does not exist; NTE_PERM / E_ACCESSDENIED: it exists and refuses the caller.
    assert "-2146893802 { return 'NotFound' }" in mapping and "-2146893808 { return 'AccessDenied' }" in mapping
