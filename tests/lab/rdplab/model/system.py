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
        }
