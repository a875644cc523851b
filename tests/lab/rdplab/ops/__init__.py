"""The agent operations as the lab executes them, keyed by protocol name (docs/agent-protocol.md, "Operations").

A contract test compares the keys of OPS with the Python side's OPERATIONS and the agent's $Operations table, and
``writes`` with the read/write split of the protocol.
"""

from __future__ import annotations

import typing as t
from collections.abc import Callable
from dataclasses import dataclass

from rdplab.ops import (
    acl,
    certificates,
    events,
    files,
    firewall,
    guard,
    listener,
    lock,
    registry,
    services,
    sessions,
    system,
)

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

OpFunction = Callable[["WindowsHost", dict[str, t.Any]], dict[str, t.Any]]


@dataclass(frozen=True)
class OpSpec:
    func: OpFunction
    writes: bool  # a successful call counts as one write; a read must never change the host
    # The run lock's operations are writes, but bookkeeping that a batch undoes itself (lock.release): not counted, so
    # that ``writes`` counts the changes a module made to the host.
    counted: bool = True


OPS: dict[str, OpSpec] = {
    "system.info": OpSpec(system.system_info, writes=False),
    "registry.get": OpSpec(registry.registry_get, writes=False),
    "listener.get": OpSpec(listener.listener_get, writes=False),
    "cert.list": OpSpec(certificates.cert_list, writes=False),
    "service.get": OpSpec(services.service_get, writes=False),
    "session.list": OpSpec(sessions.session_list, writes=False),
    "file.stat": OpSpec(files.file_stat, writes=False),
    "file.read": OpSpec(files.file_read, writes=False),
    "dir.list": OpSpec(files.dir_list, writes=False),
    "dir.read_each": OpSpec(files.dir_read_each, writes=False),
    "util.sleep": OpSpec(system.util_sleep, writes=False),
    "registry.set": OpSpec(registry.registry_set, writes=True),
    "registry.remove": OpSpec(registry.registry_remove, writes=True),
    "listener.set_certificate": OpSpec(listener.listener_set_certificate, writes=True),
    "cert.remove": OpSpec(certificates.cert_remove, writes=True),
    "cert.import": OpSpec(certificates.cert_import, writes=True),
    "cert.repair_key_link": OpSpec(certificates.cert_repair_key_link, writes=True),
    "service.restart": OpSpec(services.service_restart, writes=True),
    "service.start": OpSpec(services.service_start, writes=True),
    "dir.create": OpSpec(files.dir_create, writes=True),
    "file.write": OpSpec(files.file_write, writes=True),
    "file.copy": OpSpec(files.file_copy, writes=True),
    # rdpfix.rdp.machinekeys
    "dir.stat": OpSpec(acl.dir_stat, writes=False),
    # rdpfix.rdp.facts and rdpfix.rdp.machinekeys
    "events.query": OpSpec(events.events_query, writes=False),
    "acl.set": OpSpec(acl.acl_set, writes=True),
    "file.move": OpSpec(acl.file_move, writes=True),
    "dir.move": OpSpec(acl.dir_move, writes=True),
    "firewall.rules.list": OpSpec(firewall.rules_list, writes=False),
    "security_products.list": OpSpec(firewall.security_products_list, writes=False),
    "tls.cipher_suites.list": OpSpec(firewall.cipher_suites_list, writes=False),
    "firewall.rule.set": OpSpec(firewall.rule_set, writes=True),
    "firewall.rule.new": OpSpec(firewall.rule_new, writes=True),
    "firewall.rule.remove": OpSpec(firewall.rule_remove, writes=True),
    # Guarded writes: the first operations of an apply batch (rdpfix.rdp plugin_utils/_guards.py)
    "guard": OpSpec(guard.guard, writes=False),
    # The run lock: the first and last operations of an apply batch (rdpfix.rdp plugin_utils/_lock.py)
    "lock.acquire": OpSpec(lock.lock_acquire, writes=True, counted=False),
    "lock.release": OpSpec(lock.lock_release, writes=True, counted=False),
}

READ_OPERATIONS = frozenset(name for name, spec in OPS.items() if not spec.writes)
WRITE_OPERATIONS = frozenset(name for name, spec in OPS.items() if spec.writes)
