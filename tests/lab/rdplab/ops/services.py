"""service.get / service.restart / service.start.

What Windows answers depends here on how the agent asks (rdplab.agent_code): ``ServiceController.StartType`` is empty
before .NET Framework 4.6.1, and ``Restart-Service`` stops a disabled service before its start fails and waits for
ever on a service hanging in StopPending; the agent's own bounded stop and start refuse the disabled service first
and give up after a while (Timeout).
"""

from __future__ import annotations

import typing as t

from rdplab import agent_code
from rdplab.model.errors import Failed, OpError
from rdplab.model.system import dotnet_at_least
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost
    from rdplab.model.services import Service


class Timeout(OpError):
    error_type = "Timeout"


class CommandHangs(Exception):
    """The agent waits for ever: on Windows the WinRM command never returns a result document."""


def service_get(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    names = _args.string_list(args, "names", required=True) or []
    # ServiceController.StartType arrived with .NET Framework 4.6.1; before, PowerShell reads a member that does not
    # exist as $null, which [string] makes ''.
    blank = agent_code.current().start_type_from_service_controller and not dotnet_at_least(host.system, "4.6.1")
    services: dict[str, t.Any] = {}
    for name in names:
        service = host.services.get(name)
        if service is None:
            services[name] = {"exists": False, "status": None, "start_type": None}
        else:
            start_type = "" if blank else service.start_type
            services[name] = {"exists": True, "status": service.status, "start_type": start_type}
    return {"services": services}


def _stop(host: WindowsHost, service: Service, bounded: bool) -> None:
    if service.status == "Stopped":
        return
    if service.hangs_on_stop:
        service.status = "StopPending"
        if not bounded:
            raise CommandHangs(f"service '{service.name}' hangs in StopPending and Restart-Service waits for it")
        raise Timeout(f"service '{service.name}' did not reach Stopped within 60 seconds; it is StopPending")
    host.stop_service(service.name)


def service_restart(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    name = _args.string(args, "name")
    force = _args.boolean(args, "force", False)
    service = host.service(name)
    dependents = [dep for dep in host.services.dependents(service.name) if dep.status != "Stopped"]
    if dependents and not force:
        raise Failed(
            f"Cannot stop service '{service.name} ({service.name})' because it has dependent services. "
            "It can only be stopped if the Force flag is set."
        )
    cmdlet = agent_code.current().restart_with_cmdlet
    if not cmdlet:
        # The agent refuses before stopping anything.
        for item in (service, *dependents):
            if item.start_type == "Disabled":
                raise Failed(
                    f"service '{item.name}' is disabled: a restart would stop it and it could not start again; "
                    "nothing was stopped"
                )
    # Restart-Service (PowerShell's Service.cs) stops the dependents and the service, then starts them: a disabled
    # one is stopped and its start fails, leaving it stopped.
    for dependent in dependents:
        _stop(host, dependent, bounded=not cmdlet)
    _stop(host, service, bounded=not cmdlet)
    host.start_service(service.name)
    for dependent in dependents:
        host.start_service(dependent.name)
    return {"status": host.service(name).status}


def service_start(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    name = _args.string(args, "name")
    host.start_service(name)
    return {"status": host.service(name).status}
