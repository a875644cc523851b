"""listener.get / listener.set_certificate (Win32_TSGeneralSetting)."""

from __future__ import annotations

import typing as t

from rdplab.model import listener
from rdplab.model.errors import InvalidArgument, NotFound
from rdplab.model.registry import RDP_TCP, make_value
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def _terminal(args: dict[str, t.Any]) -> None:
    terminal_name = _args.string(args, "terminal_name", default="RDP-tcp")
    if terminal_name.casefold() != "rdp-tcp":
        # Only the default listener exists on the simulated hosts; WMI finds no instance for another name.
        raise NotFound(f"no Win32_TSGeneralSetting instance with TerminalName '{terminal_name}'")


def listener_get(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    _terminal(args)
    return listener.wmi_setting(host)


def listener_set_certificate(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    _terminal(args)
    thumbprint = _args.thumbprint(args)
    if host.stores.find("My", thumbprint) is None:
        # What WMI answers when the certificate is not in LocalMachine\My [Listener].
        raise InvalidArgument(f"Invalid Parameter: certificate {thumbprint} is not in LocalMachine\\My")
    # What WMI showed before the write: the pinned hash, else the self-signed certificate's (as the agent reads it).
    previous = listener.wmi_setting(host)["ssl_certificate_sha1_hash"]
    # WMI stores the thumbprint as the REG_BINARY mirror on RDP-Tcp.
    host.registry.set(RDP_TCP, listener.PINNED_VALUE, make_value("REG_BINARY", thumbprint.lower()))
    return {"previous": previous}
