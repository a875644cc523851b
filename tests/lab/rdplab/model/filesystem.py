"""A small Windows file system: case-insensitive paths, bytes, owner and SDDL per entry, injectable write faults."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from rdplab.model import sddl as sddl_mod
from rdplab.model.errors import WRITE_FAULT_ERRORS, InvalidArgument, NotFound

PROGRAM_DATA = "C:\\ProgramData"
MACHINE_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"
CNG_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\Keys"

# Default folder SDDL measured by [Repair] on Server 2012 R2..2025.
MACHINE_KEYS_SDDL = "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"
# ProgramData as a fresh Windows Server install shows it (approximate: only owner and admin/SYSTEM rights matter here).
PROGRAM_DATA_SDDL = (
    "O:SYG:SYD:PAI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICIIO;GA;;;CO)(A;OICI;0x1200a9;;;BU)(A;CI;0x100116;;;BU)"
)
# Windows' own folders below ProgramData (Microsoft, Crypto, RSA): SYSTEM-owned, inherited rights.
SYSTEM_DIR_SDDL = "O:SYG:SYD:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIID;0x1200a9;;;BU)"
# What a folder created directly in ProgramData without an explicit ACL inherits from it (ProgramData's inheritable
# entries, as `icacls C:\ProgramData` lists them: BUILTIN\Users:(CI)(WD,AD,WEA,WA) lets every user create files and
# folders in such a folder, and CREATOR OWNER:(OI)(CI)(IO)(F) gives whoever creates one full control of it; docs/lab.md,
# "The run lock's folder and a standard user's files").
PROGRAM_DATA_CHILD_SDDL = (
    "O:BAG:SYD:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIIOID;GA;;;CO)(A;OICIID;0x1200a9;;;BU)(A;CIID;0x100116;;;BU)"
)
# What an entry created by the agent (running as an administrator) gets when the caller does not choose: inherited
# full control for SYSTEM and Administrators, owned by Administrators.
CREATED_SDDL = "O:BAG:SYD:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)"


def normalize(path: str) -> str:
    """The lookup key of a Windows path: backslashes, no trailing separator, case-folded."""
    text = path.replace("/", "\\").strip()
    while text.endswith("\\") and len(text) > 3:
        text = text[:-1]
    return text.casefold()


def validate_path(path: object) -> str:
    if not isinstance(path, str) or len(path) < 3 or path[1:3] not in (":\\", ":/") or not path[0].isalpha():
        raise InvalidArgument(f"expected an absolute Windows path such as C:\\ProgramData, got {path!r}")
    if any(part in ("..", ".") for part in path.replace("/", "\\").split("\\")):
        raise InvalidArgument(f"relative path segments are not allowed: {path!r}")
    return path.replace("/", "\\").rstrip("\\") if len(path) > 3 else path


def parent_of(path: str) -> str | None:
    text = path.replace("/", "\\").rstrip("\\")
    index = text.rfind("\\")
    if index < 0 or len(text) <= 3:
        return None
    return text[: index + 1] if index == 2 else text[:index]


def name_of(path: str) -> str:
    return path.replace("/", "\\").rstrip("\\").rsplit("\\", 1)[-1]


@dataclass
class Entry:
    path: str  # as first created, original case
    is_dir: bool
    sddl: str
    content: bytes = b""
    # Its last write time where the model keeps one (the run lock's file); None: counts as written just now.
    written: datetime | None = None

    @property
    def owner(self) -> str | None:
        return sddl_mod.owner_name(self.sddl)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class WriteFault:
    prefix: str  # normalized
    error_type: str


@dataclass
class FileSystem:
    entries: dict[str, Entry] = field(default_factory=dict)
    faults: list[WriteFault] = field(default_factory=list)

    @classmethod
    def windows_default(cls) -> FileSystem:
        system = cls()
        system.make_dirs("C:\\", PROGRAM_DATA_SDDL)
        system.make_dirs(PROGRAM_DATA, PROGRAM_DATA_SDDL)
        for folder in ("Microsoft", "Microsoft\\Crypto", "Microsoft\\Crypto\\RSA"):
            system.make_dirs(f"{PROGRAM_DATA}\\{folder}", SYSTEM_DIR_SDDL)
        system.make_dirs(MACHINE_KEYS, MACHINE_KEYS_SDDL)
        system.make_dirs(CNG_KEYS, MACHINE_KEYS_SDDL)
        return system

    # -- reads: never mutate -------------------------------------------------------------------------------------

    def get(self, path: str) -> Entry | None:
        return self.entries.get(normalize(path))

    def exists(self, path: str) -> bool:
        return normalize(path) in self.entries

    def children(self, path: str) -> list[Entry]:
        key = normalize(path)
        prefix = key if key.endswith("\\") else key + "\\"
        found = [
            entry
            for entry_key, entry in self.entries.items()
            if entry_key.startswith(prefix) and "\\" not in entry_key[len(prefix) :] and entry_key != key
        ]
        return sorted(found, key=lambda entry: normalize(entry.path))

    # -- writes: every one passes the fault check first ----------------------------------------------------------

    def check_writable(self, path: str) -> None:
        key = normalize(path)
        for fault in self.faults:
            if key == fault.prefix or key.startswith(fault.prefix.rstrip("\\") + "\\"):
                error = WRITE_FAULT_ERRORS[fault.error_type]
                if fault.error_type == "DiskFull":
                    raise error(f"There is not enough space on the disk. : '{path}'")
                raise error(f"Access to the path '{path}' is denied.")

    def make_dirs(self, path: str, sddl: str | None = None) -> bool:
        """Create the directory and missing parents (New-Item -Force); False when it already existed."""
        existing = self.get(path)
        if existing is not None:
            if not existing.is_dir:
                raise InvalidArgument(f"a file with this name exists: {path}")
            return False
        parent = parent_of(path)
        if parent is not None and not self.exists(parent):
            self.make_dirs(parent)
        self.check_writable(path)
        if sddl is None:
            inherits_program_data = parent is not None and normalize(parent) == normalize(PROGRAM_DATA)
            sddl = PROGRAM_DATA_CHILD_SDDL if inherits_program_data else CREATED_SDDL
        self.entries[normalize(path)] = Entry(path=path, is_dir=True, sddl=sddl)
        return True

    def write(self, path: str, content: bytes, sddl: str | None = None) -> Entry:
        """Write a whole file; the parent must exist. A fault leaves no partial file. An overwrite keeps the ACL."""
        parent = parent_of(path)
        parent_entry = self.get(parent) if parent else None
        if parent_entry is None or not parent_entry.is_dir:
            raise NotFound(f"Could not find a part of the path '{path}'.")
        existing = self.get(path)
        if existing is not None and existing.is_dir:
            raise InvalidArgument(f"the path is a directory: {path}")
        self.check_writable(path)
        if existing is not None:
            existing.content = content
            if sddl is not None:
                existing.sddl = sddl
            return existing
        entry = Entry(path=path, is_dir=False, sddl=sddl or CREATED_SDDL, content=content)
        self.entries[normalize(path)] = entry
        return entry

    def set_sddl(self, path: str, sddl: str) -> None:
        entry = self.get(path)
        if entry is None:
            raise NotFound(f"Cannot find path '{path}' because it does not exist.")
        self.check_writable(path)
        entry.sddl = sddl

    def remove(self, path: str) -> bool:
        key = normalize(path)
        if key not in self.entries:
            return False
        self.check_writable(path)
        for entry_key in [k for k in self.entries if k == key or k.startswith(key + "\\")]:
            del self.entries[entry_key]
        return True

    def add_fault(self, path: str, error_type: str) -> None:
        if error_type not in WRITE_FAULT_ERRORS:
            raise ValueError(f"error must be one of {sorted(WRITE_FAULT_ERRORS)}, not {error_type!r}")
        self.faults.append(WriteFault(prefix=normalize(path), error_type=error_type))

    def snapshot(self) -> dict[str, object]:
        files: dict[str, object] = {}
        for key in sorted(self.entries):
            entry = self.entries[key]
            files[entry.path] = {
                "is_dir": entry.is_dir,
                "size": None if entry.is_dir else len(entry.content),
                "sha256": None if entry.is_dir else entry.sha256,
                "owner": entry.owner,
                "sddl": entry.sddl,
            }
        return {
            "entries": files,
            "write_faults": [{"path": fault.prefix, "error": fault.error_type} for fault in self.faults],
        }
