# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/transport.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: transport
short_description: Choose the RDP transport (UDP and TCP, or TCP only) by policy
version_added: 0.1.0
description:
  - Sets the server policy C(SelectTransport) ("Select RDP transport protocols") and the client policy
    C(fClientDisableUDP) ("Turn Off UDP On Client") under C(HKLM\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services).
  - UDP problems do not cause error 0x904 themselves (the client silently stays on TCP), but UDP breaks sessions over
    many VPNs and secure-access tunnels; O(mode=tcp_only) is the stability fix.
  - Previous values are recorded in a backup manifest on the host before anything is written.
  - A server change takes effect when TermService restarts (RV(restart_required)); the module never restarts it.
    A client change applies to sessions the client opens afterwards (RV(new_client_session_required)).
  - Check mode changes nothing and reports what would change; C(--diff) shows the values before and after.
extends_documentation_fragment:
  - rdpfix.rdp.common
  - rdpfix.rdp.snapshot
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
options:
  mode:
    description:
      - V(tcp_only) writes C(SelectTransport=1) / C(fClientDisableUDP=1); V(udp_and_tcp) writes C(0) / C(0);
        V(default) removes both policy values, so Windows decides.
    type: str
    default: tcp_only
    choices: [tcp_only, udp_and_tcp, default]
  sides:
    description: Which policies to manage. V(client) is for machines people connect from (jump hosts, workstations).
    type: list
    elements: str
    default: [server]
    choices: [server, client]
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Force RDP over TCP on servers reached through a VPN
  rdpfix.rdp.transport:
    mode: tcp_only

- name: Give control back to Windows on servers and clients
  rdpfix.rdp.transport:
    mode: default
    sides: [server, client]
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
  description: Findings in the shape of the collection's findings documentation (id, severity, title, cause, evidence, fix).
  returned: always
  type: list
  elements: dict
restart_required:
  description: Services that must restart before a server change takes effect (C(TermService)).
  returned: always
  type: list
  elements: str
new_client_session_required:
  description: Whether a client change applies only to sessions opened afterwards.
  returned: always
  type: bool
changes:
  description: The registry changes made (or, in check mode, that would be made).
  returned: always
  type: list
  elements: str
backup:
  description:
    - The backup manifest (C(manifest_id), C(path), C(items)) holding the previous values; null without changes.
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
  description: WinRM commands the task sent (1 when compliant, 2 when it changed something).
  returned: always
  type: int
"""
