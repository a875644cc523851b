"""Faults of the remote-management transport, and the cancellation of a running command.

A host's transport faults (``host.transport_faults``, injected with ``rdplab fault HOST transport kind=...`` or
``WindowsHost.inject_fault("transport", {...})``) break one exchange of a later command the way networks and
overloaded servers break them, so that the controller meets the failure at a known point of a batch:

``drop_before``
    the connection carrying the command's request is closed without an answer; the command never starts.
``drop_after``
    the command runs to its end; the connection carrying the answer that would deliver its output is closed.
``http500_after``
    the command runs to its end; the answer is an HTTP 500 with a WS-Management fault instead of the output.
``delay_after``
    the command runs to its end; the answer is held ``seconds`` (past the client's read timeout), then sent to a
    client that has gone.
``cut_at_op``
    the batch stops before operation ``op`` and waits (a stalled host: the answer is held too) until the client
    signals terminate or ``seconds`` pass; after a terminate the rest of the batch never runs and there is no output.

Every transport meets them: a WinRS command, a PSRP pipeline (the same /wsman listener) and an SSH exec request
each count as one command. Over SSH there is no HTTP: ``drop_before`` closes the TCP connection at the exec request,
``drop_after`` and ``http500_after`` close it after the command ran, before its output and exit status, and
``delay_after`` holds them (OpenSSH has no read timeout: the client waits). Over PSRP a client that timed out reading
sends the same Receive again (pypsrp does, five times) and is answered the same data, as a WS-Management service
answers a repeated Receive; a ``cut_at_op`` batch stops before its next operation when the pipeline is stopped.

Each fault skips the first ``skip`` commands after it was injected and then affects ``count`` commands (0: every
later one). ``terminate`` (WS-Management Signal, sent by pywinrm's ``cleanup_command`` - and so by Ansible after a read
timeout) cancels a running batch between two operations (docs/lab.md, "Cut batches and transport faults").
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import typing as t
from dataclasses import dataclass, field

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from rdplab.model.host import WindowsHost

KINDS = ("drop_before", "drop_after", "http500_after", "delay_after", "cut_at_op")
# Bounds that keep a forgotten fault from holding a lab for long.
MAX_SECONDS = 120.0
DEFAULT_SECONDS = 10.0


class DropConnection(Exception):
    """Raised by an endpoint's handler: close the client's connection without any answer."""


class BatchCancelled(Exception):
    """A terminate reached the command while its batch ran: the process ends between two operations."""

    def __init__(self, before_op: int) -> None:
        super().__init__(f"the command was terminated before operation {before_op}")
        self.before_op = before_op


@dataclass
class TransportFault:
    kind: str
    skip: int = 0
    count: int = 1
    op: int = 0
    seconds: float = DEFAULT_SECONDS
    seen: int = 0
    fired: int = 0

    @classmethod
    def from_params(cls, params: dict[str, t.Any]) -> TransportFault:
        kind = params.get("kind")
        if kind not in KINDS:
            raise ValueError(f"parameter 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
        unknown = sorted(set(params) - {"kind", "skip", "count", "op", "seconds"})
        if unknown:
            raise ValueError(f"unknown parameter(s) for a transport fault: {', '.join(unknown)}")
        values: dict[str, t.Any] = {}
        for name in ("skip", "count", "op"):
            value = params.get(name, 0 if name != "count" else 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"parameter {name!r} must be a non-negative integer, got {value!r}")
            values[name] = value
        seconds = params.get("seconds", DEFAULT_SECONDS)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_SECONDS:
            raise ValueError(f"parameter 'seconds' must be a number from 0 to {MAX_SECONDS:g}, got {seconds!r}")
        return cls(kind=kind, seconds=float(seconds), **values)

    def describe(self) -> dict[str, t.Any]:
        return {
            "kind": self.kind,
            "skip": self.skip,
            "count": self.count,
            "op": self.op,
            "seconds": self.seconds,
            "fired": self.fired,
        }


@dataclass
class CommandContext:
    """What one running command carries: the fault armed for it and its cancellation."""

    fault: TransportFault | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)

    def kind(self) -> str | None:
        return self.fault.kind if self.fault is not None else None


_CURRENT: contextvars.ContextVar[CommandContext | None] = contextvars.ContextVar("rdplab_command", default=None)


def inject(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """The ``transport`` fault: arm one more transport fault on the host."""
    host.transport_faults.append(TransportFault.from_params(params))


def clear(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """The ``clear_transport_faults`` fault."""
    host.transport_faults.clear()


def arm(host: WindowsHost) -> CommandContext:
    """Called once per new command: the context it runs with, holding the first fault that claims it."""
    context = CommandContext()
    # A stand-in host without the attribute (transport tests) has no transport faults.
    faults: list[TransportFault] = getattr(host, "transport_faults", [])
    with host.lock:
        for fault in faults:
            fault.seen += 1
            if context.fault is None and fault.seen > fault.skip and (fault.count == 0 or fault.fired < fault.count):
                fault.fired += 1
                context.fault = fault
    return context


@contextlib.contextmanager
def running(context: CommandContext) -> Iterator[None]:
    """Run the command's batch with this context (the host model asks ``before_op`` between operations)."""
    token = _CURRENT.set(context)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def before_op(position: int) -> None:
    """Between two operations of a batch: stop here when a terminate arrived; a ``cut_at_op`` fault stalls here.

    Raises BatchCancelled when the batch must end before operation ``position``.
    """
    context = _CURRENT.get()
    if context is None:
        return
    fault = context.fault
    if fault is not None and fault.kind == "cut_at_op" and fault.op == position:
        context.stalled.set()
        context.cancel.wait(fault.seconds)
    if context.cancel.is_set():
        raise BatchCancelled(position)


def terminate(context: CommandContext) -> None:
    """The client signalled terminate."""
    context.cancel.set()
