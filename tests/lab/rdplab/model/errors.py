"""Errors raised inside the model.

``OpError`` subclasses carry the agent protocol's error ``type`` so that ``run_batch`` can report them exactly as the
PowerShell agent does. ``HostFileError`` is a configuration problem of a host or fleet file, reported before anything
starts, naming the file and the field.
"""

from __future__ import annotations


class OpError(Exception):
    """An operation failed on the host; ``error_type`` is one of the protocol's error types."""

    error_type = "Failed"

    def __init__(self, message: str, data: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # What the failed operation still reports (a guard's actual value, a lock's holder): the result's ``data``.
        self.data = data


class NotFound(OpError):
    error_type = "NotFound"


class AccessDenied(OpError):
    error_type = "AccessDenied"


class InvalidArgument(OpError):
    error_type = "InvalidArgument"


class DiskFull(OpError):
    error_type = "DiskFull"


class Unsupported(OpError):
    error_type = "Unsupported"


class Failed(OpError):
    error_type = "Failed"


class GuardFailed(OpError):
    """A guard's read no longer returns what the plan relied on (docs/agent-protocol.md, "Guards")."""

    error_type = "GuardFailed"


class Locked(OpError):
    """Another run holds the host's rdpfix lock (docs/agent-protocol.md, "The run lock")."""

    error_type = "Locked"


class AlreadyClaimed(OpError):
    """dir.create's ``claim`` file is already in the folder: another caller claimed it first."""

    error_type = "AlreadyClaimed"


# The error types a `fail_writes_under` fault may produce, by protocol name.
WRITE_FAULT_ERRORS: dict[str, type[OpError]] = {"DiskFull": DiskFull, "AccessDenied": AccessDenied}


class HostFileError(ValueError):
    """A host or fleet file is invalid: the message names the file and the field."""


class BatchError(ValueError):
    """The batch document itself is malformed (the real agent would exit non-zero without a result document)."""
