"""What a guard compares is what the controller sees: the agent sends a read's data through JSON at the depth the
result document leaves an operation's data (docs/agent-protocol.md, "Guards"), so a value deeper than the document
keeps is never compared as something the controller never receives.

ConvertTo-Json -Depth N (Windows PowerShell 5.1) writes objects and lists nested up to N levels below the value it is
given and writes anything deeper as its type name; the model below does the same, and the depths are read from the
agent itself."""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

AGENT = Path(__file__).resolve().parents[4] / "plugins" / "plugin_utils" / "_agent.ps1"


def depths() -> tuple[int, int, list[str]]:
    text = AGENT.read_text(encoding="utf-8")
    result = re.search(r"^\$ResultJsonDepth = (\d+)$", text, re.MULTILINE)
    data = re.search(r"^\$DataJsonDepth = \$ResultJsonDepth - (\d+)$", text, re.MULTILINE)
    assert result is not None and data is not None, "the agent names its JSON depths"
    uses = re.findall(r"ConvertTo-Json -InputObject (\$\w+) -Depth (\S+)", text)
    return int(result[1]), int(result[1]) - int(data[1]), [f"{value} {depth}" for value, depth in uses]


def to_json(value: object, depth: int, level: int = 0) -> object:
    """ConvertTo-Json's depth rule: a container ``depth`` levels below the top is written as its type name."""
    if isinstance(value, dict | list) and level > depth:
        return "System.Collections.Specialized.OrderedDictionary" if isinstance(value, dict) else "System.Object[]"
    if isinstance(value, dict):
        return {key: to_json(item, depth, level + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item, depth, level + 1) for item in value]
    return value


def nested(levels: int) -> dict[str, t.Any]:
    value: dict[str, t.Any] = {"leaf": 1}
    for index in range(levels):
        value = {f"level{index}": value, "list": [value]}
    return value


def test_every_json_round_trip_of_an_operations_data_uses_the_depth_the_result_document_leaves_it() -> None:
    result_depth, data_depth, uses = depths()
    assert "$document $ResultJsonDepth" in uses
    assert sorted(set(uses) - {"$document $ResultJsonDepth"}) == ["$Record $DataJsonDepth", "$data $DataJsonDepth"]
    for levels in range(data_depth - 2, result_depth + 3):
        data = nested(levels)
        document = {"v": 1, "results": [{"op": "registry.get", "ok": True, "data": data}]}
        seen_by_controller = t.cast(dict[str, t.Any], to_json(document, result_depth))["results"][0]["data"]
        assert to_json(data, data_depth) == seen_by_controller, levels


def test_the_depth_of_the_whole_document_would_compare_what_the_controller_never_sees() -> None:
    result_depth, _data_depth, _uses = depths()
    data = nested(result_depth)
    document = {"v": 1, "results": [{"op": "registry.get", "ok": True, "data": data}]}
    seen_by_controller = t.cast(dict[str, t.Any], to_json(document, result_depth))["results"][0]["data"]
    assert to_json(data, result_depth) != seen_by_controller
