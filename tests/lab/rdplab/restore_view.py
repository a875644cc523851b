"""A simulated host's state as a run and its restore must leave it, for tests that compare before and after.

One definition of "exact" for every test that restores (the restore system test, the fault matrix): the host minus what
a run and its restore legitimately leave - rdpfix's backups, events, counters, armed faults, an empty registry key the
run created (the agent removes values, not keys: documented), and a certificate's link to a key file that does not
exist (a key the run found missing comes back without a link to nothing: documented, said before the restore).
"""

from __future__ import annotations

import copy
import typing as t

BACKUP_ROOT = "c:\\programdata\\rdpfix"
VOLATILE = ("events", "counters", "faults")


def comparable(snapshot: dict[str, t.Any]) -> dict[str, t.Any]:
    """The snapshot (``WindowsHost.snapshot()`` or the control API's) without what a run may legitimately leave."""
    state = copy.deepcopy(snapshot)
    state["files"]["entries"] = {
        path: entry for path, entry in state["files"]["entries"].items() if not path.lower().startswith(BACKUP_ROOT)
    }
    state["files"].pop("write_faults", None)
    state["registry"] = {path: values for path, values in state["registry"].items() if values}
    files = {path.lower() for path in state["files"]["entries"]}
    for certificates in state["certificates"].values():
        for cert in certificates:
            if cert.get("key_path") and str(cert["key_path"]).lower() not in files:
                cert.update(key_path=None, has_private_key=False)
    for volatile in VOLATILE:
        state.pop(volatile, None)
    return state


def differences(before: t.Any, after: t.Any, where: str = "") -> list[str]:
    """Where two states differ, as paths with both values, so a failed comparison says what was not put back."""
    if isinstance(before, dict) and isinstance(after, dict):
        found: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            found += differences(before.get(key), after.get(key), f"{where}/{key}")
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [line for index, (old, new) in pairs for line in differences(old, new, f"{where}[{index}]")]
    return [] if before == after else [f"{where}: before {before!r:.300}, after {after!r:.300}"]
