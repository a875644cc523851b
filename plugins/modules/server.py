# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/server.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: server
short_description: Repair several Remote Desktop concerns of a server from one snapshot, in one apply batch
version_added: 0.2.0
description:
  - Runs M(rdpfix.rdp.machinekeys), M(rdpfix.rdp.certificate), M(rdpfix.rdp.firewall), M(rdpfix.rdp.transport) and
    M(rdpfix.rdp.tls) - those named in its options, each with the options given under its name - on one host, every one
    planning from the same O(snapshot) (the registered result of M(rdpfix.rdp.facts)), and sends the changes of all of
    them in one batch, that is one WinRM command.
  - The batch starts with the guards of every module (what each plan relied on, compared with the host at the write -
    a host that changed since the snapshot stops the batch before its first write; each module then reads again and
    plans anew once, see RV(replanned_concerns)); then, in the order machinekeys, certificate, firewall, transport, tls,
    each module's backup and manifest followed by its changes, and the re-reads that keep the snapshot current.
  - The certificate is planned once the key store's repair is done (Windows never renews a certificate whose key it
    cannot read, and the key repair can renew it); where both need changes, the certificate's are a second apply batch.
    Polls that wait for Windows to create a new self-signed certificate (at most 2, each waiting 5 seconds on the host
    first, as in M(rdpfix.rdp.certificate)) are read-only batches, shared by the modules waiting at the same time.
  - Every concern's options are checked against its module (its argument spec and its own checks) before anything is
    sent, so bad input in one concern fails the task with nothing sent to the host.
  - A module that fails (a refusal, in check mode too) ends the run for the modules after it that have not sent a
    change yet, as separate tasks would (RV(not_run_concerns)). A module whose changes a shared batch already carried
    runs to its end, its verification included, and is reported with its changes, its backup manifest and, for
    M(rdpfix.rdp.tls), C(reboot_required); the task is C(changed) when any of them changed the host.
  - A module whose operation fails inside the shared batch writes its manifest once more with what the batch did of
    each item (one more WinRM command, on that failure path only), before the task names it as the module that
    failed; the modules after it in that batch, whose operations were skipped, did not run and say so in their
    results ("did not run because <module> failed ...; nothing was changed").
  - A module waits for the answer to a shared batch as long as the connection does (the task sends the batch itself,
    within the connection's timeouts), so a slow batch never ends a module without its result.
  - Each module's result is returned under RV(concerns) in the shape of that module's own result; O(report) shows
    one of them as a task's result, so a play can show one line and diff per concern (the C(rdpfix.rdp.rdpfix_server)
    role does, in a loop).
extends_documentation_fragment:
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
attributes:
  check_mode:
    support: full
    description: Every module plans in check mode; nothing is sent to the host beyond what the snapshot lacks.
  diff_mode:
    support: full
    description: Each concern's result carries its own diff; O(report) shows it.
  platform:
    platforms: windows
options:
  snapshot:
    description:
      - The registered result of M(rdpfix.rdp.facts) for this host (or its C(snapshot) value). Refused when taken on
        another host or by another version's format.
      - Without it (and without O(report)), the module takes the snapshot itself first - one read batch, the reads
        M(rdpfix.rdp.facts) makes with the options of the concerns given (without the event log history) - after
        checking every concern's options against its module, so bad input is refused before the host is contacted.
        Reading and repairing in one task costs the same round trips as the two tasks (1 for a compliant host or in
        check mode, 1 more per apply batch) and less controller CPU; the C(rdpfix.rdp.rdpfix_server) role does so.
    type: raw
  machinekeys:
    description: Run M(rdpfix.rdp.machinekeys) with these options (omit to leave the key store alone).
    type: dict
  certificate:
    description: Run M(rdpfix.rdp.certificate) with these options.
    type: dict
  firewall:
    description: Run M(rdpfix.rdp.firewall) with these options.
    type: dict
  transport:
    description: Run M(rdpfix.rdp.transport) with these options.
    type: dict
  tls:
    description: Run M(rdpfix.rdp.tls) with these options.
    type: dict
  concerns:
    description:
      - Every concern to run and its options, in one dictionary (concern name -> that module's options), instead of
        the options O(machinekeys), O(certificate), O(firewall), O(transport) and O(tls) (mutually exclusive with
        them). The same run; for a role that builds all the options in one template (Ansible compiles every template
        of a task anew on every host, so one template for all concerns costs the controller less).
      - A concern given C(null) is left alone, as when its own option is omitted; an empty dictionary, or one that
        leaves every concern alone, is refused.
    type: dict
  report:
    description:
      - One item of RV(concerns) of an earlier run, returned as this task's result (changed, diff, findings, backup;
        failed when that module failed), and nothing is sent. For one output line per concern.
      - With O(report_from), the name of that item instead - a concern, C(reboot) for RV(reboot) or C(verification)
        for RV(verification) - read from the registered result O(report_from) names.
      - Not together with O(snapshot), O(verify), O(reboot), O(concerns) or a concern's options.
    type: raw
  report_from:
    description:
      - The name of a variable holding an earlier run's registered result, from which O(report) (a name) is read as
        it is, never templated into the task's arguments - the cheaper way to show every host's results in a loop.
    type: str
  verify:
    description:
      - After a real run (never in check mode, nor after a failed run), probe RDP from the controller, in this task's
        own process, as M(rdpfix.rdp.handshake) does with its default checks, and return the report as
        RV(verification). No WinRM command is sent (the probe goes to the host's RDP port).
      - The task fails when RDP does not connect, or the listener presents a certificate that is expired or not made
        for server authentication, although the run left nothing pending - no reboot required, no service restart
        pending, no finding unresolved (a module's C(unresolved)); what is pending is listed in the report instead.
      - The C(rdpfix.rdp.rdpfix_server) role passes it unless
        O(rdpfix.rdp.rdpfix_server#role:main:rdpfix_server_verify) is false.
      - After a reboot (O(reboot)), the probe runs once the host is back; a reboot still pending excuses RDP that does
        not connect yet.
    type: dict
    suboptions:
      host:
        description: The address the controller probes (the role passes C(ansible_host), else the inventory name).
        type: str
        required: true
      fallback_port:
        description:
          - The RDP port when the firewall concern did not run or could not read the listener's own (PortNumber),
            which is probed otherwise.
        type: int
        default: 3389
  reboot:
    description:
      - After a run in which a module's change takes effect only after a reboot (C(reboot_required), today
        M(rdpfix.rdp.tls)'s Schannel changes), reboot the host once every concern ran - through
        C(ansible.windows.win_reboot)'s action, on this task's connection - and report it as RV(reboot). The final
        verification (O(verify)) then runs after the reboot.
      - A reboot ends every session on the host. When O(reboot.allow) is true the sessions are read right before it
        (one WinRM command; in check mode they are taken from the snapshot, so the prediction costs nothing), and while
        users are on the host it
        waits for O(reboot.allow_session_disruption); it is then reported as pending, with the users named.
      - Without it, a needed reboot is only reported by the module that needs it (C(reboot_required)).
      - A reboot makes the task C(changed). One that began and then failed (the host not back in time) is reported as
        made (C(rebooted)) and fails the task; a host that cannot be reached to read its sessions or to start the
        reboot is unreachable (nothing was rebooted).
      - The sessions are read only when O(reboot.allow) is true. No reboot follows a run in which a concern failed
        (the modules' results still say C(reboot_required)).
      - Not together with O(report). Under C(async), O(reboot.allow) is refused before the host is contacted.
    type: dict
    suboptions:
      allow:
        description:
          - Reboot when a change needs it. False reports the reboot as pending (RV(reboot), a warning).
          - True needs the collection C(ansible.windows) (a dependency of this one); without it the task is refused
            before the host is contacted.
        type: bool
        default: false
      allow_session_disruption:
        description: Reboot even when it ends users' sessions (Active or Disconnected, the console's included).
        type: bool
        default: false
      msg:
        description:
          - The message Windows shows to the users before the reboot (C(ansible.windows.win_reboot)'s C(msg)).
          - At most 512 characters (C(shutdown /c)); not empty.
        type: str
        default: rdpfix.rdp is rebooting to apply Schannel (TLS) changes
      reboot_timeout:
        description: Seconds to wait for the host to shut down and come back (C(ansible.windows.win_reboot)'s).
        type: int
        default: 600
  return_snapshot:
    description:
      - Return the snapshot (RV(snapshot)) for later tasks to plan from. The role sets it false, since nothing after
        its repair plans from it and the result Ansible keeps for every host is then a third of the size.
    type: bool
    default: true
  backup_root:
    description:
      - The C(backup_root) of every concern whose options give none (a concern's own C(backup_root) wins).
      - This module is in the C(rdpfix.rdp.backup) action group, so C(module_defaults) for C(group/rdpfix.rdp.backup)
        reach the concerns it runs, also through the C(rdpfix.rdp.rdpfix_server) role (which passes it only its own
        O(rdpfix.rdp.rdpfix_server#role:main:rdpfix_server_backup_root), under each concern, when that is set).
      - Defaults to C(%ProgramData%\rdpfix\backups) on the host, as for each module.
    type: str
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Read the host once
  rdpfix.rdp.facts:
  register: rdp_snapshot

- name: Repair the certificate and the firewall in one apply batch
  rdpfix.rdp.server:
    snapshot: "{{ rdp_snapshot }}"
    certificate: {}
    firewall:
      profiles: [Domain, Private]
  register: rdp_repair

- name: Or read and repair in one task (the snapshot taken by the task itself, one read batch)
  rdpfix.rdp.server:
    machinekeys: {}
    certificate: {}
    firewall: {}
    tls: {}
  register: rdp_repair

- name: One result per concern, each with its own diff
  rdpfix.rdp.server:
    report: "{{ item.value }}"
  loop: "{{ rdp_repair.concerns | dict2items }}"
  loop_control:
    label: "{{ item.key }}"

- name: Read, repair, reboot when TLS needs it and nobody is logged on, then verify that RDP connects
  rdpfix.rdp.server:
    concerns:
      certificate: {}
      firewall:
        profiles: [Domain, Private]
      tls: {}
    reboot:
      allow: true
    verify:
      host: "{{ ansible_host | default(inventory_hostname) }}"
    return_snapshot: false
  register: rdp_verified
  # Each concern's failure, a failed reboot and a failed verification are shown by the loop below.
  failed_when: rdp_verified.concerns is not defined and (rdp_verified.failed | default(false))

- name: One result per concern, then the reboot and the verification, read by name (nothing templated per item)
  rdpfix.rdp.server:
    report: "{{ item }}"
    report_from: rdp_verified
  loop: >-
    {{ rdp_verified.concerns.keys() | list
       + (['reboot'] if rdp_verified.reboot is defined else [])
       + (['verification'] if rdp_verified.verification is defined else []) }}
"""

RETURN = r"""
concerns:
  description:
    - Per module run, in the order they ran, its result as that module returns it (C(changed), C(findings), C(diff),
      C(backup), C(actions) or C(changes), C(failed) and C(msg) when it failed), plus C(module) and C(round_trips)
      (the batches that carried its operations, shared with the other modules in them).
  returned: unless O(report) is given
  type: dict
failed_concern:
  description: The module whose failure ended the run (RV(not_run_concerns) lists the modules that then did not run).
  returned: when a module failed
  type: str
not_run_concerns:
  description:
    - The modules named in the options that did not run, in the role's order - not started, stopped before they
      sent any change, or whose operations the shared batch skipped, because a module before them failed. Empty when
      every module ran. Those whose operations were skipped also have a result under RV(concerns) saying so.
  returned: unless O(report) is given
  type: list
  elements: str
replanned_concerns:
  description: The modules whose plan was dropped because the host changed since the snapshot, and made anew.
  returned: unless O(report) is given
  type: list
  elements: str
snapshot:
  description: The snapshot, updated with every read and re-read of the run, for later tasks to plan from.
  returned: unless O(report) is given or O(return_snapshot) is false
  type: dict
verification:
  description:
    - The final verification (O(verify)) - the probe's report as M(rdpfix.rdp.handshake) returns it (C(connectable),
      C(verdict), C(target), C(tls), C(findings), ...), plus C(pending) (what the run left pending, which excuses RDP
      that does not connect yet) and, when it failed the task, C(failed) and C(msg).
  returned: when O(verify) is given, in a real run that did not fail before it
  type: dict
  sample:
    connectable: true
    verdict: ok
    target: {host: 192.0.2.10, port: 3389}
    pending: []
reboot:
  description:
    - The reboot O(reboot) decided on - C(required_by) (the modules whose changes need it), C(rebooted), C(pending)
      (still needed after this run; in check mode, after the real run as predicted), C(users) (the sessions read right
      before it, or from the snapshot in check mode; null when they were not read, as when the reboot is not allowed),
      C(waits_for_sessions) when it waits for them, C(msg), C(warnings) when it is pending, C(elapsed) from
      C(ansible.windows.win_reboot); C(failed) when the reboot failed (the task fails too). In check mode,
      C(rebooted) says what the real run will do, as C(ansible.windows.win_reboot) does.
    - The modules' results under RV(concerns) record it too - C(rebooted) (and C(reboot_required) false) after a
      reboot, C(reboot_waits_for_sessions) while it waits.
  returned: when O(reboot) is given and a module's change needs a reboot, in a run that did not fail before it
  type: dict
  sample:
    changed: true
    required_by: [tls]
    rebooted: true
    pending: false
    users: ""
    msg: "web01: rebooted for the changes of tls"
round_trips:
  description:
    - WinRM commands the task sent - 0 in check mode or when nothing changes, 1 for the apply batch, plus the read
      batch of a module that plans anew, a certificate change after a key store repair, the documented polls, and
      the manifest a module writes again after its operation failed; plus 1 for the snapshot's read when the task took it itself (no O(snapshot) given),
      and 1 for the sessions read right before a reboot (O(reboot); the reboot's own commands are
      C(ansible.windows.win_reboot)'s, not counted here).
      With O(report), the round trips of the reported module.
  returned: always
  type: int
"""
