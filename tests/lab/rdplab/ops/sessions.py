"""session.list."""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def session_list(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"sessions": host.sessions.snapshot()}
