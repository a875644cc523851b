"""The depth at which the agent writes JSON (ConvertTo-Json -Depth), and what Windows PowerShell writes beyond it.

The result document is written with ``$ResultJsonDepth`` (10); an operation's data sits three levels down (the
document, its results list, one result), so it keeps ``$DataJsonDepth`` (7) levels, and the agent sends what a guard
compares (and what a batch's ``expect`` checks) through JSON at that depth too (docs/agent-protocol.md, "Guards").
Beyond the depth, ConvertTo-Json writes a value as a string: a dictionary as its type name, a list as its elements
joined with spaces (PowerShell's conversion of an array to a string). That conversion is UNCONFIRMED beyond the
documentation of ``-Depth`` ("Specifies how many levels of contained objects are included in the JSON
representation", learn.microsoft.com/powershell/module/microsoft.powershell.utility/convertto-json); no operation's
data reaches that depth today (the deepest, lock.acquire's and guard's, have 5 levels).
"""

from __future__ import annotations

import json

RESULT_JSON_DEPTH = 10
DATA_JSON_DEPTH = RESULT_JSON_DEPTH - 3
DICTIONARY_TYPE = "System.Collections.Specialized.OrderedDictionary"


def _cut(value: object, depth: int, level: int) -> object:
    if isinstance(value, dict):
        if level > depth:
            return DICTIONARY_TYPE
        return {key: _cut(item, depth, level + 1) for key, item in value.items()}
    if isinstance(value, list):
        if level > depth:
            return " ".join(DICTIONARY_TYPE if isinstance(item, dict) else _scalar(item) for item in value)
        return [_cut(item, depth, level + 1) for item in value]
    return value


def _scalar(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return "System.Object[]"
    return str(value)


def travelled(value: object, depth: int = DATA_JSON_DEPTH) -> object:
    """``value`` as it comes back from ConvertTo-Json -Depth ``depth`` and ConvertFrom-Json."""
    return _cut(json.loads(json.dumps(value)), depth, 0)
