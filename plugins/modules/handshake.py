#!/usr/bin/python
# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: handshake
short_description: Connect to a host's RDP port the way mstsc does and report what it met
version_added: 0.1.0
description:
  - Speaks the start of the Remote Desktop Protocol to O(host):O(port) and reports, with evidence, why a client would
    or would not connect. It is the outside proof that a fix worked, and it works on hosts Ansible cannot manage,
    since it needs nothing but the RDP port.
  - "It reports: TCP reachability with timing; the X.224 negotiation for each security layer (native RDP, TLS, CredSSP
    (NLA), CredSSP with early user authorization, RDSTLS), one fresh connection per trial, with any negotiation failure
    code by name; the TLS versions the server accepts (one trial each), the negotiated cipher and the certificate it
    presents (subject, SANs, issuer, self-signed, validity, key, SHA-1 thumbprint); whether CredSSP answers an NTLM
    NEGOTIATE, and the server's NetBIOS and DNS names, OS version and clock skew from the NTLM CHALLENGE; a name check
    (the name clients use against the server's own names, the certificate and DNS); and whether UDP answers an RDP-UDP
    SYN."
  - "It ends with findings in the collection's shared shape, each tied to what a client would see: the socket closed
    during setup (C(0x904) / extended C(0x7)), another hard failure, an NLA error, or only a prompt."
  - No credentials are ever sent. The NTLM exchange stops at the server's CHALLENGE, so no account can be locked out.
  - The module runs where it is delegated (normally the controller, C(delegate_to=localhost)); it changes nothing,
    so check mode runs the same probe. On the controller (a C(local) connection) its action plugin runs the probe in
    Ansible's own process, with the same options and result, instead of starting a Python interpreter for the module
    on every host.
  - The protocol code is the collection's own (no third-party RDP library). The certificate summary needs the Python
    library C(cryptography) where the module runs; without it the certificate is reported by thumbprint only.
author:
  - rdpfix maintainers (@rdpfix)
options:
  host:
    description:
      - Host name or IP address to connect to, as the client would. Usually the host's C(ansible_host), or its inventory name without it (what the role passes).
      - When it resolves to several addresses, the first that accepts TCP is probed, and every trial uses that address.
    type: str
    required: true
  port:
    description: TCP port of the RDP listener.
    type: int
    default: 3389
  server_name:
    description:
      - The name users type into their client, compared with the server's own names, its certificate's names and DNS.
      - Also sent as TLS SNI (unless it is an IP address). Defaults to O(host).
    type: str
  checks:
    description:
      - Which checks to run. C(tcp) always runs. C(tls) and C(credssp) imply C(negotiation), which tells them which
        request makes the server select TLS.
    type: list
    elements: str
    choices: [tcp, negotiation, tls, credssp, names, udp]
    default: [tcp, negotiation, tls, credssp, names, udp]
  protocols:
    description: Which X.224 negotiation trials to run, one connection each.
    type: list
    elements: str
    choices: [rdp, tls, credssp, credssp_early_user_auth, rdstls]
    default: [rdp, tls, credssp, credssp_early_user_auth, rdstls]
  tls_versions:
    description: Which TLS versions to try, one connection each.
    type: list
    elements: str
    choices: [TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3]
    default: [TLSv1.0, TLSv1.1, TLSv1.2, TLSv1.3]
  connect_timeout:
    description: Seconds to wait for each TCP connection (more than 0, at most 300).
    type: float
    default: 5.0
  read_timeout:
    description: Seconds to wait for each answer from the server (more than 0, at most 300).
    type: float
    default: 5.0
  udp_port:
    description: UDP port for the RDP-UDP check. Defaults to O(port).
    type: int
  udp_timeout:
    description:
      - Seconds to wait for an answer to the RDP-UDP SYN. Silence is reported as ambiguous, never as closed.
    type: float
    default: 2.0
  expected_thumbprint:
    description:
      - SHA-1 thumbprint of the certificate the listener should present (for example the one M(rdpfix.rdp.certificate)
        reports as configured). Spaces, colons and invisible marks are ignored.
      - A different certificate on the wire raises the finding C(handshake.certificate_thumbprint_mismatch).
    type: str
  cert_warn_days:
    description: A certificate with fewer days left than this raises C(handshake.certificate_expiring).
    type: int
    default: 30
  max_clock_skew:
    description: Seconds of clock difference (from the NTLM CHALLENGE) beyond which C(handshake.clock_skew) is raised.
    type: float
    default: 300
  cookie:
    description:
      - "User name to put in the X.224 routing cookie (C(Cookie: mstshash=...)), as mstsc does. Some load balancers
        route on it. Not a credential. Omitted by default."
    type: str
  fail_on:
    description:
      - V(never) returns the report whatever it says (for audits and fleet reports).
      - V(critical) fails the task when a client could not connect (any C(critical) finding, or the port unreachable).
      - V(warning) also fails on C(warning) findings.
    type: str
    choices: [never, critical, warning]
    default: never
extends_documentation_fragment:
  - rdpfix.rdp.attributes
attributes:
  check_mode:
    support: full
    description: The module only reads; check mode runs the same probe.
  diff_mode:
    support: none
  platform:
    platforms: posix
    details: Runs where the task runs, usually the controller (C(delegate_to=localhost)); it only opens outgoing connections.
notes:
  - Loopback and private addresses work like any other; the module opens only outgoing connections.
  - Native RDP security (no TLS) is reported but not explored further; its RC4 encryption levels are not enumerated.
  - RDP-UDP is normally requested by the server only after logon, so a server that ignores a SYN before a session
    exists is indistinguishable from a filtered port; the module says so instead of guessing.
seealso:
  - module: rdpfix.rdp.certificate
  - name: "[MS-RDPBCGR] 2.2.1.1 and 2.2.1.2: X.224 connection request and confirm"
    description: The negotiation this module performs.
    link: https://learn.microsoft.com/openspecs/windows_protocols/ms-rdpbcgr/
"""

EXAMPLES = r"""
- name: Prove each server accepts RDP connections (from the controller)
  rdpfix.rdp.handshake:
    host: "{{ ansible_host | default(inventory_hostname) }}"
    server_name: "{{ inventory_hostname }}"
  delegate_to: localhost
  register: rdp_probe

- name: Fail the play when a client could not connect
  rdpfix.rdp.handshake:
    host: rdp01.example.com
    fail_on: critical
  delegate_to: localhost

- name: Check that the listener presents the certificate that was configured
  rdpfix.rdp.handshake:
    host: "{{ ansible_host }}"
    expected_thumbprint: "{{ cert_result.certificate.thumbprint }}"
    checks: [tcp, negotiation, tls]
  delegate_to: localhost

- name: Quick reachability check on a moved listener port, TLS 1.2 and 1.3 only
  rdpfix.rdp.handshake:
    host: 10.0.0.12
    port: 3390
    tls_versions: [TLSv1.2, TLSv1.3]
    udp_port: 3390
    read_timeout: 2
  delegate_to: localhost
"""

RETURN = r"""
verdict:
  description:
    - C(connects), C(connects_with_prompt) (a certificate or identity prompt), C(connects_with_warnings),
      C(fails) (a critical finding), C(unreachable) (no TCP connection) or C(unknown) (only TCP was checked, or the
      probe could not assess its results).
  returned: always
  type: str
  sample: fails
connectable:
  description: Whether a client could complete the connection setup; null when not determined.
  returned: always
  type: bool
  sample: false
summary:
  description: One or two sentences for humans, with the most important findings.
  returned: always
  type: str
  sample: "A client cannot complete the RDP connection setup. The server selects TLS in negotiation, then closes the connection during every TLS handshake."
findings:
  description:
    - Findings in the collection's shared shape (C(id), C(severity), C(title), C(cause), C(evidence), C(fix)), plus
      C(effect) (C(0x904/0x7), C(cannot_connect), C(nla_error), C(prompt), C(wrong_host), C(security), C(none)) and
      C(explanation). Ids start with C(handshake.).
  returned: always
  type: list
  elements: dict
  sample:
    - id: handshake.tls_closed
      severity: critical
      title: the server selects TLS in negotiation, then closes the connection during every TLS handshake
      cause: certificate
      effect: 0x904/0x7
      explanation: "the listener cannot build its TLS credential: ..."
      evidence: {"TLSv1.2": {"status": "reset", "detail": "connection reset by the server"}}
      fix: {"module": null, "options": {}, "description": "Repair the listener certificate ..."}
target:
  description: The probed C(host) and C(port), C(server_name) (the name compared) and C(address) (the IP used).
  returned: always
  type: dict
  sample: {"host": "rdp01.example.com", "port": 3389, "server_name": "rdp01.example.com", "address": "10.0.0.12"}
checks:
  description: The checks that ran.
  returned: always
  type: list
  elements: str
tcp:
  description:
    - C(status) is C(open), C(refused), C(timeout), C(unreachable), C(unresolved) or C(error); with C(address),
      C(elapsed_ms) and C(detail). C(attempts) lists every address tried when there were several.
  returned: always
  type: dict
  sample: {"status": "open", "address": "10.0.0.12", "port": 3389, "elapsed_ms": 12.4, "total_elapsed_ms": 12.5}
negotiation:
  description:
    - One entry per trial in C(trials); C(status) is C(accepted) (the server selected the protocol asked for),
      C(selected_other) (it answered with another protocol - xrdp does this for CredSSP), C(negotiation_failure)
      (with C(failure_code) and C(failure_name), for example C(HYBRID_REQUIRED_BY_SERVER)), or how the connection
      failed (C(closed), C(reset), C(timeout), C(invalid), C(refused), C(error)) with C(detail).
    - C(accepted) lists the accepted trials; C(nla_required) is true when a TLS-only request was refused with
      C(HYBRID_REQUIRED_BY_SERVER) or C(SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER).
  returned: when the port was open and negotiation ran
  type: dict
tls:
  description:
    - C(status) C(probed) or C(skipped) (no TLS-based layer accepted). C(carrier) is the trial whose request was used.
    - C(versions) maps TLSv1.0 .. TLSv1.3 to C(accepted) (with C(cipher)) or a failure (C(tls_alert), C(closed),
      C(reset), C(timeout), C(untested) when this machine's OpenSSL cannot offer the version).
    - C(negotiated) is the newest accepted version and its cipher; C(certificate) is the presented certificate
      (C(thumbprint), C(sha256), C(subject), C(common_name), C(sans), C(issuer), C(self_signed), C(not_before),
      C(not_after), C(days_left), C(expired), C(eku), C(server_auth), C(key_type), C(key_size)).
  returned: when the port was open and the tls check ran
  type: dict
credssp:
  description:
    - C(status) C(challenge) when CredSSP answered an NTLM NEGOTIATE, C(skipped) when the server did not select
      CredSSP, or how it failed. C(ntlm) holds C(netbios_computer), C(netbios_domain), C(dns_computer), C(dns_domain),
      C(dns_tree), C(os_version), C(os_build), C(os_name), C(server_time) and C(clock_skew_seconds) (positive when the
      server's clock is ahead).
  returned: when the port was open and the credssp check ran
  type: dict
names:
  description:
    - The name check. C(connect_name) against C(server_dns_name) / C(server_netbios_name) (from NTLM),
      C(certificate_names), and DNS (C(connect_name_resolves_to), C(server_dns_name_resolves_to)); booleans
      C(matches_server_name), C(certificate_matches_connect_name), C(connect_name_reaches_probed_address) and
      C(server_dns_name_reaches_probed_address) are null when not determinable.
  returned: when the names check ran
  type: dict
udp:
  description:
    - C(status) C(answered) (a SYN+ACK acknowledging our SYN), C(refused) (ICMP port unreachable), C(no_answer)
      (ambiguous), C(answered_unexpected) or C(error).
  returned: when the port was open and the udp check ran
  type: dict
elapsed_ms:
  description: Wall time of the whole probe in milliseconds (for information; never compared).
  returned: always
  type: float
"""

# Ansible's module layout puts the documentation first, so the imports follow it.
from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.rdpfix.rdp.plugins.module_utils._handshake import ARGUMENT_SPEC, outcome  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import run_probe  # noqa: E402


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    # Bad input is refused before any packet leaves the controller (outcome validates first).
    failed, result = outcome(module.params, run_probe)
    if failed:
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
