# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Parse, compare and minimally repair Windows security descriptors written in SDDL.

The agent only ever returns and accepts raw SDDL strings (what ``Get-Acl ... .Sddl`` shows); every decision about them
is made here, in pure Python, so it can be unit-tested without Windows. Only what file ACLs need is modelled: owner,
group, the DACL with its control flags, and allow/deny ACEs with SID, flags and access mask. A SACL and conditional or
object ACEs are kept verbatim but never interpreted.

Format reference: "Security Descriptor String Format", "ACE Strings" and "SID Strings" on learn.microsoft.com
(windows/win32/secauthz/...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

# -- SIDs ----------------------------------------------------------------------------------------------------------

SID_SYSTEM = "S-1-5-18"
SID_LOCAL_SERVICE = "S-1-5-19"
SID_NETWORK_SERVICE = "S-1-5-20"
SID_ADMINISTRATORS = "S-1-5-32-544"
SID_USERS = "S-1-5-32-545"
SID_EVERYONE = "S-1-1-0"
SID_AUTHENTICATED_USERS = "S-1-5-11"
SID_CREATOR_OWNER = "S-1-3-0"
# NT SERVICE\SessionEnv: a service SID is derived from the service name, so it is the same on every machine.
SID_SESSIONENV = "S-1-5-80-4022436659-1090538466-1613889075-870485073-3428993833"

# Well-known SID aliases of SDDL that do not depend on a domain. Domain-relative aliases (DA, DU, LA...) stay as
# written: they name a different SID on every domain, so only the host can resolve them.
SID_ALIASES: dict[str, str] = {
    "AN": "S-1-5-7",
    "AO": "S-1-5-32-548",
    "AU": SID_AUTHENTICATED_USERS,
    "BA": SID_ADMINISTRATORS,
    "BG": "S-1-5-32-546",
    "BO": "S-1-5-32-551",
    "BU": SID_USERS,
    "CG": "S-1-3-1",
    "CO": SID_CREATOR_OWNER,
    "IU": "S-1-5-4",
    "LS": SID_LOCAL_SERVICE,
    "NO": "S-1-5-32-556",
    "NS": SID_NETWORK_SERVICE,
    "NU": "S-1-5-2",
    "PO": "S-1-5-32-550",
    "PS": "S-1-5-10",
    "PU": "S-1-5-32-547",
    "RC": "S-1-5-12",
    "RD": "S-1-5-32-555",
    "RE": "S-1-5-32-552",
    "RU": "S-1-5-32-554",
    "SO": "S-1-5-32-549",
    "SU": "S-1-5-6",
    "SY": SID_SYSTEM,
    "WD": SID_EVERYONE,
    "WR": "S-1-5-33",
}
_ALIAS_OF_SID = {sid: alias for alias, sid in SID_ALIASES.items()}

ACCOUNT_NAMES: dict[str, str] = {
    SID_SYSTEM: "NT AUTHORITY\\SYSTEM",
    SID_LOCAL_SERVICE: "NT AUTHORITY\\LOCAL SERVICE",
    SID_NETWORK_SERVICE: "NT AUTHORITY\\NETWORK SERVICE",
    SID_ADMINISTRATORS: "BUILTIN\\Administrators",
    SID_USERS: "BUILTIN\\Users",
    SID_EVERYONE: "Everyone",
    SID_AUTHENTICATED_USERS: "NT AUTHORITY\\Authenticated Users",
    SID_CREATOR_OWNER: "CREATOR OWNER",
    SID_SESSIONENV: "NT SERVICE\\SessionEnv",
}

# -- access rights ---------------------------------------------------------------------------------------------------

FILE_READ_DATA = 0x1
GENERIC_ALL = 0x10000000
GENERIC_EXECUTE = 0x20000000
GENERIC_WRITE = 0x40000000
GENERIC_READ = 0x80000000
FILE_ALL_ACCESS = 0x1F01FF
FILE_GENERIC_READ = 0x120089
FILE_GENERIC_WRITE = 0x120116
FILE_GENERIC_EXECUTE = 0x1200A0

# Two-letter right mnemonics of ACE strings, as masks.
RIGHT_MNEMONICS: dict[str, int] = {
    "GA": GENERIC_ALL,
    "GR": GENERIC_READ,
    "GW": GENERIC_WRITE,
    "GX": GENERIC_EXECUTE,
    "RC": 0x20000,
    "SD": 0x10000,
    "WD": 0x40000,
    "WO": 0x80000,
    "RP": 0x10,
    "WP": 0x20,
    "CC": 0x1,
    "DC": 0x2,
    "LC": 0x4,
    "SW": 0x8,
    "LO": 0x80,
    "DT": 0x40,
    "CR": 0x100,
    "FA": FILE_ALL_ACCESS,
    "FR": FILE_GENERIC_READ,
    "FW": FILE_GENERIC_WRITE,
    "FX": FILE_GENERIC_EXECUTE,
    "KA": 0xF003F,
    "KR": 0x20019,
    "KW": 0x20006,
    "KX": 0x20019,
}
# The mnemonics Windows itself prints for a whole file mask, used when formatting.
_FILE_MASK_MNEMONICS = {
    FILE_ALL_ACCESS: "FA",
    FILE_GENERIC_READ: "FR",
    FILE_GENERIC_WRITE: "FW",
    FILE_GENERIC_EXECUTE: "FX",
}
# The file system's generic mapping (GENERIC_MAPPING of NTFS files): what a generic right grants on a file.
_GENERIC_FILE_MAPPING = {
    GENERIC_READ: FILE_GENERIC_READ,
    GENERIC_WRITE: FILE_GENERIC_WRITE,
    GENERIC_EXECUTE: FILE_GENERIC_EXECUTE,
    GENERIC_ALL: FILE_ALL_ACCESS,
}

ACE_ALLOW = "A"
ACE_DENY = "D"
_ACE_FLAG_ORDER = ("OI", "CI", "NP", "IO", "ID", "SA", "FA")
_DACL_FLAG_ORDER = ("P", "AR", "AI", "NO_ACCESS_CONTROL")

_SID_TEXT = re.compile(r"^(S-1(-\d+)+|[A-Z]{2})$")
_SECTION = re.compile(r"(?P<tag>[OGDS]):")


class SddlError(ValueError):
    """The text is not an SDDL security descriptor this module can work with."""


def resolve_sid(text: str) -> str:
    """A SID string from an SDDL SID token (``NS`` → ``S-1-5-20``); unknown aliases stay as written."""
    token = text.strip().upper()
    if not _SID_TEXT.match(token):
        raise SddlError(f"not a SID or SID alias: {text!r}")
    return SID_ALIASES.get(token, token)


def sid_token(sid: str) -> str:
    """The SDDL token Windows prints for a SID: its alias when it has one."""
    return _ALIAS_OF_SID.get(sid, sid)


def account_name(sid: str | None) -> str | None:
    """A readable account name for reports (``NT AUTHORITY\\NETWORK SERVICE``), or the SID itself."""
    if sid is None:
        return None
    return ACCOUNT_NAMES.get(sid, sid)


def parse_rights(text: str) -> int:
    token = text.strip()
    if not token:
        return 0
    if token.lower().startswith("0x"):
        try:
            return int(token, 16)
        except ValueError:
            raise SddlError(f"bad access mask {text!r}") from None
    if token.isdigit():
        return int(token)
    if len(token) % 2:
        raise SddlError(f"bad access rights {text!r}")
    mask = 0
    for index in range(0, len(token), 2):
        mnemonic = token[index : index + 2].upper()
        if mnemonic not in RIGHT_MNEMONICS:
            raise SddlError(f"unknown access right {mnemonic!r} in {text!r}")
        mask |= RIGHT_MNEMONICS[mnemonic]
    return mask


def effective_file_rights(mask: int) -> int:
    """The specific file rights a mask grants, with generic rights mapped the way NTFS maps them."""
    result = mask & ~(GENERIC_ALL | GENERIC_READ | GENERIC_WRITE | GENERIC_EXECUTE)
    for generic, specific in _GENERIC_FILE_MAPPING.items():
        if mask & generic:
            result |= specific
    return result


def format_rights(mask: int) -> str:
    if mask in _FILE_MASK_MNEMONICS:
        return _FILE_MASK_MNEMONICS[mask]
    return f"0x{mask:x}"


def _split_flags(text: str, known: tuple[str, ...], what: str) -> frozenset[str]:
    flags: set[str] = set()
    rest = text.upper()
    while rest:
        for flag in sorted(known, key=len, reverse=True):
            if rest.startswith(flag):
                flags.add(flag)
                rest = rest[len(flag) :]
                break
        else:
            raise SddlError(f"unknown {what} flag in {text!r}")
    return frozenset(flags)


def _join_flags(flags: Iterable[str], order: tuple[str, ...]) -> str:
    present = set(flags)
    return "".join(flag for flag in order if flag in present)


@dataclass(frozen=True)
class Ace:
    """One allow or deny ACE. ``rights`` is the mask as written (generic bits kept); ``sid`` a SID string."""

    kind: str
    sid: str
    rights: int
    flags: frozenset[str] = frozenset()

    @property
    def inherited(self) -> bool:
        return "ID" in self.flags

    @property
    def applies_to_object(self) -> bool:
        """False for inherit-only ACEs, which only reach children."""
        return "IO" not in self.flags

    @property
    def file_rights(self) -> int:
        return effective_file_rights(self.rights)

    def to_sddl(self) -> str:
        flags = _join_flags(self.flags, _ACE_FLAG_ORDER)
        return f"({self.kind};{flags};{format_rights(self.rights)};;;{sid_token(self.sid)})"

    def describe(self) -> dict[str, object]:
        """The ACE as report data."""
        return {
            "type": "allow" if self.kind == ACE_ALLOW else "deny",
            "account": account_name(self.sid),
            "sid": self.sid,
            "rights": format_rights(self.rights),
            "flags": _join_flags(self.flags, _ACE_FLAG_ORDER),
        }


def allow(sid: str, rights: int, flags: Iterable[str] = ()) -> Ace:
    return Ace(ACE_ALLOW, resolve_sid(sid), rights, frozenset(flags))


@dataclass(frozen=True)
class SecurityDescriptor:
    owner: str | None
    group: str | None
    dacl_flags: frozenset[str] = frozenset()
    dacl: tuple[Ace, ...] | None = ()
    # ACEs this module does not interpret (object, audit, conditional), kept verbatim in their position at the end.
    opaque_aces: tuple[str, ...] = ()
    sacl: str | None = None

    @property
    def protected(self) -> bool:
        """Inheritance from the parent is blocked (``P``)."""
        return "P" in self.dacl_flags

    def to_sddl(self) -> str:
        parts: list[str] = []
        if self.owner is not None:
            parts.append(f"O:{sid_token(self.owner)}")
        if self.group is not None:
            parts.append(f"G:{sid_token(self.group)}")
        if self.dacl is None:
            parts.append("D:NO_ACCESS_CONTROL")
        else:
            aces = "".join(ace.to_sddl() for ace in self.dacl) + "".join(self.opaque_aces)
            parts.append(f"D:{_join_flags(self.dacl_flags, _DACL_FLAG_ORDER)}{aces}")
        if self.sacl is not None:
            parts.append(f"S:{self.sacl}")
        return "".join(parts)


def _parse_ace(body: str) -> Ace | str:
    fields = body.split(";")
    if len(fields) < 6:
        raise SddlError(f"an ACE needs six fields: ({body})")
    kind = fields[0].upper()
    if kind not in (ACE_ALLOW, ACE_DENY) or fields[3] or fields[4] or len(fields) > 6:
        # Object ACEs (OA/OD), callback and conditional ACEs: never produced by file ACLs we repair; keep verbatim.
        return f"({body})"
    flags = _split_flags(fields[1], _ACE_FLAG_ORDER, "ACE")
    return Ace(kind, resolve_sid(fields[5]), parse_rights(fields[2]), flags)


def _split_aces(text: str) -> tuple[str, list[str]]:
    """The control flags before the first ACE, and each ACE body (the text between its parentheses)."""
    head_end = text.find("(")
    head = text if head_end < 0 else text[:head_end]
    bodies: list[str] = []
    rest = "" if head_end < 0 else text[head_end:]
    depth = 0
    current = ""
    for char in rest:
        if char == "(":
            depth += 1
            if depth == 1:
                current = ""
                continue
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SddlError("unbalanced parentheses in the ACL")
            if depth == 0:
                bodies.append(current)
                continue
        elif depth == 0 and not char.isspace():
            raise SddlError(f"unexpected text between ACEs: {char!r}")
        current += char
    if depth:
        raise SddlError("unbalanced parentheses in the ACL")
    return head, bodies


def _sections(sddl: str) -> dict[str, str]:
    """Split ``O:..G:..D:..S:..`` into its parts; a tag is only a tag outside parentheses."""
    sections: dict[str, str] = {}
    depth = 0
    current_tag: str | None = None
    start = 0
    index = 0
    while index < len(sddl):
        char = sddl[index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and char in "OGDS" and index + 1 < len(sddl) and sddl[index + 1] == ":":
            if current_tag is not None:
                sections[current_tag] = sddl[start:index]
            elif sddl[:index].strip():
                raise SddlError(f"unexpected text before {char}: in {sddl!r}")
            if char in sections:
                raise SddlError(f"the {char}: part appears twice in {sddl!r}")
            current_tag = char
            start = index + 2
            index += 2
            continue
        index += 1
    if current_tag is None:
        raise SddlError(f"not an SDDL security descriptor: {sddl!r}")
    sections[current_tag] = sddl[start:]
    return sections


def parse(sddl: str) -> SecurityDescriptor:
    """Parse an SDDL string; raises ``SddlError`` with a message naming what is wrong."""
    if not isinstance(sddl, str) or not sddl.strip():
        raise SddlError("empty security descriptor")
    sections = _sections(sddl.strip())
    owner = resolve_sid(sections["O"]) if "O" in sections else None
    group = resolve_sid(sections["G"]) if "G" in sections else None
    dacl: tuple[Ace, ...] | None = ()
    dacl_flags: frozenset[str] = frozenset()
    opaque: list[str] = []
    if "D" in sections:
        head, bodies = _split_aces(sections["D"])
        dacl_flags = _split_flags(head, _DACL_FLAG_ORDER, "DACL")
        if "NO_ACCESS_CONTROL" in dacl_flags:
            dacl = None
        else:
            aces: list[Ace] = []
            for body in bodies:
                parsed = _parse_ace(body)
                if isinstance(parsed, Ace):
                    aces.append(parsed)
                else:
                    opaque.append(parsed)
            dacl = tuple(aces)
    return SecurityDescriptor(owner, group, dacl_flags, dacl, tuple(opaque), sections.get("S"))


def is_valid(sddl: object) -> bool:
    if not isinstance(sddl, str):
        return False
    try:
        parse(sddl)
    except SddlError:
        return False
    return True


# -- questions -------------------------------------------------------------------------------------------------------


def granted_rights(descriptor: SecurityDescriptor, identities: Iterable[str]) -> int:
    """The file rights a principal holding these SIDs gets on the object (deny ACEs win over allow ACEs).

    This is the canonical-order evaluation Windows applies to a DACL whose explicit ACEs precede inherited ones,
    which is what every ACL written by Windows tools looks like. A missing DACL grants everything; an empty one nothing.
    """
    if descriptor.dacl is None:
        return FILE_ALL_ACCESS
    members = {resolve_sid(sid) for sid in identities}
    granted = 0
    denied = 0
    for ace in descriptor.dacl:
        if not ace.applies_to_object or ace.sid not in members:
            continue
        if ace.kind == ACE_DENY:
            denied |= ace.file_rights & ~granted
        else:
            granted |= ace.file_rights & ~denied
    return granted


# Who a service running as NETWORK SERVICE also is, for access checks: BUILTIN\Users too, since Authenticated Users
# is a member of it (its only member after installation, per Microsoft's list of well-known SIDs).
NETWORK_SERVICE_IDENTITIES = frozenset({SID_NETWORK_SERVICE, SID_EVERYONE, SID_AUTHENTICATED_USERS, SID_USERS})
SYSTEM_IDENTITIES = frozenset({SID_SYSTEM, SID_EVERYONE, SID_AUTHENTICATED_USERS, SID_ADMINISTRATORS})


def can_read(descriptor: SecurityDescriptor, identities: Iterable[str]) -> bool:
    return granted_rights(descriptor, identities) & FILE_READ_DATA == FILE_READ_DATA


@dataclass(frozen=True)
class Requirement:
    """An account that must hold at least ``rights`` on an object."""

    sid: str
    rights: int

    def describe(self) -> dict[str, object]:
        return {"account": account_name(self.sid), "sid": self.sid, "rights": format_rights(self.rights)}


def missing_entries(descriptor: SecurityDescriptor, required: Iterable[Requirement]) -> list[Requirement]:
    """The requirements the DACL does not satisfy: the account (by its own SID) lacks some of the rights."""
    missing: list[Requirement] = []
    for requirement in required:
        rights = granted_rights(descriptor, {requirement.sid})
        if rights & requirement.rights != requirement.rights:
            missing.append(requirement)
    return missing


def blocking_denies(descriptor: SecurityDescriptor, required: Iterable[Requirement]) -> list[Ace]:
    """Explicit deny ACEs that take away rights a required account needs."""
    requirements = list(required)
    found: list[Ace] = []
    for ace in descriptor.dacl or ():
        if ace.kind != ACE_DENY or ace.inherited or not ace.applies_to_object:
            continue
        for requirement in requirements:
            if ace.sid == requirement.sid and ace.file_rights & requirement.rights:
                found.append(ace)
                break
    return found


def with_entries(
    descriptor: SecurityDescriptor, required: Iterable[Requirement], owner: str | None = None
) -> SecurityDescriptor:
    """The descriptor with only what is needed added: missing allow ACEs, the owner when given.

    Existing entries are kept, except explicit deny ACEs that block a required account (they would defeat the new
    allow ACE). New ACEs go after the explicit allow ACEs and before inherited ones, the canonical order Windows
    expects. A missing DACL (everyone may do anything) is left as it is: it already grants every requirement.
    """
    requirements = list(required)
    result = descriptor
    if owner is not None:
        result = replace(result, owner=resolve_sid(owner))
    if result.dacl is None:
        return result
    blockers = set(blocking_denies(result, requirements))
    kept = [ace for ace in result.dacl if ace not in blockers]
    interim = replace(result, dacl=tuple(kept))
    additions = [allow(req.sid, req.rights) for req in missing_entries(interim, requirements)]
    explicit_denies = [ace for ace in kept if not ace.inherited and ace.kind == ACE_DENY]
    explicit_allows = [ace for ace in kept if not ace.inherited and ace.kind == ACE_ALLOW]
    inherited = [ace for ace in kept if ace.inherited]
    return replace(result, dacl=tuple(explicit_denies + explicit_allows + additions + inherited))


def _ace_key(ace: Ace) -> tuple[str, str, int, str]:
    return (ace.kind, ace.sid, effective_file_rights(ace.rights), _join_flags(ace.flags, _ACE_FLAG_ORDER))


def equivalent(left: SecurityDescriptor, right: SecurityDescriptor, compare_group: bool = False) -> bool:
    """Same owner, same protection and the same set of ACEs (written order and right spelling aside)."""
    if left.owner != right.owner or (compare_group and left.group != right.group):
        return False
    if left.protected != right.protected:
        return False
    if left.dacl is None or right.dacl is None:
        return left.dacl is None and right.dacl is None
    return sorted(map(_ace_key, left.dacl)) == sorted(map(_ace_key, right.dacl)) and sorted(left.opaque_aces) == sorted(
        right.opaque_aces
    )


def differences(actual: SecurityDescriptor, expected: SecurityDescriptor) -> dict[str, object]:
    """What separates ``actual`` from ``expected``, as report evidence (empty when equivalent)."""
    found: dict[str, object] = {}
    if actual.owner != expected.owner:
        found["owner"] = {"actual": account_name(actual.owner), "expected": account_name(expected.owner)}
    if actual.protected != expected.protected:
        found["inheritance_blocked"] = {"actual": actual.protected, "expected": expected.protected}
    actual_aces = {_ace_key(ace): ace for ace in actual.dacl or ()}
    expected_aces = {_ace_key(ace): ace for ace in expected.dacl or ()}
    extra = [actual_aces[key].describe() for key in sorted(set(actual_aces) - set(expected_aces))]
    absent = [expected_aces[key].describe() for key in sorted(set(expected_aces) - set(actual_aces))]
    if extra:
        found["unexpected_entries"] = extra
    if absent:
        found["missing_entries"] = absent
    if (actual.dacl is None) != (expected.dacl is None):
        found["dacl_present"] = {"actual": actual.dacl is not None, "expected": expected.dacl is not None}
    return found
