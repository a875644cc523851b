# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/firewall.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: firewall
short_description: Let RDP through Windows Firewall, and find what blocks it
version_added: 0.1.0
description:
  - "Server side: makes sure an enabled inbound rule allows RDP over TCP (and UDP) on the listener's real port for the
    chosen O(profiles). While the listener is on 3389 the built-in rules C(RemoteDesktop-UserMode-In-TCP) /
    C(-UDP) are enabled (found by Name, never by the localized display text); on a moved port the module keeps its
    own rules C(rdpfix-RemoteDesktop-In-TCP) / C(-UDP) on that port."
  - A rule that is enabled is only widened to the chosen profiles; a disabled rule is enabled for exactly the chosen
    profiles. The remote address scope is kept as it is unless O(remote_addresses) is given; a new rule copies the
    built-in rule's scope.
  - Opening to any remote address on the Public profile fails unless O(allow_public_any=true), which warns.
  - Enabled block rules that match RDP win over every allow rule; they are reported as findings and disabled only with
    O(disable_blocking_rules=true). Rules from Group Policy are reported, never changed.
  - "Client side (O(sides) contains V(client)): optional outbound allow rules for the RDP client programs in
    O(client_programs); outbound block rules that stop C(mstsc.exe) or TCP 3389 are reported; third-party firewall
    products registered in C(root\\SecurityCenter2) (client SKUs) are reported."
  - Rules are compared on normalised values (profile masks, ports, addresses, programs with environment variables
    expanded), so a second run changes nothing. Each changed rule is saved whole in a backup manifest first.
extends_documentation_fragment:
  - rdpfix.rdp.common
  - rdpfix.rdp.snapshot
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
options:
  sides:
    description: Server (inbound) and/or client (outbound) rules.
    type: list
    elements: str
    default: [server]
    choices: [server, client]
  profiles:
    description: Firewall profiles RDP must be allowed on.
    type: list
    elements: str
    default: [Domain, Private]
    choices: [Domain, Private, Public]
  remote_addresses:
    description: Remote address scope to set on the RDP rules (addresses, subnets, ranges, keywords such as
      C(LocalSubnet)). Omitted, scopes are kept.
    type: list
    elements: str
  allow_public_any:
    description: Allow opening RDP to any address on the Public profile (warns).
    type: bool
    default: false
  disable_blocking_rules:
    description: Disable the local block rules that stop RDP (warns).
    type: bool
    default: false
  udp:
    description: Also allow RDP over UDP on the server.
    type: bool
    default: true
  client_programs:
    description: Programs that get an outbound allow rule on a client - V(mstsc), V(msrdc) (Remote Desktop client /
      Windows App session host, per-machine install path) or absolute C(.exe) paths.
    type: list
    elements: str
    default: []
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Allow RDP on the domain and private profiles, report blockers
  rdpfix.rdp.firewall:

- name: Restrict RDP to the management network and remove local block rules
  rdpfix.rdp.firewall:
    remote_addresses: [10.20.0.0/16]
    disable_blocking_rules: true

- name: Client side
  rdpfix.rdp.firewall:
    sides: [client]
    client_programs: [mstsc]
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
firewall:
  description: The report - server (port, profiles, per protocol the rules allowing and blocking RDP), client
    (outbound rules, blockers, security products), profiles, network_categories.
  returned: always
  type: dict
changes:
  description: Rule operations made (or that would be made in check mode) with their reasons.
  returned: always
  type: list
  elements: dict
backup:
  description:
    - The backup manifest with every changed rule's previous record; null without changes.
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
