# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Guarded writes: the conditions a plan relied on, checked by ``guard`` operations at the start of its apply batch.

A plan is made from a read; the host may change before the apply batch runs. Each builder below turns one thing a
plan relied on (what it read) into a ``Guard``; ``add_guards`` puts them into the apply batch before its first write
(the batch runs ``on_error: stop``, so a guard that fails skips every later operation: nothing is written), and
``guard_failure`` recognises the failure in the batch's result so that the module reads again, plans again once,
and says so. The agent's comparison rules are in docs/agent-protocol.md, "Guards".
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._agent import READ_OPERATIONS, Batch, BatchResult

GUARD_OP = "guard"
GUARD_FAILED = "GuardFailed"
MATCHES = ("equal", "subset")

JSON = t.Any


@dataclass(frozen=True)
class Guard:
    """One condition: ``read`` (a read operation and its arguments), the part of its data ``pick`` names, and the
    value the plan relied on (``expect``), compared with ``match`` (``equal`` or ``subset``)."""

    label: str
    op: str
    args: dict[str, JSON]
    expect: JSON
    match: str = "equal"
    pick: tuple[str | dict[str, dict[str, JSON]], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a guard needs a label")
        if self.op not in READ_OPERATIONS or self.op == GUARD_OP:
            raise ValueError(f"a guard reads with a read operation, not {self.op!r}")
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, not {self.match!r}")

    def op_args(self) -> dict[str, JSON]:
        """The ``guard`` operation's arguments."""
        args: dict[str, JSON] = {
            "label": self.label,
            "read": {"op": self.op, "args": dict(self.args)},
            "expect": self.expect,
            "match": self.match,
        }
        if self.pick:
            args["pick"] = list(self.pick)
        return args


def add_guard(batch: Batch, guard: Guard) -> int:
    """Append one guard; returns its position in the batch's results."""
    return batch.add(GUARD_OP, **guard.op_args())


def add_guards(batch: Batch, guards: Iterable[Guard]) -> list[int]:
    """Append the guards, in order, before the batch's first write (a guard after a write guards nothing)."""
    if batch.writes:
        raise ValueError("guards go before the first write of a batch")
    if batch.on_error != "stop":
        raise ValueError("a guarded batch runs with on_error: stop, so that a failed guard stops it")
    return [add_guard(batch, guard) for guard in guards]


# --------------------------------------------------------------------------------------------------------------------
# Builders: what a plan relied on, from the data it read
# --------------------------------------------------------------------------------------------------------------------


def sessions_unchanged(sessions: Sequence[dict[str, JSON]]) -> Guard:
    """The sessions are the ones the plan saw (a user who logged on since, or one who left, stops the batch: the
    plan's session gate is decided again on a fresh read). ``sessions``: ``session.list``'s list as read."""
    return Guard(
        label="the Remote Desktop sessions are the ones the plan saw",
        op="session.list",
        args={},
        expect=[dict(item) for item in sessions],
        match="equal",
        pick=("sessions",),
    )


def certificate_unchanged(store: str, certificate: dict[str, JSON]) -> Guard:
    """A certificate the plan acts on (removes, re-binds, whose key it moves or repairs) is still in ``store``, with
    the same key record (provider, path, size, owner, ACL). ``certificate``: one entry of ``cert.list``'s list."""
    thumbprint = str(certificate.get("thumbprint") or "").upper()
    expect: dict[str, JSON] = {"thumbprint": thumbprint}
    if certificate.get("key") is not None:
        # A plan that knows no key record (one built for another module's regeneration) guards the presence only.
        expect["key"] = certificate["key"]
    return Guard(
        label=f"certificate {thumbprint} in {store} is the one the plan saw",
        op="cert.list",
        args={"store": store},
        expect=[expect],
        match="subset",
        pick=("certificates", {"where": {"thumbprint": thumbprint}}),
    )


def certificate_absent(store: str, thumbprint: str) -> Guard:
    """The plan relied on ``store`` not holding this certificate (a certificate it is about to import, for one)."""
    return Guard(
        label=f"certificate {thumbprint.upper()} is not in {store}",
        op="cert.list",
        args={"store": store},
        expect=[],
        match="equal",
        pick=("certificates", {"where": {"thumbprint": thumbprint.upper()}}),
    )


def listener_binding(thumbprint: str | None, terminal_name: str = "RDP-tcp") -> Guard:
    """The listener's certificate (WMI's ``SSLCertificateSHA1Hash``) is still the one the plan saw."""
    return Guard(
        label=f"the {terminal_name} listener still uses certificate {thumbprint or '(none)'}",
        op="listener.get",
        args={"terminal_name": terminal_name},
        expect=thumbprint.upper() if thumbprint else None,
        match="equal",
        pick=("ssl_certificate_sha1_hash",),
    )


def file_unchanged(path: str, stat: dict[str, JSON]) -> Guard:
    """A file (a key file the plan moves, copies or re-ACLs) is the one the plan saw: same existence, size, hash,
    owner and ACL. ``stat``: ``file.stat``'s data as read (``exists: false`` guards that it is still absent)."""
    expect = {key: stat.get(key) for key in ("exists", "is_dir", "size", "sha256", "owner", "sddl")}
    return Guard(label=f"{path} is the file the plan saw", op="file.stat", args={"path": path}, expect=expect)


def registry_values(path: str, names: Sequence[str], values: dict[str, JSON]) -> Guard:
    """The registry values ``names`` under ``path`` are as the plan read them (``values``: ``registry.get``'s
    ``values`` for those names; a name missing from it must still be absent)."""
    wanted = list(names)
    return Guard(
        label=f"the values {', '.join(wanted)} of {path} are the ones the plan saw",
        op="registry.get",
        args={"path": path, "names": wanted},
        expect={name: values[name] for name in wanted if name in values},
        match="equal",
        pick=("values",),
    )


def services_unchanged(services: dict[str, dict[str, JSON]]) -> Guard:
    """Services the plan relied on (running, stopped, their start types) are as it read them. ``services``:
    ``service.get``'s ``services`` for the names that matter."""
    names = sorted(services)
    return Guard(
        label=f"the services {', '.join(names)} are as the plan saw them",
        op="service.get",
        args={"names": names},
        expect={name: dict(services[name]) for name in names},
        match="equal",
        pick=("services",),
    )


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


class HostChanged(Exception):
    """A guard at the start of an apply batch found the host changed since the plan's read: nothing was written.
    The action reads the host again and plans once more (``RdpfixAction.run``)."""


@dataclass(frozen=True)
class GuardFailure:
    """A guard that found the host changed: its position, the agent's message (label and first difference) and
    the value it found."""

    position: int
    message: str
    actual: JSON

    def __str__(self) -> str:
        return self.message


def guard_failure(result: BatchResult, positions: Iterable[int] | None = None) -> GuardFailure | None:
    """The failed guard of an apply batch, or None. ``positions``: the guards' positions (all guards when None).
    Only a ``GuardFailed`` counts: a guard whose read failed (AccessDenied...) is an error, not a changed host."""
    wanted = None if positions is None else set(positions)
    for position, item in enumerate(result.results):
        if item.op != GUARD_OP or (wanted is not None and position not in wanted):
            continue
        if not item.ok and not item.skipped and item.error_type == GUARD_FAILED:
            return GuardFailure(position, item.error_message or "", item.data.get("actual"))
    return None
