"""Faults injected at run time (`rdplab fault`, tests): each breaks one thing the way it breaks on real servers."""

from __future__ import annotations

import typing as t
from collections.abc import Callable
from datetime import timedelta

from rdplab import transport_faults
from rdplab.model import listener
from rdplab.model.certs import Certificate, build_certificate
from rdplab.model.errors import WRITE_FAULT_ERRORS, AccessDenied, OpError
from rdplab.model.filesystem import normalize, validate_path
from rdplab.model.sessions import WTS_STATES
from rdplab.model.stores import RDP_STORE
from rdplab.model.timeutil import iso

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

FaultHandler = Callable[["WindowsHost", dict[str, t.Any]], None]


def _param(params: dict[str, t.Any], name: str, kind: type, default: object = None) -> t.Any:
    value = params.get(name, default)
    if value is None or isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ValueError(f"parameter {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def expire_selfsigned(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """Replace each Remote Desktop certificate with a copy, same key and key file, that expired ``days_ago`` ago."""
    days_ago = _param(params, "days_ago", int, 1)
    certificates = host.stores.entries(RDP_STORE)
    if not certificates:
        raise ValueError("the Remote Desktop store is empty: nothing to expire")
    now = host.clock().replace(second=0, microsecond=0)
    for cert in certificates:
        if cert.lab_key is None:
            raise ValueError(f"certificate {cert.thumbprint} was not built by the lab and cannot be re-signed")
        der = build_certificate(
            label=f"{host.key_label}:expired:{cert.thumbprint}",
            key=cert.lab_key,
            subject_cn=cert.x509.subject.rfc4514_string().removeprefix("CN="),
            sans=cert.sans,
            ekus=cert.ekus,
            not_before=now - timedelta(days=days_ago) - listener.SELFSIGNED_VALIDITY,
            not_after=now - timedelta(days=days_ago),
            issuer=None,
        )
        host.stores.remove(RDP_STORE, cert.thumbprint)
        host.stores.add(RDP_STORE, Certificate(der=der, key_link=cert.key_link, lab_key=cert.lab_key))


def remove_pinned_cert(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """Delete the pinned certificate from LocalMachine\\My, leaving the registry pin (and the key file) behind."""
    pinned = listener.pinned_thumbprint(host)
    if pinned is None:
        raise ValueError("no certificate is pinned (SSLCertificateSHA1Hash is not set)")
    if not host.stores.remove("My", pinned):
        raise ValueError(f"the pinned certificate {pinned} is already missing from LocalMachine\\My")


def stop_service(host: WindowsHost, params: dict[str, t.Any]) -> None:
    name = _param(params, "name", str)
    try:
        host.stop_service(name)
    except OpError as exc:
        raise ValueError(exc.message) from None


def fail_writes_under(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """Every later write at or below ``path`` fails with ``error`` (DiskFull or AccessDenied), leaving nothing."""
    error = _param(params, "error", str, "DiskFull")
    if error not in WRITE_FAULT_ERRORS:
        raise ValueError(f"parameter 'error' must be one of {sorted(WRITE_FAULT_ERRORS)}, got {error!r}")
    try:
        path = validate_path(params.get("path"))
    except OpError as exc:
        raise ValueError(exc.message) from None
    host.filesystem.add_fault(path, error)


def clear_write_faults(host: WindowsHost, params: dict[str, t.Any]) -> None:
    host.filesystem.faults.clear()


def add_session(host: WindowsHost, params: dict[str, t.Any]) -> None:
    user = _param(params, "user", str)
    state = _param(params, "state", str, "Active")
    if state not in WTS_STATES:
        raise ValueError(f"parameter 'state' must be one of {', '.join(WTS_STATES)}, got {state!r}")
    host.sessions.add(user, state)


def break_selfsigned_key(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """Damage the Remote Desktop certificate's key file: ``mode`` delete | empty | deny_network_service."""
    mode = _param(params, "mode", str, "deny_network_service")
    cert = listener.selfsigned_certificate(host)
    if cert is None or cert.key_link is None:
        raise ValueError("the Remote Desktop store has no certificate with a key file")
    entry = host.filesystem.get(cert.key_link.path)
    if entry is None:
        raise ValueError(f"the key file {cert.key_link.path} is already missing")
    if mode == "delete":
        del host.filesystem.entries[next(k for k, v in host.filesystem.entries.items() if v is entry)]
    elif mode == "empty":
        entry.content = b""
    elif mode == "deny_network_service":
        entry.sddl = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)"
    else:
        raise ValueError(f"parameter 'mode' must be delete, empty or deny_network_service, got {mode!r}")


def hold_run_lock(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """Another run holds the host's rdpfix run lock (docs/agent-protocol.md, "The run lock"): its record, written as
    that run's agent wrote it, expiring in ``seconds``. ``alive`` (default): that run's batch is in progress and holds
    the file open. ``alive`` false: its batch ended without releasing it (cut or crashed); ``process_alive`` says
    whether the process it names still runs (under PSRP the host process outlives the batch; default false).
    ``legacy``: the record of an older version, without ``held``, which the agent judges by its time and process (no
    file handle); ``written_ago`` seconds since its last write (default 5)."""
    import json
    import ntpath

    from rdplab.ops.lock import HOLDER_OTHER_RUN, LOCK_FILE_SDDL, LOCK_FOLDER_SDDL

    seconds = _param(params, "seconds", int, 600)
    alive = _param(params, "alive", bool, True)
    legacy = _param(params, "legacy", bool, False)
    process_alive = _param(params, "process_alive", bool, alive or legacy)
    written_ago = _param(params, "written_ago", int, 5)
    owner = params.get("owner") or {"controller": "ansible-ctl-2", "pid": 4242, "run": "other-run", "user": "awx"}
    if not isinstance(owner, dict):
        raise ValueError(f"parameter 'owner' must be a mapping, got {owner!r}")
    now = host.clock()
    process = {"id": 7000 + len(host.other_agent_processes) * 4, "started": iso(now - timedelta(seconds=5))}
    if process_alive:
        host.other_agent_processes.append(process)
    record: dict[str, t.Any] = {
        "token": _param(params, "token", str, "other-run-token"),
        "owner": owner,
        "acquired": iso(now - timedelta(seconds=written_ago)),
        "expires": iso(now + timedelta(seconds=seconds)),
        "process": process,
    }
    if not legacy:
        record["held"] = True
    path = ntpath.join(host.system.program_data, "rdpfix", "run.lock")
    # An older version left the folder with ProgramData's inherited ACL; this version protects it.
    host.filesystem.make_dirs(ntpath.dirname(path), None if legacy else LOCK_FOLDER_SDDL)
    entry = host.filesystem.write(path, json.dumps(record, separators=(",", ":")).encode("utf-8"), LOCK_FILE_SDDL)
    entry.written = now - timedelta(seconds=written_ago)
    host.open_lock_files.pop(normalize(path), None)
    if alive and not legacy:
        host.open_lock_files[normalize(path)] = HOLDER_OTHER_RUN


# A standard user of the lab's hosts (a local account: BUILTIN\Users, Authenticated Users, Everyone).
STANDARD_USER_SID = "S-1-5-21-3623811015-3361044348-30300820-1013"
_STANDARD_USER_IDENTITIES = ("S-1-1-0", "S-1-5-11", "S-1-5-32-545")
FILE_ADD_FILE = 0x2


def plant_run_lock(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """A standard user (no administrator) creates the rdpfix run lock file to block every run: a record with a far
    ``expires`` naming a process the user keeps running, in the folder as an older version created it (ProgramData's
    inherited ACL, where Users may create files) when it does not exist yet. Windows lets the user create it only
    where the folder's DACL grants the user (or Users, Authenticated Users, Everyone) the right to add a file;
    the file is then owned by the user, whose token's default owner is its own SID, and inherits the folder's
    file-inheritable entries with CREATOR OWNER standing for the user (docs/lab.md). ``held_open``: the user's process
    keeps it open with FileShare.None. Raises OpError AccessDenied where Windows refuses the user."""
    import json
    import ntpath

    from rdplab.model import sddl as sddl_mod
    from rdplab.ops.lock import HOLDER_USER

    user = _param(params, "user", str, STANDARD_USER_SID)
    held_open = _param(params, "held_open", bool, False)
    folder = ntpath.join(host.system.program_data, "rdpfix")
    host.filesystem.make_dirs(folder)
    entry = host.filesystem.get(folder)
    assert entry is not None
    identities = {user, *_STANDARD_USER_IDENTITIES}
    aces = [ace for ace in sddl_mod.dacl(entry.sddl) if ace.sid in identities and ace.mask & FILE_ADD_FILE]
    if not aces or any(not ace.allow for ace in aces):
        raise AccessDenied(f"Access to the path '{folder}\\run.lock' is denied.")
    inherited = "".join(
        f"(A;ID;{_rights(ace)};;;{user if ace.sid == 'S-1-3-0' else ace.sid})"
        for ace in sddl_mod.dacl(entry.sddl, inherit_only=True)
        if ace.allow and "OI" in ace.flags
    )
    now = host.clock()
    process = {"id": 9000 + len(host.other_agent_processes) * 4, "started": iso(now - timedelta(days=1))}
    host.other_agent_processes.append(process)
    record = {
        "token": "planted",
        "owner": {"controller": "nobody"},
        "acquired": iso(now),
        "expires": iso(now + timedelta(days=3650)),
        "process": process,
    }
    path = ntpath.join(folder, "run.lock")
    planted = host.filesystem.write(path, json.dumps(record).encode("utf-8"), f"O:{user}G:{user}D:AI{inherited}")
    planted.written = now
    if held_open:
        host.open_lock_files[normalize(path)] = HOLDER_USER


def _rights(ace: t.Any) -> str:
    # An inherited entry's generic rights are mapped to the file's own: GENERIC_ALL is full control.
    mask = 0x1F01FF if ace.mask & 0x10000000 else ace.mask
    return f"0x{mask:x}"


def busy_run_lock(host: WindowsHost, params: dict[str, t.Any]) -> None:
    """Another agent (an older version judging the lock with FileShare.None) holds the run lock file for a moment:
    the next ``opens`` opens of it by lock.acquire or lock.release meet a sharing violation."""
    host.lock_busy_opens = _param(params, "opens", int, 1)


FAULTS: dict[str, FaultHandler] = {
    "expire_selfsigned": expire_selfsigned,
    "remove_pinned_cert": remove_pinned_cert,
    "stop_service": stop_service,
    "fail_writes_under": fail_writes_under,
    "clear_write_faults": clear_write_faults,
    "add_session": add_session,
    "break_selfsigned_key": break_selfsigned_key,
    "hold_run_lock": hold_run_lock,
    "plant_run_lock": plant_run_lock,
    "busy_run_lock": busy_run_lock,
    # The remote-management transport (rdplab.transport_faults): dropped, failed or held answers, cut batches.
    "transport": transport_faults.inject,
    "clear_transport_faults": transport_faults.clear,
}
