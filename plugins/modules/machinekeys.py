# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Documentation of rdpfix.rdp.machinekeys; the work is done by the action plugin of the same name."""

from __future__ import annotations

DOCUMENTATION = r"""
module: machinekeys
short_description: Find and repair a broken MachineKeys store or RDP private key (cause of RDP error 0x904 / 0x7)
version_added: "0.1.0"
description:
  - Inspects the C(MachineKeys) folder ACL against the Windows default, the private key file behind the RDP listener's
    certificate (present, non-empty, owner SYSTEM, readable by NETWORK SERVICE, the entries Windows gives it on this OS
    build), the CNG C(Keys) folder for KSP-backed certificates, other empty or unreadable key files (reported only),
    and the Schannel 36870 and RemoteConnectionManager 1055/1057/1058 events.
  - Reports each problem as a finding with its evidence (see the collection's docs/findings.md).
  - Repairs with the least destructive O(strategy) that works. Only the RDP key file and the folder itself are ever
    changed; NETWORK SERVICE is never granted anything on other keys (IIS, SQL Server, VPN...).
  - Everything changed is saved first under the backup folder and listed in a manifest; O(state=restored) with the
    manifest id puts it back exactly.
  - A healthy host costs one WinRM command.
options:
  strategy:
    description:
      - V(permissions) restores the folder's default ACL and adds the missing entries to the RDP key file's ACL only.
        It cannot repair a missing or empty key; the module then fails (or warns in check mode) and names
        V(regenerate).
      - V(regenerate) also restores the folder ACL, then moves the broken RDP key file and its certificate into the
        backup and lets Windows create new ones (the same steps and safe restart as M(rdpfix.rdp.certificate)).
        Only for the self-signed certificate. A CA-issued key must come back from its PFX.
      - V(rename_store) is the well-known rename of the whole store, made safe. The old folder is moved whole into the
        backup, a fresh folder with the default ACL is created, every key file except a broken RDP key is copied back
        with its own ACL, and the RDP certificate is regenerated when its key was broken. Use it only when the folder
        itself is beyond repair.
    type: str
    choices: [permissions, regenerate, rename_store]
    default: permissions
  state:
    description:
      - V(present) inspects and repairs. V(restored) undoes the run named by O(manifest_id); and what the undo replaces is
        itself backed up under a new manifest. Restoring twice is a no-op.
    type: str
    choices: [present, restored]
    default: present
  manifest_id:
    description: The RV(backup.manifest_id) of the run to undo. Required with O(state=restored).
    type: str
  restart_service:
    description:
      - Service restarted to make Windows create a new self-signed certificate (O(strategy=regenerate) and
        O(strategy=rename_store)). C(SessionEnv) keeps RDP sessions, C(TermService) disconnects them and needs
        O(allow_session_disruption).
    type: str
    choices: [SessionEnv, TermService]
    default: SessionEnv
  start_stopped_services:
    description: Start stopped services Windows needs to create the certificate (CertPropSvc, KeyIso, CryptSvc).
    type: bool
    default: false
extends_documentation_fragment:
  - rdpfix.rdp.common
  - rdpfix.rdp.snapshot
  - rdpfix.rdp.session_disruption
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
notes:
  - After a permissions repair no service is restarted; the listener opens its key for each new connection in the
    collection's lab. Microsoft's article restarts TermService after the same repair; if connections still fail on a
    real host, restart TermService in a maintenance window (UNCONFIRMED which one is needed).
seealso:
  - module: rdpfix.rdp.certificate
author:
  - rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Audit the key store (changes nothing)
  rdpfix.rdp.machinekeys:
  check_mode: true

- name: Repair permissions (default strategy)
  rdpfix.rdp.machinekeys:
  register: keys

- name: Regenerate a self-signed certificate whose key file is empty
  rdpfix.rdp.machinekeys:
    strategy: regenerate

- name: Undo a previous run
  rdpfix.rdp.machinekeys:
    state: restored
    manifest_id: "{{ keys.backup.manifest_id }}"
"""

RETURN = r"""
snapshot:
  description:
    - The O(snapshot) given, updated with what this run read and what its apply batch re-read after its changes, for
      the next module of the play to plan from.
  returned: when O(snapshot) was given
  type: dict
replanned:
  description:
    - Why the plan made from O(snapshot) was dropped (the guard that found the host changed), after which the host was
      read again and the plan made anew; null when the snapshot held.
  returned: when O(snapshot) was given
  type: str
findings:
  description: What was found, each with id, severity, title, cause, evidence and fix.
  returned: state=present
  type: list
  elements: dict
machinekeys:
  description: The folder (path, owner, sddl), the number of key files, and each RDP key (path, size, owner, sddl, problems).
  returned: state=present
  type: dict
before:
  description: The same view before the run.
  returned: always
  type: dict
after:
  description: The view after the run (predicted in check mode).
  returned: success
  type: dict
actions:
  description: What was done (status done) or would be done (status planned), in order.
  returned: success
  type: list
  elements: dict
backup:
  description: The backup of this run, or null when nothing was changed.
  returned: always
  type: dict
  contains:
    manifest_id:
      description: Identifier of the backup; give it to O(manifest_id) with O(state=restored) to undo the run.
      type: str
      sample: 20261125T103000Z-machinekeys-1a2b
    path:
      description: Folder on the host holding the saved items and C(manifest.json).
      type: str
    items:
      description:
        - What was saved.
        - Each item the run carries out (a key or the store moved aside, an ACL replaced, the store created) has a
          C(status), C(done), C(failed) (its operation failed, so it did not happen) or C(not_run) (the run stopped
          before it). The manifest on the host says C(planned) until the run has done them all, then C(done); after a
          failed change, each item's status.
        - With O(state=restored), a move the manifest's run never made (its status, or for C(planned) the key
          folders and the backup) is skipped with a warning; the rest of the manifest is put back.
      type: list
      elements: dict
restart_pending:
  description: A regeneration waits for a TermService restart that would disconnect RDP sessions.
  returned: state=present
  type: bool
round_trips:
  description: WinRM commands used (1 on a healthy host).
  returned: always
  type: int
"""
