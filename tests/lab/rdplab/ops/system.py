"""system.info and util.sleep."""

from __future__ import annotations

import typing as t

from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


def system_info(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    # `caller`: the token the agent runs with, after it enabled its privileges (docs/lab.md, "The caller's token").
    return {**host.system.to_json(), "caller": host.process.caller_record()}


def util_sleep(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    # The lab does not wait: its Windows behaviours (certificate renewal...) complete at once, and tests stay fast.
    milliseconds = _args.integer(args, "milliseconds", 0, 60000)
    return {"slept_ms": milliseconds}
