"""service.get / service.restart / service.start."""

from __future__ import annotations

import typing as t

from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def service_get(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    names = _args.string_list(args, "names", required=True) or []
    services: dict[str, t.Any] = {}
    for name in names:
        service = host.services.get(name)
        if service is None:
            services[name] = {"exists": False, "status": None, "start_type": None}
        else:
            services[name] = {"exists": True, "status": service.status, "start_type": service.start_type}
    return {"services": services}


def service_restart(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    name = _args.string(args, "name")
    host.restart_service(name, force=_args.boolean(args, "force", False))
    return {"status": host.service(name).status}


def service_start(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    name = _args.string(args, "name")
    host.start_service(name)
    return {"status": host.service(name).status}
