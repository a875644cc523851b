# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the attributes every rdpfix.rdp module declares mean.

The same role as ansible-core's action_common_attributes fragment: each module lists this fragment and then states only
its own support level (and details), so the meaning of an attribute is written once. A module's own values win over
the fragment's when both are given.
"""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
attributes:
  check_mode:
    description: Can run in check mode and return a prediction of what would change without modifying the target.
  diff_mode:
    description: Returns details on what has changed (or would change, in check mode) when run with C(--diff).
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: windows
"""

    # The modules that run the agent on a Windows host (every module but handshake and fleet_report): how they reach it,
    # as ansible-core's action_common_attributes.conn and .flow fragments name it (docs/architecture.md, "How a batch
    # reaches the host").
    WINDOWS = r"""
attributes:
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the
      controller.
    support: full
    details: Every decision is made by the action plugin on the controller; the host runs batches of primitive
      operations.
  async:
    description: Supports being used with the C(async) keyword.
    support: partial
    details:
      - With C(poll) 1 or more, each round trip runs as an Ansible async job on the host (Ansible's async wrapper),
        which the module polls with M(ansible.windows.async_status) every C(poll) seconds for at most C(async) seconds
        (wall time) and then removes; the task's result is the module's own result, as without C(async).
      - Each batch then costs, besides its own command, its polls and one cleanup; the module's result is written into
        the last job's result file for Ansible's own polling to read (one more command). A run that sends no batch
        (planned from a snapshot, nothing to change) runs an empty batch as a job to hand its result over in.
      - A write batch that runs out of time (the controller's deadline, or Ansible's async watchdog stopping it) is an
        unknown outcome naming its backup manifest, as a lost answer is.
      - An unreachable host's result is also C(failed) (ansible-core polls any async result that is not failed), so
        the host counts as failed, not unreachable. If the result cannot be written where Ansible's polling reads it,
        the module's own result is returned, failed, with a warning.
      - C(poll=0) (fire and forget) is not supported; it is refused before anything is sent.
  become:
    description: Is usable alongside become keywords.
    support: full
    details:
      - C(become_method=runas), including C(become_user=SYSTEM); the operations then run with that account's token
        (what SYSTEM may read differs from what an Administrator may).
      - The become wrapper travels inside each batch, as for every Windows module; it adds no command.
      - Other become methods are refused before anything is sent.
  bypass_host_loop:
    description: Forces a 'global' task that does not execute per host.
    support: none
  connection:
    description: Uses the target's configured connection information to execute code on it.
    support: full
    details:
      - C(ansible.builtin.winrm), C(ansible.builtin.psrp), and C(ansible.builtin.ssh) with
        C(ansible_shell_type=powershell) (Windows OpenSSH); each batch is one command through Ansible's PowerShell
        module wrapper, whatever the C(pipelining) setting.
      - P(rdpfix.rdp.azure_run_command#connection) reaches Azure VMs through Azure Run Command, one Run Command per
        batch (more only for results past about 7,600 characters).
  delegation:
    description: Can be used in conjunction with delegate_to and related keywords.
    support: partial
    details:
      - To another Windows host only; the results name the host contacted.
      - A delegation to a host that is not reached through a Windows shell (C(localhost), for instance) is refused
        before anything is sent.
"""
