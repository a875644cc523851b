"""Just enough SDDL to answer the questions the model asks: who owns it, and can NETWORK SERVICE read it.

Strings are those ``Get-Acl ... .Sddl`` returns, e.g. ``O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SID_SYSTEM = "S-1-5-18"
SID_NETWORK_SERVICE = "S-1-5-20"
SID_ADMINISTRATORS = "S-1-5-32-544"
SID_EVERYONE = "S-1-1-0"
SID_SESSIONENV = "S-1-5-80-4022436659-1090538466-1613889075-870485073-3428993833"

# SDDL aliases the model meets, as SIDs, and the account names Get-Acl shows for them.
ALIASES = {
    "SY": SID_SYSTEM,
    "NS": SID_NETWORK_SERVICE,
    "BA": SID_ADMINISTRATORS,
    "WD": SID_EVERYONE,
    "LS": "S-1-5-19",
    "BU": "S-1-5-32-545",
    "AU": "S-1-5-11",
    "CO": "S-1-3-0",
}
ACCOUNT_NAMES = {
    SID_SYSTEM: "NT AUTHORITY\\SYSTEM",
    SID_NETWORK_SERVICE: "NT AUTHORITY\\NETWORK SERVICE",
    SID_ADMINISTRATORS: "BUILTIN\\Administrators",
    SID_EVERYONE: "Everyone",
    "S-1-5-19": "NT AUTHORITY\\LOCAL SERVICE",
    "S-1-5-32-545": "BUILTIN\\Users",
    "S-1-5-11": "NT AUTHORITY\\Authenticated Users",
    "S-1-3-0": "CREATOR OWNER",
    SID_SESSIONENV: "NT SERVICE\\SessionEnv",
}

FILE_READ_DATA = 0x1
GENERIC_READ = 0x80000000
GENERIC_ALL = 0x10000000
# SDDL right mnemonics that matter for "can read the file's data".
_RIGHTS = {"FA": 0x1F01FF, "FR": 0x120089, "FW": 0x120116, "FX": 0x1200A0, "GA": GENERIC_ALL, "GR": GENERIC_READ}
_READ_MASK = FILE_READ_DATA | GENERIC_READ | GENERIC_ALL

# Who NETWORK SERVICE is, as a member: itself, Everyone, Authenticated Users, and BUILTIN\Users, whose only member
# after installation is Authenticated Users (Microsoft's well-known SIDs; that a service token carries it is inferred,
# not stated - docs/lab.md).
_NETWORK_SERVICE_IDENTITIES = frozenset({SID_NETWORK_SERVICE, SID_EVERYONE, "S-1-5-11", "S-1-5-32-545"})

_ACE = re.compile(r"\(([^()]*)\)")
_OWNER = re.compile(r"^O:(?P<owner>S-[0-9-]+|[A-Z]{2})")


@dataclass(frozen=True)
class Ace:
    allow: bool
    flags: str
    mask: int
    sid: str


def _sid(text: str) -> str:
    return ALIASES.get(text, text)


def _mask(text: str) -> int:
    if text.lower().startswith("0x"):
        return int(text, 16)
    mask = 0
    # Mnemonics are two letters each (FA, FR, GR, ...); unknown ones grant nothing the model cares about.
    for index in range(0, len(text), 2):
        mask |= _RIGHTS.get(text[index : index + 2], 0)
    return mask


def is_valid(sddl: str) -> bool:
    return bool(_OWNER.match(sddl)) and "D:" in sddl


def owner_sid(sddl: str) -> str | None:
    match = _OWNER.match(sddl)
    return _sid(match["owner"]) if match else None


def owner_name(sddl: str) -> str | None:
    """The owner as Get-Acl's ``.Owner`` shows it (an account name, or the SID when it has no known name)."""
    sid = owner_sid(sddl)
    return None if sid is None else ACCOUNT_NAMES.get(sid, sid)


def dacl(sddl: str, *, inherit_only: bool = False) -> list[Ace]:
    """The DACL's entries that apply to the object itself; with ``inherit_only`` also those that apply only to its
    children (what RawSecurityDescriptor.DiscretionaryAcl lists)."""
    start = sddl.find("D:")
    if start < 0:
        return []
    end = sddl.find("S:", start)
    section = sddl[start : end if end >= 0 else len(sddl)]
    aces: list[Ace] = []
    for body in _ACE.findall(section):
        parts = body.split(";")
        if len(parts) < 6 or parts[0] not in ("A", "D"):
            continue
        # Inherit-only ACEs apply to children, not to the object itself.
        if "IO" in parts[1] and not inherit_only:
            continue
        aces.append(Ace(allow=parts[0] == "A", flags=parts[1], mask=_mask(parts[2]), sid=_sid(parts[5])))
    return aces


def grants_read(sddl: str, identities: frozenset[str]) -> bool:
    """Whether a principal with these SIDs may read the object's data (deny ACEs win, as Windows orders them)."""
    aces = [ace for ace in dacl(sddl) if ace.sid in identities and ace.mask & _READ_MASK]
    if any(not ace.allow for ace in aces):
        return False
    return any(ace.allow for ace in aces)


def network_service_can_read(sddl: str) -> bool:
    return grants_read(sddl, _NETWORK_SERVICE_IDENTITIES)
