# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/tls.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tls
short_description: Check and repair the TLS settings of the Remote Desktop listener
version_added: 0.1.0
description:
  - Reports the Schannel server protocols (enabled or not, from C(SCHANNEL\Protocols\<protocol>\Server)), the
    effective cipher-suite list (C(Get-TlsCipherSuite)) and whether any suite is usable with the listener
    certificate's key type, the FIPS policy, and C(SecurityLayer), C(UserAuthentication), C(MinEncryptionLevel) with
    their listener and policy values and which one wins (the policy value, when present).
  - Enables TLS 1.2 (and TLS 1.3 on builds that have it, 20348 and later) for the Schannel server when they are off.
    Removes the TLS 1.3 server value switched on a Windows 10 build (1903 to 22H2), whose TLS 1.3 is experimental;
    on Server 2019 and older, which have no TLS 1.3, the value has no effect and is only reported
    (C(tls.tls13_no_effect)).
  - Restores C(SecurityLayer=2) (TLS) where it is C(0), and C(UserAuthentication=1) (NLA) where it is C(0), on the
    listener (C(RDP-Tcp)).
  - Replaces the cipher-suite order policy with a list of AEAD suites only when the effective list is empty or has no
    suite usable with the listener key, and only with O(override_policy) (the value is a Group Policy value).
  - Group Policy wins. A value under C(HKLM:\SOFTWARE\Policies) (C(SecurityLayer) and C(UserAuthentication) under
    C(Microsoft\Windows NT\Terminal Services), the cipher-suite order under C(Microsoft\Cryptography\...\00010002))
    is reported as enforced by policy (findings C(tls.security_layer_rdp_policy), C(tls.nla_disabled_policy),
    C(tls.cipher_suites_*) with C(enforced_by_policy) in their evidence), with the note that a local change comes back
    at the next Group Policy refresh while a GPO sets it. The module writes such a value only with
    O(override_policy=true), and then warns; the lasting fix is the GPO.
  - Never enables TLS 1.0/1.1 and never turns NLA off, unless O(legacy_protocols) or O(nla=disabled) ask for it; then
    it warns. Weak protocols it finds enabled are reported, not changed.
  - Schannel reads protocols and the cipher-suite policy at boot; the module returns RV(reboot_required) and never
    reboots. The C(rdpfix.rdp.rdpfix_server) role reboots only when allowed to.
  - Previous values are recorded in a backup manifest before anything is written. Check mode changes nothing.
extends_documentation_fragment:
  - rdpfix.rdp.common
  - rdpfix.rdp.snapshot
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
options:
  enable_tls12:
    description: Enable TLS 1.2 for the Schannel server when it is disabled.
    type: bool
    default: true
  enable_tls13:
    description: Enable TLS 1.3 for the Schannel server when it is disabled on a build that supports it.
    type: bool
    default: true
  legacy_protocols:
    description: Deprecated protocols to enable for old clients. Weakens security; the module warns.
    type: list
    elements: str
    default: []
    choices: [TLS 1.0, TLS 1.1]
  restore_security_layer:
    description: Set C(SecurityLayer) from C(0) (native RDP security) to C(2) (TLS).
    type: bool
    default: true
  nla:
    description:
      - V(enabled) turns Network Level Authentication on where it is off; V(keep) only reports;
        V(disabled) turns it off (weakens security; the module warns).
    type: str
    default: enabled
    choices: [enabled, keep, disabled]
  restore_cipher_suites:
    description:
      - Write a usable cipher-suite list when the effective one is empty or has nothing usable.
      - The list is written to the cipher-suite order policy value, so this also needs O(override_policy=true).
    type: bool
    default: true
  override_policy:
    description:
      - Write values that Group Policy owns (under C(HKLM:\SOFTWARE\Policies)) when a fix needs it. The module warns that
        a GPO that sets the value puts its own back at the next policy refresh (about every 90 minutes, and at boot).
      - Without it such values are only reported, with the fix naming this option.
    type: bool
    default: false
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Audit and repair the listener's TLS settings
  rdpfix.rdp.tls:
  register: tls

- name: Reboot when Schannel changes need it
  ansible.windows.win_reboot:
  when: tls.reboot_required
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
  description: Findings (id, severity, title, cause, evidence, fix).
  returned: always
  type: list
  elements: dict
tls:
  description: The report - protocols, cipher_suites (effective, policy, key_type, usable), fips, security_layer,
    user_authentication, min_encryption_level (each with listener, policy, effective, source).
  returned: always
  type: dict
reboot_required:
  description: Whether a change only takes effect after a reboot.
  returned: always
  type: bool
changes:
  description: The registry changes made (or that would be made in check mode).
  returned: always
  type: list
  elements: str
backup:
  description:
    - The backup manifest with the previous values; null without changes.
    - Each item has a C(status), C(done), C(failed) (its change failed) or C(not_run) (the run stopped before it); the
      manifest on the host says C(planned) until the run has made every change, then C(done); after a failed change,
      each item's status.
  returned: always
  type: dict
unresolved:
  description:
    - Ids of the findings this run leaves for someone to decide - critical ones reported without a fix, and any whose
      fix needs options this run was not given. The C(rdpfix.rdp.rdpfix_server) role's final verification fails a
      host only when no module left any.
  returned: success
  type: list
  elements: str
round_trips:
  description: WinRM commands the task sent (1 when nothing changes or in check mode, 2 when it changed something).
  returned: always
  type: int
"""
