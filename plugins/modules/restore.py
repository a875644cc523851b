# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Documentation of rdpfix.rdp.restore; the work is done by the action plugin of the same name."""

from __future__ import annotations

DOCUMENTATION = r"""
module: restore
short_description: List what rdpfix changed on a Windows host, and put it back from the backup manifests
version_added: "0.1.0"
description:
  - Every rdpfix.rdp module that changes a host first saves what it replaces under the backup folder and lists it in
    a manifest. This module reads those manifests.
  - Without O(manifest_id) it lists the manifests on the host (id, module, creation time, planned actions, saved items,
    whether already restored) and changes nothing.
  - With O(manifest_id) it puts back exactly what that run changed, for the manifests of every module. Certificates
    are re-imported into their store and re-linked to their key file, which is copied back with its ACL. The
    self-signed certificate Windows created after a certificate run is saved and removed. Registry values get their
    previous type and value back, or are removed when there was none. Firewall rules get their previous record back
    (re-created if removed, removed if the run created them). MachineKeys manifests are restored by the machinekeys
    module's own restore planner.
  - Before it changes anything, it saves what it will overwrite under a new manifest of its own (module C(restore)),
    so a restore can itself be restored. It marks the original manifest restored (C(restored.json)); restoring it
    again changes nothing.
  - Several manifests are restored newest first, each in its own WinRM command, each planned on the state the
    previous one left.
extends_documentation_fragment:
  - rdpfix.rdp.common
  - rdpfix.rdp.session_disruption
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
options:
  manifest_id:
    description:
      - The manifest id (or ids) of the runs to undo, for example C(20261125T103000Z-certificate-1a2b). That is the
        C(backup.manifest_id) the module that made the change returned, an id from the list (RV(manifests)), or one
        of this module's own RV(backup) ids to undo a restore.
      - An id that does not have this form is refused before the host is contacted; an id the host does not have
        fails the task and changes nothing.
      - Omit it to list the manifests on the host.
    type: list
    elements: str
  restart_service:
    description:
      - The service restarted after the pinned listener certificate (C(SSLCertificateSHA1Hash)) is put back, so the
        listener reads it again; no other restore restarts anything.
      - C(SessionEnv) keeps RDP sessions. C(TermService) disconnects them and needs O(allow_session_disruption);
        without it the restore changes nothing and returns RV(restart_pending).
    type: str
    choices: [SessionEnv, TermService]
    default: SessionEnv
  accept_certificate_renewal:
    description:
      - A restore is exact or refused before it starts. Putting back a pin (C(SSLCertificateSHA1Hash)) restarts
        O(restart_service); when the self-signed certificates the restore leaves in C(LocalMachine\Remote Desktop) are
        all expired (or there are none) and the services Windows needs run, that restart makes Windows create a new
        self-signed certificate, so the host would end neither as it was nor as it is. The module predicts this from the
        manifests and the host's state and, by default, fails before anything is changed (in check mode too), with
        RV(renewal_predicted) naming the manifests and C(refused) as their status.
      - With V(true) it restores anyway; a manifest after which Windows did create the new certificate gets the
        status C(restored_renewed) and a warning naming it.
    type: bool
    default: false
notes:
  - A registry key the original run created (because the value it wrote was the first in it) stays behind, empty;
    the agent removes values, not keys.
  - A firewall rule the restore re-creates gets its Name, group, direction, action, profiles, protocol, local ports,
    remote addresses, program and service back; a remote port filter and the description are not in the saved rule
    record.
  - Services an original run started (O(rdpfix.rdp.certificate#module:start_stopped_services)) keep running.
  - A certificate manifest does not record the key file's ACL; the restore keeps the ACL of the file it overwrites
    (the one Windows gave the new key) and warns when there is none.
seealso:
  - module: rdpfix.rdp.machinekeys
  - module: rdpfix.rdp.certificate
author:
  - rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: What did rdpfix change on these servers?
  rdpfix.rdp.restore:
  register: rdpfix_backups

- name: Show it
  ansible.builtin.debug:
    msg: "{{ rdpfix_backups.manifests | map(attribute='id') | list }}"

- name: Undo one run (see what it would do first with --check --diff)
  rdpfix.rdp.restore:
    manifest_id: 20261125T103000Z-certificate-1a2b

- name: Undo a whole fix_rdp.yml run, newest change first
  rdpfix.rdp.restore:
    manifest_id:
      - 20261125T103000Z-machinekeys-77c1
      - 20261125T103004Z-certificate-1a2b
      - 20261125T103006Z-firewall-9f00
  register: undone

- name: Undo the undo
  rdpfix.rdp.restore:
    manifest_id: "{{ undone.backup | map(attribute='manifest_id') | list }}"
"""

RETURN = r"""
manifests:
  description:
    - Without O(manifest_id), every manifest on the host, newest first, with C(id), C(module), C(host), C(created),
      C(path), C(actions) (what the run planned), C(items) (what it saved; certificate bodies left out),
      C(restored), C(restored_by) and C(restores) (for a manifest of this module, the manifest it restored). A
      manifest that cannot be read is listed with C(error).
    - With O(manifest_id), one entry per requested manifest with C(id), C(module), C(created), C(status)
      (C(restored), C(restored_renewed), C(already_restored), C(unchanged), C(planned) in check mode, C(pending),
      C(failed), C(refused) and C(not_started) when the restore cannot be exact),
      C(restored_by) and C(backup) (the id of the manifest this restore wrote).
  returned: always
  type: list
  elements: dict
backup_root:
  description: The folder on the host that holds the manifests.
  returned: always
  type: str
  sample: C:\ProgramData\rdpfix\backups
actions:
  description: What was done (status C(done)) or would be done (C(planned), C(pending)), in order, each with its C(manifest_id).
  returned: when O(manifest_id) is given
  type: list
  elements: dict
backup:
  description: The manifests this restore wrote, one per restored manifest; give their ids to O(manifest_id) to undo it.
  returned: when O(manifest_id) is given
  type: list
  elements: dict
  contains:
    manifest_id:
      description: Identifier of the new manifest.
      type: str
      sample: 20261125T110000Z-restore-3c4d
    path:
      description: Folder on the host holding the saved items and C(manifest.json).
      type: str
    items:
      description:
        - What was saved.
        - Each item the restore carries out has a C(status), C(done), C(failed) or C(not_run), as for the repair
          modules; its manifest on the host says C(planned) until the restore has made every change, then C(done);
          after a failed change, each item's status.
      type: list
      elements: dict
before:
  description: Per restored manifest, the values it touches before the restore (registry values, firewall rules, store contents, key files).
  returned: when O(manifest_id) is given
  type: dict
after:
  description: The same values after the restore, as re-read from the host (predicted in check mode).
  returned: when O(manifest_id) is given
  type: dict
restart_pending:
  description: The restore needs a TermService restart that would disconnect RDP sessions; nothing was changed.
  returned: when O(manifest_id) is given
  type: bool
renewal_predicted:
  description:
    - The manifests whose restore would make Windows replace the self-signed certificate it puts back (see
      O(accept_certificate_renewal)); empty when every restore can be exact.
  returned: when O(manifest_id) is given
  type: list
  elements: str
reboot_required:
  description: A restored Schannel value takes effect at the next boot.
  returned: when O(manifest_id) is given
  type: bool
restart_required:
  description: Services that must restart before a restored value takes effect (C(TermService) for the transport policy).
  returned: when O(manifest_id) is given
  type: list
  elements: str
round_trips:
  description: WinRM commands used (list 1; restore 2 + one per restored manifest; an already restored manifest 1).
  returned: always
  type: int
"""
