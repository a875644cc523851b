"""System identity: names, OS build, MachineGuid, roles, boot time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from rdplab.model.timeutil import iso

# Builds the RDP key ACL depends on [Repair]: Server 2016 is 14393, Server 2019 is 17763.
BUILD_SERVER_2016 = 14393
BUILD_SERVER_2019 = 17763


@dataclass
class SystemInfo:
    hostname: str
    domain: str | None
    os_build: int
    os_caption: str
    machine_guid: str
    connection_broker: bool
    boot_time: datetime
    program_data: str = "C:\\ProgramData"
    # .NET Framework release (host file system.dotnet_framework): ServiceController.StartType needs 4.6.1.
    dotnet_framework: str = "4.8"
    # The UI language (host file system.locale): the event log renders level names and messages in it.
    locale: str = "en-US"
    # What runs the agent (system.info's runtime): Windows PowerShell 5.1 in full language mode.
    powershell_version: str | None = None  # None: the version that ships with (or, before 2016, WMF 5.1 for) the build
    language_mode: str = "FullLanguage"

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}" if self.domain else self.hostname

    def to_json(self) -> dict[str, object]:
        return {
            "hostname": self.hostname,
            "fqdn": self.fqdn,
            "domain": self.domain,
            "os_build": self.os_build,
            "os_caption": self.os_caption,
            "machine_guid": self.machine_guid,
            "connection_broker": self.connection_broker,
            "boot_time": iso(self.boot_time),
            "program_data": self.program_data,
            "runtime": {
                "powershell_version": self.powershell_version
                or (f"5.1.{self.os_build}.1" if self.os_build >= BUILD_SERVER_2016 else "5.1.14409.1005"),
                "powershell_edition": "Desktop",
                "clr_version": "4.0.30319.42000",
                "dotnet_framework_release": DOTNET_RELEASES[self.dotnet_framework],
                "language_mode": self.language_mode,
                "ui_culture": self.locale,
            },
        }


# .NET Framework 4.x releases a host file may name, oldest first; Windows PowerShell 5.1 needs 4.5.2 at least.
DOTNET_FRAMEWORKS = ("4.5.2", "4.6", "4.6.1", "4.6.2", "4.7", "4.7.1", "4.7.2", "4.8", "4.8.1")


# The smallest Release value (HKLM\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full) of each, as system.info's
# runtime reports it [NetRelease].
DOTNET_RELEASES = {
    "4.5.2": 379893,
    "4.6": 393295,
    "4.6.1": 394254,
    "4.6.2": 394802,
    "4.7": 460798,
    "4.7.1": 461308,
    "4.7.2": 461808,
    "4.8": 528040,
    "4.8.1": 533320,
}


def dotnet_at_least(system: SystemInfo, release: str) -> bool:
    return DOTNET_FRAMEWORKS.index(system.dotnet_framework) >= DOTNET_FRAMEWORKS.index(release)
