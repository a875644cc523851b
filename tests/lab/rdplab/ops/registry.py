"""registry.get / registry.set / registry.remove."""

from __future__ import annotations

import typing as t

from rdplab.model.registry import canonical_path, make_value
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def registry_get(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = canonical_path(args.get("path"))
    names = _args.string_list(args, "names", required=False)
    key = host.registry.key(path)
    if key is None:
        return {"exists": False, "values": {}, "subkeys": []}
    if names is None:
        values = {name: value.to_json() for name, value in key.values.values()}
    else:
        values = {}
        for wanted in names:
            found = key.values.get(wanted.casefold())
            if found is not None:
                values[found[0]] = found[1].to_json()
    return {"exists": True, "values": values, "subkeys": host.registry.subkeys(path)}


def registry_set(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = canonical_path(args.get("path"))
    name = _args.string(args, "name")
    value = make_value(args.get("type"), args.get("value"))
    previous = host.registry.set(path, name, value)
    return {"previous": previous.to_json() if previous else None}


def registry_remove(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = canonical_path(args.get("path"))
    name = _args.string(args, "name")
    previous = host.registry.remove(path, name)
    return {"previous": previous.to_json() if previous else None}
