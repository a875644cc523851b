# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Plan the RDP transport (UDP and TCP, or TCP only) for the server and the client policy.

Pure: ``add_reads`` puts the registry reads into a batch (the action plugin's and the audit's), ``state_from`` parses
their results, ``plan_transport`` decides, and ``stage_registry_changes`` puts the backup and the changes into the apply
batch. UDP problems never cause 0x904 themselves (the client silently stays on TCP), but UDP over VPNs and
secure-access tunnels breaks sessions after they start: forcing TCP is a stability fix.

Also home of ``RegistryChange``, the registry change the registry-based planners (this one and ``_tls``) share.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field

from ._action import BackupSet
from ._agent import Batch, BatchResult
from ._findings import finding

POLICY_KEY = r"HKLM:\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services"
CLIENT_POLICY_KEY = POLICY_KEY + r"\Client"
# Not a policy: the per-machine client setting some guides write. Reported, never changed.
CLIENT_SETTING_KEY = r"HKLM:\SOFTWARE\Microsoft\Terminal Server Client"

# "Select RDP transport protocols": 0 UDP and TCP, 1 TCP only, 2 either (the Windows default when the value is absent).
SELECT_TRANSPORT = "SelectTransport"
SELECT_TRANSPORT_BOTH = 0
SELECT_TRANSPORT_TCP_ONLY = 1
SELECT_TRANSPORT_EITHER = 2
# "Turn Off UDP On Client": 1 disables UDP in mstsc.
CLIENT_DISABLE_UDP = "fClientDisableUDP"
CLIENT_DISABLE_UDP_TRANSPORT = "DisableUDPTransport"

MODES = ("tcp_only", "udp_and_tcp", "default")
SIDES = ("server", "client")

# What the server service needs to pick up a new SelectTransport: TermService reads it when it starts.
SERVER_RESTART_SERVICE = "TermService"


@dataclass(frozen=True)
class RegistryChange:
    """Set (``value`` not None) or remove (``value`` None) one registry value."""

    path: str
    name: str
    value_type: str | None
    value: t.Any
    previous: dict[str, t.Any] | None

    @property
    def removes(self) -> bool:
        return self.value is None

    def describe(self) -> str:
        where = f"{self.path}\\{self.name}"
        before = "absent" if self.previous is None else repr(self.previous.get("value"))
        if self.removes:
            return f"remove {where} (was {before})"
        return f"set {where} = {self.value!r} (was {before})"


def stage_registry_changes(batch: Batch, backup: BackupSet, changes: t.Sequence[RegistryChange]) -> int:
    """Every previous value into the manifest (written first), then the changes, each carrying out its item, then the
    done-record; returns the manifest's position."""
    backup.begin(batch)
    items = []
    for change in changes:
        items.append(backup.record("registry_value", path=change.path, name=change.name, previous=change.previous))
        backup.planned_actions.append(change.describe())
    manifest = backup.finish(batch)
    for item, change in zip(items, changes, strict=True):
        if change.removes:
            backup.change(batch, item, "registry.remove", path=change.path, name=change.name)
        else:
            backup.change(
                batch,
                item,
                "registry.set",
                path=change.path,
                name=change.name,
                type=change.value_type,
                value=change.value,
            )
    backup.finish_done(batch)
    return manifest


def dword(values: dict[str, t.Any], name: str) -> int | None:
    """An integer registry value from a ``registry.get`` result's ``values``, None when absent or not an integer."""
    entry = values.get(name)
    if not isinstance(entry, dict):
        return None
    value = entry.get("value")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


@dataclass(frozen=True)
class TransportState:
    """The values read from the host (each ``values`` dict as ``registry.get`` returns it)."""

    server_policy: dict[str, t.Any] = field(default_factory=dict)
    client_policy: dict[str, t.Any] = field(default_factory=dict)
    client_setting: dict[str, t.Any] = field(default_factory=dict)


# Every key the planner looks at, read whole: the state and the audit show the values beside the ones it manages.
TRANSPORT_KEYS = (POLICY_KEY, CLIENT_POLICY_KEY, CLIENT_SETTING_KEY)


@dataclass(frozen=True)
class TransportReads:
    """Where ``add_reads`` put each key's ``registry.get`` in the batch."""

    keys: dict[str, int]


def add_reads(batch: Batch) -> TransportReads:
    return TransportReads({key: batch.add("registry.get", path=key) for key in TRANSPORT_KEYS})


def state_from(result: BatchResult, reads: TransportReads) -> TransportState:
    """The state from the batch's results; a failed read raises OperationError (nothing is judged on a guess)."""
    values = {key: result.data(position).get("values") or {} for key, position in reads.keys.items()}
    return TransportState(values[POLICY_KEY], values[CLIENT_POLICY_KEY], values[CLIENT_SETTING_KEY])


def current_values(state: TransportState) -> dict[str, int | None]:
    """The values the planner manages, as they are (the shape of a plan's ``before`` for both sides)."""
    return {
        "server_select_transport": dword(state.server_policy, SELECT_TRANSPORT),
        "client_disable_udp": dword(state.client_policy, CLIENT_DISABLE_UDP),
    }


@dataclass
class TransportPlan:
    findings: list[dict[str, t.Any]] = field(default_factory=list)
    changes: list[RegistryChange] = field(default_factory=list)
    # A server change takes effect when TermService restarts; a client change in the next session the client opens.
    restart_required: list[str] = field(default_factory=list)
    new_client_session_required: bool = False
    before: dict[str, t.Any] = field(default_factory=dict)
    after: dict[str, t.Any] = field(default_factory=dict)


def _describe_select_transport(value: int | None) -> str:
    return {
        None: "not set (Windows default: UDP when possible)",
        SELECT_TRANSPORT_BOTH: "UDP and TCP",
        SELECT_TRANSPORT_TCP_ONLY: "TCP only",
        SELECT_TRANSPORT_EITHER: "UDP or TCP",
    }.get(value, f"unknown value {value}")


def validate(mode: object, sides: object) -> list[str]:
    """Messages for invalid options (checked before any host is touched)."""
    problems: list[str] = []
    if mode not in MODES:
        problems.append(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not isinstance(sides, list) or not sides:
        problems.append(f"sides must be a non-empty list of {', '.join(SIDES)}")
    else:
        unknown = [side for side in sides if side not in SIDES]
        if unknown:
            problems.append(f"sides: unknown side(s) {', '.join(map(str, unknown))}; choose from {', '.join(SIDES)}")
    return problems


def _wanted(mode: str, tcp_only: int, both: int) -> int | None:
    if mode == "tcp_only":
        return tcp_only
    if mode == "udp_and_tcp":
        return both
    return None


def plan_transport(state: TransportState, mode: str, sides: t.Sequence[str]) -> TransportPlan:
    """Decide the registry changes that make the transport policy match ``mode`` for the chosen sides.

    ``default`` removes the policy values (Windows then decides); the other modes write them. Values set by a domain
    GPO come back at the next policy refresh: that is for the GPO's owner to change, which the finding says.
    """
    plan = TransportPlan()
    fix = {"module": "rdpfix.rdp.transport", "options": {"mode": mode, "sides": list(sides)}}

    if "server" in sides:
        current = dword(state.server_policy, SELECT_TRANSPORT)
        wanted = _wanted(mode, SELECT_TRANSPORT_TCP_ONLY, SELECT_TRANSPORT_BOTH)
        plan.before["server_select_transport"] = current
        plan.after["server_select_transport"] = wanted
        if current != wanted:
            previous = state.server_policy.get(SELECT_TRANSPORT)
            change = RegistryChange(
                POLICY_KEY, SELECT_TRANSPORT, None if wanted is None else "REG_DWORD", wanted, previous
            )
            plan.changes.append(change)
            plan.restart_required.append(SERVER_RESTART_SERVICE)
            severity = "warning" if mode == "tcp_only" else "info"
            plan.findings.append(
                finding(
                    "transport.server_policy_mismatch",
                    severity,
                    f"The server transport policy is {_describe_select_transport(current)}, wanted {mode}",
                    "transport",
                    {"path": POLICY_KEY, "name": SELECT_TRANSPORT, "value": current, "wanted": wanted},
                    dict(fix, description=change.describe() + ", then restart TermService"),
                )
            )

    if "client" in sides:
        current = dword(state.client_policy, CLIENT_DISABLE_UDP)
        wanted = _wanted(mode, 1, 0)
        plan.before["client_disable_udp"] = current
        plan.after["client_disable_udp"] = wanted
        if current != wanted:
            previous = state.client_policy.get(CLIENT_DISABLE_UDP)
            change = RegistryChange(
                CLIENT_POLICY_KEY, CLIENT_DISABLE_UDP, None if wanted is None else "REG_DWORD", wanted, previous
            )
            plan.changes.append(change)
            plan.new_client_session_required = True
            plan.findings.append(
                finding(
                    "transport.client_policy_mismatch",
                    "warning" if mode == "tcp_only" else "info",
                    f"The client UDP policy is {'not set' if current is None else current}, wanted {mode}",
                    "transport",
                    {"path": CLIENT_POLICY_KEY, "name": CLIENT_DISABLE_UDP, "value": current, "wanted": wanted},
                    dict(fix, description=change.describe() + "; applies to client sessions opened afterwards"),
                )
            )
        legacy = dword(state.client_setting, CLIENT_DISABLE_UDP_TRANSPORT)
        if legacy is not None:
            # The policy value decides when present; this older per-machine setting only confuses audits.
            plan.findings.append(
                finding(
                    "transport.client_legacy_setting",
                    "info",
                    f"The client also has the non-policy setting {CLIENT_DISABLE_UDP_TRANSPORT}={legacy}",
                    "transport",
                    {"path": CLIENT_SETTING_KEY, "name": CLIENT_DISABLE_UDP_TRANSPORT, "value": legacy},
                    None,
                )
            )
    return plan
