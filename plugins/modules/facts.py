# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/facts.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: facts
short_description: Find why Remote Desktop fails with 0x904 / extended error 0x7, without changing anything
version_added: 0.1.0
description:
  - Reads, in one WinRM command, everything the collection's fixing modules inspect - the listener and its
    certificates, the MachineKeys folder and the RDP key file, Windows Firewall rules and security products, the
    transport policy, Schannel protocols and cipher suites, SecurityLayer and NLA, the Remote Desktop services and
    sessions - plus the event log entries of the last O(event_days) days that explain RDP's TLS failures (Schannel
    36870, 36871, 36874, 36887, 36888 with the TLS alert named; RemoteConnectionManager 1050-1065; Security 4625).
  - Returns them as facts and as a list of RV(findings). Each finding has a stable id, a severity, a title, the cause
    family, the likely cause, the evidence (the values and events seen) and the fix - the module and options that
    repair it - or no fix when nothing should be changed automatically.
  - The findings are made by the same planners as the fixing modules (M(rdpfix.rdp.certificate),
    M(rdpfix.rdp.machinekeys), M(rdpfix.rdp.firewall), M(rdpfix.rdp.transport), M(rdpfix.rdp.tls)), run with the options
    given here, so a finding with a fix is exactly a change that module makes with those options (or would make in
    check mode). Give this module the same options as the fix run.
  - Events are history. An event that a current finding explains is added to that finding's evidence; an event nothing
    current explains becomes an C(events.*) finding of its own (the fault was intermittent, was repaired since, or lies
    with the clients - for example Schannel 36874 when old clients offer only TLS 1.0).
  - Never changes the host; check mode runs exactly the same reads.
options:
  gather_events:
    description:
      - Read the event log history (O(event_days)). V(false) reads only what the fixing modules plan from, for a
        RV(snapshot) to repair from (the C(rdpfix.rdp.rdpfix_server) role does); the events' findings are then absent.
    type: bool
    default: true
    version_added: 0.2.0
  event_days:
    description: How many days of event log history to read (1 to 365).
    type: int
    default: 7
  max_events:
    description: At most this many events per log or channel (1 to 1000), newest first.
    type: int
    default: 100
  expiry_threshold_days:
    description: A certificate with this many days left or fewer is reported as expiring (as M(rdpfix.rdp.certificate)).
    type: int
    default: 30
  restart_service:
    description: The service the certificate repair would restart (as M(rdpfix.rdp.certificate)).
    type: str
    default: SessionEnv
    choices: [SessionEnv, TermService]
  certificate_replacement_thumbprint:
    description:
      - The certificate the fix run would pin (O(rdpfix.rdp.certificate#module:replacement_thumbprint)). Where the
        certificate module would refuse it, the audit reports C(certificate.plan_refused).
    type: str
  certificate_replace_when:
    description: When the fix run pins it (O(rdpfix.rdp.certificate#module:replace_when)).
    type: str
    default: unusable
    choices: [unusable, always]
  certificate_repin_renewal:
    description: Whether the fix run re-pins a renewal of the pinned certificate (O(rdpfix.rdp.certificate#module:repin_renewal)).
    type: bool
    default: false
  machinekeys_strategy:
    description: The MachineKeys repair strategy the fix run uses (O(rdpfix.rdp.machinekeys#module:strategy)).
    type: str
    default: permissions
    choices: [permissions, regenerate, rename_store]
  firewall_profiles:
    description: The firewall profiles RDP should be allowed on (O(rdpfix.rdp.firewall#module:profiles)).
    type: list
    elements: str
    default: [Domain, Private]
    choices: [Domain, Private, Public]
  transport_mode:
    description:
      - The transport policy wanted (O(rdpfix.rdp.transport#module:mode)).
      - V(keep) does not judge the transport policy (its values are still reported in RV(rdp)), as the
        C(rdpfix.rdp.rdpfix_server) role leaves it alone with its default C(rdpfix_server_transport_mode=keep).
    type: str
    default: tcp_only
    choices: [keep, tcp_only, udp_and_tcp, default]
  transport_sides:
    description: Which transport policies to check (O(rdpfix.rdp.transport#module:sides)).
    type: list
    elements: str
    default: [server]
    choices: [server, client]
  tls_legacy_protocols:
    description: Deprecated protocols the fix run is asked to keep enabled (O(rdpfix.rdp.tls#module:legacy_protocols)).
    type: list
    elements: str
    default: []
    choices: ["TLS 1.0", "TLS 1.1"]
  tls_nla:
    description: The NLA setting wanted (O(rdpfix.rdp.tls#module:nla)).
    type: str
    default: enabled
    choices: [enabled, disabled, keep]
  tls_override_policy:
    description:
      - Whether the repair may write Group Policy values (O(rdpfix.rdp.tls#module:override_policy)). Without it, a
        setting enforced by policy is reported as such and its fix names the option.
    type: bool
    default: false
  connect_name:
    description:
      - The name users type into their RDP client. When given, the controller resolves it and reports when it does not
        resolve, resolves to another address than the one Ansible reaches the host at, is an alias rather than the
        host's own name, or is not in the listener certificate's names.
      - Omitted, no name checks are made.
    type: str
extends_documentation_fragment:
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
attributes:
  check_mode:
    support: full
    description: The module never changes anything; check mode runs the same reads.
  diff_mode:
    support: none
  facts:
    support: full
    description: Sets the host fact C(rdpfix_rdp) (RV(ansible_facts.rdpfix_rdp)), as a facts module does.
  platform:
    platforms: windows
notes:
  - Runs as an action plugin on the controller and talks to the host through its connection (C(winrm) or C(psrp)),
    sending one small PowerShell agent; nothing is copied to the host. One WinRM command per host; a second only on a
    host whose ProgramData folder is not C(C:\ProgramData) (the MachineKeys folder is read again where it really is).
  - The Security log (event 4625) needs an account allowed to read it; when it cannot be read the other logs are still
    reported and C(events.unavailable) in RV(rdp) says why.
  - Write the fleet report from the registered results with M(rdpfix.rdp.fleet_report); C(playbooks/audit_rdp.yml)
    does both.
seealso:
  - module: rdpfix.rdp.fleet_report
  - module: rdpfix.rdp.handshake
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Audit Remote Desktop (read-only)
  rdpfix.rdp.facts:
  register: rdp_facts

- name: Same standard as a fix run that keeps TLS 1.0 for old clients and allows RDP on Domain only
  rdpfix.rdp.facts:
    firewall_profiles: [Domain]
    tls_legacy_protocols: ["TLS 1.0"]
    event_days: 30
    connect_name: "{{ inventory_hostname }}"
  register: rdp_facts

- name: Fail when a host cannot accept RDP now
  ansible.builtin.assert:
    that: rdp_facts.counts.critical == 0
    fail_msg: "{{ rdp_facts.findings | selectattr('severity', 'equalto', 'critical') | map(attribute='title') | list }}"
"""

RETURN = r"""
snapshot:
  description:
    - Every read of the fixing modules as this batch returned it (not the event log history), with the host it was
      taken on - what M(rdpfix.rdp.server) and the fixing modules' O(rdpfix.rdp.firewall#module:snapshot) option plan
      from instead of reading the host again. Plain data in a versioned format (C(format), C(host), C(taken),
      C(reads)); a module refuses a snapshot of another host or format.
  returned: success
  type: dict
  version_added: 0.2.0
findings:
  description:
    - What is wrong or worth knowing, most urgent first, in the shape of the collection's findings documentation.
    - Each has C(id) (stable, C(<concern>.<what>)), C(severity) (C(critical), C(warning), C(security), C(info)),
      C(title), C(cause) (the cause family), C(likely_cause) (text, when known), C(evidence) (values and events seen)
      and C(fix) (C(module), C(options), C(description)) or null.
  returned: success
  type: list
  elements: dict
  sample:
    - id: certificate.self_signed_expired
      severity: critical
      title: The self-signed certificate 6A8A... (CN=APP02, expires 2026-11-15T00:00:00Z) expired 10 day(s) ago
      cause: certificate
      likely_cause: Windows did not renew its self-signed certificate ...
      evidence: {source: self_signed, thumbprint: 6A8A..., not_after: "2026-11-15T00:00:00Z"}
      fix:
        module: rdpfix.rdp.certificate
        options: {}
        description: remove the self-signed certificate ... ; restart SessionEnv
status:
  description: C(critical) when a finding is critical, C(warning) when one is a warning or a security finding, else C(ok).
  returned: success
  type: str
counts:
  description: Number of findings per severity.
  returned: success
  type: dict
fixed_by:
  description: The modules whose run (with the options given here) would change something on this host.
  returned: success
  type: list
  elements: str
gathered_at:
  description: When the host was read (ISO 8601 UTC).
  returned: success
  type: str
address:
  description: The address Ansible reaches the host at.
  returned: success
  type: str
rdp:
  description:
    - The facts read, by concern. C(system), C(listener) (Win32_TSGeneralSetting), C(remote_desktop) (connections
      allowed, port), C(certificate) (the listener's certificate and where it comes from), C(services), C(sessions),
      C(machinekeys) (folder and RDP key files), C(firewall) (rules that allow or block RDP, profiles, security
      products), C(transport) (the policy values), C(tls) (protocols, cipher suites, SecurityLayer, NLA) and
      C(events) (C(since), C(count), C(by_id), C(entries), C(unavailable)).
    - Also set as the host fact C(rdpfix_rdp), with the findings (RV(ansible_facts.rdpfix_rdp)).
  returned: success
  type: dict
ansible_facts:
  description: Host facts set by the module; later tasks and templates read them as C(rdpfix_rdp) or C(ansible_facts.rdpfix_rdp).
  returned: success
  type: dict
  contains:
    rdpfix_rdp:
      description:
        - Everything in RV(rdp), plus C(findings) (the same list as RV(findings)), so that what was read stays with the
          host for the rest of the play (and in a fact cache, when one is configured).
      returned: success
      type: dict
      sample: {"system": {"hostname": "WEB01"}, "certificate": {"source": "self_signed"}, "findings": []}
round_trips:
  description: WinRM commands the task sent (1).
  returned: always
  type: int
"""
