"""Who the agent runs as: the caller's token, its privileges, and the access checks Windows makes with it.

docs/lab.md, "The caller's token". A host file's ``caller:`` picks the identity (an Administrator over a network
logon by default, or SYSTEM as Azure Run Command and ``become_user: SYSTEM`` give) and may change its privileges.
Each batch is a new PowerShell process with a fresh copy of the token (privileges as the logon left them); the agent
enables its privileges in that process (``AgentProcess.start_agent``), as ``Initialize-AgentToken`` does.

Access checks follow Windows' rules for the DACL [CreateFile][SetSecurityInfo]: allow and deny entries for the
token's SIDs, in order; the owner always gets READ_CONTROL and WRITE_DAC; a file opened with backup semantics gets
every read right when SeBackupPrivilege is enabled; an owner other than the caller (or a group it may own through)
needs SeRestorePrivilege enabled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rdplab.model import sddl as sddl_mod
from rdplab.model.errors import AccessDenied

SE_BACKUP = "SeBackupPrivilege"
SE_RESTORE = "SeRestorePrivilege"
SE_TAKE_OWNERSHIP = "SeTakeOwnershipPrivilege"

# What the agent enables once per run (_agent.ps1: $AgentPrivileges); a contract test keeps the two equal.
AGENT_PRIVILEGES: tuple[str, ...] = (SE_BACKUP, SE_RESTORE)

FILE_READ_DATA = 0x1
FILE_ADD_FILE = 0x2
FILE_ADD_SUBDIRECTORY = 0x4
FILE_DELETE_CHILD = 0x40
DELETE = 0x10000
READ_CONTROL = 0x20000
WRITE_DAC = 0x40000
WRITE_OWNER = 0x80000

# SDDL access mnemonics, generic rights mapped as the file system maps them (FILE_GENERIC_*).
_FILE_ALL = 0x1F01FF
_FILE_READ = 0x120089
_FILE_WRITE = 0x120116
_FILE_EXECUTE = 0x1200A0
_MNEMONICS = {
    "FA": _FILE_ALL,
    "FR": _FILE_READ,
    "FW": _FILE_WRITE,
    "FX": _FILE_EXECUTE,
    "GA": _FILE_ALL,
    "GR": _FILE_READ,
    "GW": _FILE_WRITE,
    "GX": _FILE_EXECUTE,
    "RC": READ_CONTROL,
    "WD": WRITE_DAC,
    "WO": WRITE_OWNER,
    "SD": DELETE,
    "CC": 0x1,
    "DC": 0x2,
    "LC": 0x4,
    "SW": 0x8,
    "RP": 0x10,
    "WP": 0x20,
    "DT": 0x40,
    "LO": 0x80,
    "CR": 0x100,
}
_ACE = re.compile(r"\(([^()]*)\)")

SID_SYSTEM = sddl_mod.SID_SYSTEM
SID_ADMINISTRATORS = sddl_mod.SID_ADMINISTRATORS
IDENTITIES = ("administrator", "system")

# An elevated Administrator's privileges, as `whoami /priv` lists them: SeBackupPrivilege and SeRestorePrivilege are
# held but disabled [Facts: token]; which others are held and enabled is the usual list (UNCONFIRMED per item).
_ADMINISTRATOR_PRIVILEGES = {
    "SeIncreaseQuotaPrivilege": False,
    "SeSecurityPrivilege": False,
    "SeTakeOwnershipPrivilege": False,
    "SeLoadDriverPrivilege": False,
    "SeSystemProfilePrivilege": False,
    "SeSystemtimePrivilege": False,
    "SeProfileSingleProcessPrivilege": False,
    "SeIncreaseBasePriorityPrivilege": False,
    "SeCreatePagefilePrivilege": False,
    "SeBackupPrivilege": False,
    "SeRestorePrivilege": False,
    "SeShutdownPrivilege": False,
    "SeDebugPrivilege": False,
    "SeSystemEnvironmentPrivilege": False,
    "SeChangeNotifyPrivilege": True,
    "SeRemoteShutdownPrivilege": False,
    "SeUndockPrivilege": False,
    "SeManageVolumePrivilege": False,
    "SeImpersonatePrivilege": True,
    "SeCreateGlobalPrivilege": True,
    "SeIncreaseWorkingSetPrivilege": False,
    "SeTimeZonePrivilege": False,
    "SeCreateSymbolicLinkPrivilege": False,
    "SeDelegateSessionUserImpersonatePrivilege": False,
}
# LocalSystem's: the same rights and more; SeBackupPrivilege and SeRestorePrivilege held but disabled (UNCONFIRMED).
_SYSTEM_PRIVILEGES = {
    **_ADMINISTRATOR_PRIVILEGES,
    "SeCreateTokenPrivilege": False,
    "SeAssignPrimaryTokenPrivilege": False,
    "SeLockMemoryPrivilege": True,
    "SeTcbPrivilege": True,
    "SeCreatePermanentPrivilege": True,
    "SeDebugPrivilege": True,
    "SeAuditPrivilege": True,
    "SeProfileSingleProcessPrivilege": True,
    "SeIncreaseBasePriorityPrivilege": True,
    "SeCreatePagefilePrivilege": True,
}

# Group SIDs of the tokens (enabled groups, as WindowsIdentity.Groups lists them; the logon SID left out).
_ADMINISTRATOR_GROUPS = (
    "S-1-1-0",  # Everyone
    "S-1-5-114",  # NT AUTHORITY\Local account and member of Administrators group
    SID_ADMINISTRATORS,
    "S-1-5-32-545",  # BUILTIN\Users
    "S-1-5-2",  # NT AUTHORITY\NETWORK: a network logon (WinRM)
    "S-1-5-11",  # Authenticated Users
    "S-1-5-15",  # This Organization
    "S-1-5-113",  # Local account
    "S-1-5-64-10",  # NTLM Authentication
)
_SYSTEM_GROUPS = (SID_ADMINISTRATORS, "S-1-1-0", "S-1-5-11")
_GROUP_NAMES = {
    "S-1-1-0": "Everyone",
    "S-1-5-114": "NT AUTHORITY\\Local account and member of Administrators group",
    SID_ADMINISTRATORS: "BUILTIN\\Administrators",
    "S-1-5-32-545": "BUILTIN\\Users",
    "S-1-5-2": "NT AUTHORITY\\NETWORK",
    "S-1-5-11": "NT AUTHORITY\\Authenticated Users",
    "S-1-5-15": "NT AUTHORITY\\This Organization",
    "S-1-5-113": "NT AUTHORITY\\Local account",
    "S-1-5-64-10": "NT AUTHORITY\\NTLM Authentication",
}


@dataclass(frozen=True)
class CallerToken:
    """The token the agent runs with: user, enabled groups, held privileges (name -> enabled at logon)."""

    identity: str  # administrator | system
    user: str
    sid: str
    groups: tuple[str, ...]
    privileges: dict[str, bool] = field(hash=False)

    @classmethod
    def administrator(cls, hostname: str, username: str) -> CallerToken:
        # The local account's SID: a fixed, made-up machine part; RID 500 (the built-in Administrator, what Azure
        # names after the admin user given at creation).
        return cls(
            identity="administrator",
            user=f"{hostname}\\{username}",
            sid="S-1-5-21-3623811015-3361044348-30300820-500",
            groups=_ADMINISTRATOR_GROUPS,
            privileges=dict(_ADMINISTRATOR_PRIVILEGES),
        )

    @classmethod
    def system(cls) -> CallerToken:
        return cls(
            identity="system",
            user="NT AUTHORITY\\SYSTEM",
            sid=SID_SYSTEM,
            groups=_SYSTEM_GROUPS,
            privileges=dict(_SYSTEM_PRIVILEGES),
        )

    def with_privileges(self, changes: dict[str, str]) -> CallerToken:
        """``changes``: privilege name -> ``enabled`` | ``disabled`` (held, state at logon) | ``absent``."""
        privileges = dict(self.privileges)
        for name, state in changes.items():
            if state == "absent":
                privileges.pop(name, None)
            else:
                privileges[name] = state == "enabled"
        return CallerToken(self.identity, self.user, self.sid, self.groups, privileges)

    @property
    def sids(self) -> frozenset[str]:
        return frozenset({self.sid, *self.groups})

    @property
    def is_administrator(self) -> bool:
        return SID_ADMINISTRATORS in self.groups

    def may_own(self) -> frozenset[str]:
        """SIDs the token may make an object's owner without SeRestorePrivilege: itself, and Administrators (a
        group with SE_GROUP_OWNER in an elevated token)."""
        owners = {self.sid}
        if self.is_administrator:
            owners.add(SID_ADMINISTRATORS)
        return frozenset(owners)

    def start_process(self) -> AgentProcess:
        return AgentProcess(self, {name for name, enabled in self.privileges.items() if enabled})


@dataclass
class AgentProcess:
    """One run of the agent (one batch): the token's privileges as this process has them now."""

    token: CallerToken
    enabled: set[str]
    agent_enabled: list[str] = field(default_factory=list)
    started: bool = False

    def enable(self, name: str) -> bool:
        """AdjustTokenPrivileges: enables a privilege the token holds; False (nothing changes) otherwise."""
        if name not in self.token.privileges:
            return False
        self.enabled.add(name)
        return True

    def start_agent(self) -> None:
        """What Initialize-AgentToken does, once per run: enable the agent's privileges the token holds."""
        if self.started:
            return
        self.started = True
        self.agent_enabled = [name for name in AGENT_PRIVILEGES if self.enable(name)]

    def has(self, name: str) -> bool:
        return name in self.enabled

    def caller_record(self) -> dict[str, object]:
        """system.info's ``caller``, after the agent enabled its privileges."""
        self.start_agent()
        return {
            "user": self.token.user,
            "sid": self.token.sid,
            "system": self.token.sid == SID_SYSTEM,
            "administrator": self.token.is_administrator,
            "groups": [{"sid": sid, "name": _GROUP_NAMES.get(sid, sid)} for sid in self.token.groups],
            "privileges": {name: name in self.enabled for name in self.token.privileges},
            "agent_enabled": list(self.agent_enabled),
        }

    # -- access checks -------------------------------------------------------------------------------------------

    def granted(self, sddl: str, desired: int) -> bool:
        """Whether the DACL (and ownership) grants every right in ``desired`` to this token."""
        return desired & ~granted_rights(sddl, self.token.sids, desired) == 0

    def check_read_data(self, path: str, sddl: str, *, backup: bool) -> None:
        """Opening a file to read its bytes: ``backup`` is an open with FILE_FLAG_BACKUP_SEMANTICS."""
        if backup and self.has(SE_BACKUP):
            return
        if not self.granted(sddl, FILE_READ_DATA):
            raise AccessDenied(f"Access to the path '{path}' is denied.")

    def check_read_acl(self, path: str, sddl: str, *, backup: bool) -> None:
        """Reading owner, group and DACL: READ_CONTROL, or backup semantics with SeBackupPrivilege."""
        if backup and self.has(SE_BACKUP):
            return
        if not self.granted(sddl, READ_CONTROL):
            raise AccessDenied(f"Attempted to perform an unauthorized operation. : '{path}'")

    def check_rename(
        self, path: str, sddl: str, parent_sddl: str | None, dest_parent_sddl: str | None, is_dir: bool
    ) -> None:
        """A rename: DELETE on the object or FILE_DELETE_CHILD on its folder, and adding to the new folder."""
        may_delete = self.granted(sddl, DELETE) or (
            parent_sddl is not None and self.granted(parent_sddl, FILE_DELETE_CHILD)
        )
        add = FILE_ADD_SUBDIRECTORY if is_dir else FILE_ADD_FILE
        if not may_delete or (dest_parent_sddl is not None and not self.granted(dest_parent_sddl, add)):
            raise AccessDenied(f"Access to the path '{path}' is denied.")

    def check_owner(self, path: str, new_sddl: str) -> None:
        """Setting an owner other than yourself (or a group you may own through) needs SeRestorePrivilege."""
        owner = sddl_mod.owner_sid(new_sddl)
        if owner is None or owner in self.token.may_own() or self.has(SE_RESTORE):
            return
        raise AccessDenied(
            "The security identifier is not allowed to be the owner of this object "
            f"(setting the owner of '{path}' needs SeRestorePrivilege)."
        )

    def check_write_dac(self, path: str, sddl: str) -> None:
        """Replacing a DACL: WRITE_DAC (the owner has it) or SeRestorePrivilege."""
        if self.has(SE_RESTORE) or self.granted(sddl, WRITE_DAC):
            return
        raise AccessDenied(f"Attempted to perform an unauthorized operation. : '{path}'")


def access_mask(text: str) -> int:
    if text.lower().startswith("0x"):
        return int(text, 16)
    mask = 0
    for index in range(0, len(text), 2):
        mask |= _MNEMONICS.get(text[index : index + 2], 0)
    return mask


def granted_rights(sddl: str, sids: frozenset[str], desired: int) -> int:
    """The rights of ``desired`` a token with ``sids`` gets from this SDDL, as AccessCheck evaluates a DACL: entries
    in order, a deny entry refusing what is not granted yet; the owner gets READ_CONTROL and WRITE_DAC; no DACL
    (``D:NO_ACCESS_CONTROL``) grants everything, an empty DACL nothing."""
    granted = 0
    owner = sddl_mod.owner_sid(sddl)
    if owner is not None and owner in sids:
        granted |= (READ_CONTROL | WRITE_DAC) & desired
    start = sddl.find("D:")
    if start < 0 or sddl[start:].startswith("D:NO_ACCESS_CONTROL"):
        return desired
    end = sddl.find("S:", start)
    section = sddl[start : end if end >= 0 else len(sddl)]
    denied = 0
    for body in _ACE.findall(section):
        parts = body.split(";")
        if len(parts) < 6 or parts[0] not in ("A", "D") or "IO" in parts[1]:
            continue
        sid = sddl_mod.ALIASES.get(parts[5], parts[5])
        if sid not in sids:
            continue
        mask = access_mask(parts[2]) & desired
        if parts[0] == "D":
            denied |= mask & ~granted
        else:
            granted |= mask & ~denied
    return granted
