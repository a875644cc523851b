"""Argument checks shared by the operations: a bad argument is an InvalidArgument result, never a traceback."""

from __future__ import annotations

import typing as t

from rdplab.model.errors import InvalidArgument

_MISSING = object()


def string(args: dict[str, t.Any], name: str, default: str | None = None) -> str:
    value = args.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is None:
            raise InvalidArgument(f"missing required argument {name!r}")
        return default
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"argument {name!r} must be a non-empty string, got {value!r}")
    return value


def boolean(args: dict[str, t.Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"argument {name!r} must be true or false, got {value!r}")
    return value


def integer(args: dict[str, t.Any], name: str, low: int, high: int) -> int:
    value = args.get(name, _MISSING)
    if value is _MISSING:
        raise InvalidArgument(f"missing required argument {name!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"argument {name!r} must be an integer from {low} to {high}, got {value!r}")
    return value


def string_list(args: dict[str, t.Any], name: str, required: bool) -> list[str] | None:
    value = args.get(name)
    if value is None:
        if required:
            raise InvalidArgument(f"missing required argument {name!r}")
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InvalidArgument(f"argument {name!r} must be a list of strings, got {value!r}")
    return list(value)


def thumbprint(args: dict[str, t.Any], name: str = "thumbprint") -> str:
    value = string(args, name)
    if len(value) != 40 or any(char not in "0123456789abcdefABCDEF" for char in value):
        raise InvalidArgument(f"argument {name!r} must be a SHA-1 thumbprint (40 hex digits), got {value!r}")
    return value.upper()
