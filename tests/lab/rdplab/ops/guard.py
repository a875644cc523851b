"""guard: a read, and the value an apply batch's plan relied on (docs/agent-protocol.md, "Guards").

The comparison is the agent's (``Compare-GuardValue`` in _agent.ps1), rule for rule, including the difference it
names first: the values are JSON as the controller sees them, so the lab compares the read's data as it would travel.
"""

from __future__ import annotations

import json
import typing as t

from rdplab.model import jsondepth
from rdplab.model.errors import GuardFailed, InvalidArgument, OpError
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

MATCHES = ("equal", "subset")
# A guard's read may be any read operation but a guard (the agent's $GuardReadOperations).
NOT_GUARD_READS = frozenset({"guard"})
STRING_SHOWN = 80


def kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "unknown"


def _items(count: int) -> str:
    return f"a list of {count} item" + ("" if count == 1 else "s")


def show(value: object) -> str:
    """A value as a difference names it: scalars as JSON (long strings cut), lists by length, objects by kind."""
    found = kind(value)
    if found == "null":
        return "null"
    if found == "boolean":
        return "true" if value else "false"
    if found == "number":
        return json.dumps(value)
    if found == "string":
        text = t.cast(str, value)
        return '"' + (text if len(text) <= STRING_SHOWN else text[:STRING_SHOWN] + "...") + '"'
    if found == "list":
        return _items(len(t.cast(list[object], value)))
    return "an object"


def _child(path: str, key: str) -> str:
    return key if path == "" else f"{path}.{key}"


def first_difference(expected: object, actual: object, match: str, path: str = "") -> str | None:
    """The first place ``actual`` differs from ``expected`` as ``where: expected X, found Y``; None when they match."""
    where = path or "value"
    expected_kind, actual_kind = kind(expected), kind(actual)
    if expected_kind != actual_kind:
        return f"{where}: expected {show(expected)}, found {show(actual)}"
    if expected_kind == "list":
        expected_list, actual_list = t.cast(list[object], expected), t.cast(list[object], actual)
        if len(expected_list) != len(actual_list):
            return f"{where}: expected {_items(len(expected_list))}, found {_items(len(actual_list))}"
        for index, (left, right) in enumerate(zip(expected_list, actual_list, strict=True)):
            difference = first_difference(left, right, match, f"{path or 'value'}[{index}]")
            if difference is not None:
                return difference
        return None
    if expected_kind == "object":
        expected_map, actual_map = t.cast(dict[str, object], expected), t.cast(dict[str, object], actual)
        for key, value in expected_map.items():
            if key not in actual_map:
                return f"{_child(path, key)}: expected {show(value)}, found nothing"
            difference = first_difference(value, actual_map[key], match, _child(path, key))
            if difference is not None:
                return difference
        if match == "equal":
            for key, value in actual_map.items():
                if key not in expected_map:
                    return f"{_child(path, key)}: expected nothing, found {show(value)}"
        return None
    if expected != actual:
        return f"{where}: expected {show(expected)}, found {show(actual)}"
    return None


def _pick_name(steps: list[object]) -> str:
    parts: list[str] = []
    for step in steps:
        if isinstance(step, str):
            parts.append(("." if parts else "") + step)
        else:
            where = t.cast(dict[str, dict[str, object]], step)["where"]
            parts.append("[" + ",".join(f"{key}={show(value)}" for key, value in where.items()) + "]")
    return "".join(parts)


def pick(data: object, steps: list[object]) -> object:
    """Follow ``pick``: a string step takes that member of an object (null when absent, or not an object); a
    ``{"where": {field: value}}`` step keeps the elements of a list whose fields equal those values (null when not a
    list)."""
    current = data
    for step in steps:
        if isinstance(step, str):
            current = current.get(step) if isinstance(current, dict) else None
            continue
        where = t.cast(dict[str, dict[str, object]], step)["where"]
        if not isinstance(current, list):
            current = None
            continue
        current = [
            element
            for element in current
            if isinstance(element, dict)
            and all(
                key in element and first_difference(value, element[key], "equal") is None
                for key, value in where.items()
            )
        ]
    return current


def _steps(args: dict[str, t.Any]) -> list[object]:
    steps = args.get("pick")
    if steps is None:
        return []
    if not isinstance(steps, list):
        raise InvalidArgument("argument 'pick' must be a list of steps")
    for step in steps:
        if isinstance(step, str) and step:
            continue
        if (
            isinstance(step, dict)
            and list(step) == ["where"]
            and isinstance(step["where"], dict)
            and step["where"]
            and all(isinstance(key, str) and key for key in step["where"])
        ):
            continue
        raise InvalidArgument(f"a 'pick' step is a member name or {{\"where\": {{field: value}}}}, not {step!r}")
    return list(steps)


def guard(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    from rdplab.ops import OPS

    label = _args.string(args, "label")
    read = args.get("read")
    if not isinstance(read, dict):
        raise InvalidArgument("argument 'read' must be an object {op, args}")
    op = read.get("op")
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None or spec.writes or op in NOT_GUARD_READS:
        raise InvalidArgument(f"a guard reads with a read operation, not {op!r}")
    read_args = read.get("args")
    if read_args is None:
        read_args = {}
    if not isinstance(read_args, dict):
        raise InvalidArgument("argument 'read.args' must be an object")
    if "expect" not in args:
        raise InvalidArgument("missing argument 'expect'")
    match = args.get("match", "equal")
    if match not in MATCHES:
        raise InvalidArgument(f"argument 'match' must be equal or subset, got {match!r}")
    steps = _steps(args)
    try:
        data = spec.func(host, read_args)
    except OpError as exc:
        # The read's own error type: a guard that cannot read knows nothing, which is not a difference.
        raise type(exc)(f"{label}: {op} failed: {exc.message}") from None
    # As the agent does: the data as it travels (JSON, at the depth the result document leaves it), so that a value
    # compares as the controller sees it.
    actual = pick(jsondepth.travelled(data), steps)
    difference = first_difference(args["expect"], actual, match, _pick_name(steps))
    if difference is not None:
        raise GuardFailed(f"{label}: {difference}", data={"actual": actual})
    return {"actual": actual}
