"""The registry: keys (case-insensitive PowerShell provider paths) holding typed values."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rdplab.model.errors import InvalidArgument

TERMINAL_SERVER = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server"
RDP_TCP = TERMINAL_SERVER + "\\WinStations\\RDP-Tcp"
POLICY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services"
CRYPTOGRAPHY = "HKLM:\\SOFTWARE\\Microsoft\\Cryptography"

VALUE_TYPES = ("REG_SZ", "REG_EXPAND_SZ", "REG_MULTI_SZ", "REG_DWORD", "REG_QWORD", "REG_BINARY")
_HIVES = {"HKLM": "HKLM", "HKEY_LOCAL_MACHINE": "HKLM", "HKCU": "HKCU", "HKEY_CURRENT_USER": "HKCU"}
_HEX = re.compile(r"^(?:[0-9a-f]{2})*$")


@dataclass(frozen=True)
class RegValue:
    type: str
    value: object

    def to_json(self) -> dict[str, object]:
        return {"type": self.type, "value": list(self.value) if isinstance(self.value, tuple) else self.value}


def make_value(value_type: object, value: object) -> RegValue:
    """A typed value, checked as the protocol defines it; InvalidArgument when type and value disagree."""
    if value_type not in VALUE_TYPES:
        raise InvalidArgument(f"type must be one of {', '.join(VALUE_TYPES)}, not {value_type!r}")
    if value_type in ("REG_SZ", "REG_EXPAND_SZ"):
        if not isinstance(value, str):
            raise InvalidArgument(f"{value_type} needs a string value, got {value!r}")
        return RegValue(value_type, value)
    if value_type == "REG_MULTI_SZ":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidArgument(f"REG_MULTI_SZ needs a list of strings, got {value!r}")
        return RegValue(value_type, tuple(value))
    if value_type in ("REG_DWORD", "REG_QWORD"):
        limit = 2**32 if value_type == "REG_DWORD" else 2**64
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise InvalidArgument(f"{value_type} needs an integer between 0 and {limit - 1}, got {value!r}")
        return RegValue(value_type, value)
    if not isinstance(value, str) or not _HEX.match(value):
        raise InvalidArgument(f"REG_BINARY needs a lower-case hex string with an even number of digits, got {value!r}")
    return RegValue(value_type, value)


def canonical_path(path: object) -> str:
    """``HKLM:\\A\\B`` from the provider forms PowerShell accepts; InvalidArgument otherwise."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidArgument(f"expected a registry path such as HKLM:\\SOFTWARE\\..., got {path!r}")
    text = path.strip().replace("/", "\\")
    if text.lower().startswith("registry::"):
        text = text[len("registry::") :]
    hive, _backslash, rest = text.partition("\\")
    hive_name = _HIVES.get(hive.rstrip(":").upper())
    if hive_name is None:
        raise InvalidArgument(f"unsupported registry hive in {path!r} (use HKLM:\\...)")
    parts = [part for part in rest.split("\\") if part]
    return "\\".join([hive_name + ":", *parts])


def _key(path: str) -> str:
    return path.casefold()


@dataclass
class RegKey:
    path: str
    values: dict[str, tuple[str, RegValue]] = field(default_factory=dict)  # casefolded name -> (name, value)

    def get(self, name: str) -> RegValue | None:
        found = self.values.get(name.casefold())
        return found[1] if found else None


@dataclass
class Registry:
    keys: dict[str, RegKey] = field(default_factory=dict)

    # -- reads ---------------------------------------------------------------------------------------------------

    def key(self, path: str) -> RegKey | None:
        return self.keys.get(_key(canonical_path(path)))

    def get(self, path: str, name: str) -> RegValue | None:
        key = self.key(path)
        return key.get(name) if key else None

    def dword(self, path: str, name: str) -> int | None:
        value = self.get(path, name)
        if value is None or value.type not in ("REG_DWORD", "REG_QWORD") or not isinstance(value.value, int):
            return None
        return value.value

    def subkeys(self, path: str) -> list[str]:
        prefix = _key(canonical_path(path)) + "\\"
        names = {
            key.path[len(prefix) :].split("\\", 1)[0] for folded, key in self.keys.items() if folded.startswith(prefix)
        }
        return sorted(names, key=str.casefold)

    # -- writes --------------------------------------------------------------------------------------------------

    def create_key(self, path: str) -> RegKey:
        canonical = canonical_path(path)
        existing = self.keys.get(_key(canonical))
        if existing is not None:
            return existing
        hive, *parts = canonical.split("\\")
        # New-Item -Force creates every missing parent, so subkey listings see them.
        for depth in range(1, len(parts)):
            parent = "\\".join([hive, *parts[:depth]])
            self.keys.setdefault(_key(parent), RegKey(parent))
        created = RegKey(canonical)
        self.keys[_key(canonical)] = created
        return created

    def set(self, path: str, name: str, value: RegValue) -> RegValue | None:
        key = self.create_key(path)
        previous = key.get(name)
        existing_name = key.values.get(name.casefold(), (name, value))[0]
        key.values[name.casefold()] = (existing_name, value)
        return previous

    def remove(self, path: str, name: str) -> RegValue | None:
        key = self.key(path)
        if key is None:
            return None
        found = key.values.pop(name.casefold(), None)
        return found[1] if found else None

    def snapshot(self) -> dict[str, object]:
        result: dict[str, object] = {}
        for folded in sorted(self.keys):
            key = self.keys[folded]
            result[key.path] = {
                name: value.to_json()
                for name, value in sorted(key.values.values(), key=lambda item: item[0].casefold())
            }
        return result
