"""Windows services the RDP stack depends on: status, start type, dependents."""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("Running", "Stopped", "Paused", "StartPending", "StopPending")
START_TYPES = ("Automatic", "Manual", "Disabled")

# Service -> services that depend on it (Restart-Service without -Force refuses to stop a service with running
# dependents). UmRdpService depends on TermService [RunCmd readmes].
DEPENDENTS: dict[str, tuple[str, ...]] = {"TermService": ("UmRdpService",)}

# Every host has these, running and automatic/manual as on a fresh Windows Server unless its file says otherwise.
DEFAULTS: dict[str, tuple[str, str]] = {
    "TermService": ("Running", "Manual"),
    "SessionEnv": ("Running", "Manual"),
    "UmRdpService": ("Running", "Manual"),
    "CertPropSvc": ("Running", "Manual"),
    "KeyIso": ("Running", "Manual"),
    "CryptSvc": ("Running", "Automatic"),
}


@dataclass
class Service:
    name: str
    status: str
    start_type: str
    # Asked to stop, the service stays in StopPending for ever (host file: services.<name>.hangs_on_stop).
    hangs_on_stop: bool = False


@dataclass
class Services:
    services: dict[str, Service] = field(default_factory=dict)  # casefolded name -> service

    @classmethod
    def windows_default(cls) -> Services:
        table = cls()
        for name, (status, start_type) in DEFAULTS.items():
            table.put(Service(name, status, start_type))
        return table

    def put(self, service: Service) -> None:
        self.services[service.name.casefold()] = service

    def get(self, name: str) -> Service | None:
        return self.services.get(name.casefold())

    def running(self, name: str) -> bool:
        service = self.get(name)
        return service is not None and service.status == "Running"

    def dependents(self, name: str) -> list[Service]:
        canonical = self.get(name)
        if canonical is None:
            return []
        return [found for dep in DEPENDENTS.get(canonical.name, ()) if (found := self.get(dep)) is not None]

    def snapshot(self) -> dict[str, object]:
        return {
            service.name: {
                "status": service.status,
                "start_type": service.start_type,
                **({"hangs_on_stop": True} if service.hangs_on_stop else {}),
            }
            for service in sorted(self.services.values(), key=lambda item: item.name.casefold())
        }
