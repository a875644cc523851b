# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/certificate.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: certificate
short_description: Check and repair the certificate the Remote Desktop listener uses
version_added: 0.1.0
description:
  - Finds the certificate the RDP listener (C(RDP-Tcp)) presents to new connections and where it comes from
    (the Windows self-signed certificate, a thumbprint pinned by an administrator, or a Group Policy template).
    Reports it (thumbprint, subject, SANs, issuer, expiry, days left, EKUs, private key state) with findings.
  - An expired, soon-expiring (O(expiry_threshold_days)), missing or keyless self-signed certificate is
    regenerated the way Microsoft documents it, by removing it from C(LocalMachine\Remote Desktop) and restarting
    O(restart_service), after which Windows creates a new one. The old certificate and its private key file are backed
    up first, then the new certificate is verified.
  - A pinned thumbprint (registry value C(SSLCertificateSHA1Hash)) that names a missing certificate is removed (backed
    up first) so the listener uses its self-signed certificate, except on an RD Connection Broker, where it is never
    removed.
  - A pinned certificate that is expired, expiring, lacks the Server Authentication EKU or has no usable private key
    is reported; it is replaced only when O(replacement_thumbprint) names a certificate in C(LocalMachine\My) that
    passes the same checks. An expired, missing, wrong-EKU or keyless pin is one the listener falls back from (RCM
    events 1053, 1051, 1054, 1055, "The default certificate will be used ... from now on"), so the self-signed
    certificate behind it is checked and repaired as if nothing were pinned.
  - A restart of C(TermService) that would disconnect RDP sessions is not done unless O(allow_session_disruption=true);
    the module then changes nothing that depends on it, returns RV(restart_pending=true) with C(changed=false) and a
    warning (the task does not fail, so an audit run over a fleet continues).
  - "Round trips (WinRM commands): a compliant host costs exactly 1. A host that needs a change costs 2: the read, then
    one batch that backs up, changes, restarts, waits 3 seconds and re-reads. If the new certificate is not visible
    yet, up to 2 more read-only polls (5 seconds apart) follow, so never more than 4."
author:
  - rdpfix maintainers (@rdpfix)
extends_documentation_fragment:
  - rdpfix.rdp.common
  - rdpfix.rdp.snapshot
  - rdpfix.rdp.session_disruption
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
options:
  expiry_threshold_days:
    description:
      - A certificate with this many days left or fewer counts as expiring. The self-signed certificate is then
        regenerated; a pinned one is reported (and replaced if O(replacement_thumbprint) is set).
      - Between 0 and 3650.
    type: int
    default: 30
  regenerate_self_signed:
    description:
      - Regenerate a self-signed certificate that is expired, expiring, missing or has lost its private key.
      - With V(false) such problems are only reported.
    type: bool
    default: true
  remove_missing_pin:
    description:
      - Remove the pinned thumbprint (registry value C(SSLCertificateSHA1Hash)) when it names a certificate that is not
        in C(LocalMachine\My), as Microsoft advises, so the listener uses its self-signed certificate.
      - Never done on an RD Connection Broker, whatever this option says.
    type: bool
    default: true
  replacement_thumbprint:
    description:
      - Thumbprint (SHA-1, 40 hex characters; spaces, colons and the invisible marks Windows' certificate dialog adds are
        ignored) of a certificate in C(LocalMachine\My) to pin when the pinned one is unusable (see O(replace_when)).
      - The certificate must be valid for more than O(expiry_threshold_days), carry the Server Authentication or
        Remote Desktop Authentication EKU (or no EKU restriction), and have a private key NETWORK SERVICE can read;
        otherwise the task fails before anything is changed. A name that does not match the host gives a warning.
    type: str
  replace_when:
    description:
      - V(unusable) pins O(replacement_thumbprint) only when the pinned certificate is missing, expired, expiring,
        not yet valid, lacks the EKU or has no usable private key.
      - V(always) pins it whenever it is not already the pinned certificate, also on a host that uses its self-signed
        certificate (for example to start using a CA-issued certificate the module reported as available).
    type: str
    choices: [unusable, always]
    default: unusable
  restart_service:
    description:
      - The service restarted to make Windows regenerate the self-signed certificate or forget a removed pin.
      - V(SessionEnv) (Remote Desktop Configuration) keeps RDP sessions. V(TermService) (Remote Desktop Services, with
        its dependent C(UmRdpService)) disconnects every session, so it needs O(allow_session_disruption=true) when
        sessions are active or disconnected.
      - A stopped O(restart_service) is started by the restart.
    type: str
    choices: [SessionEnv, TermService]
    default: SessionEnv
  start_stopped_services:
    description:
      - Regeneration needs C(CertPropSvc), C(KeyIso), C(CryptSvc) and C(SessionEnv) running. When one is stopped,
        V(false) reports it as the reason regeneration cannot work and changes nothing; V(true) starts it first.
      - A disabled or missing service is always only reported.
    type: bool
    default: false
  terminal_name:
    description:
      - The listener (WinStation) to check.
    type: str
    default: RDP-Tcp
  repin_renewal:
    description:
      - When the pinned certificate is expired or expiring, the module looks in C(LocalMachine\My) for its renewal
        (same subject, Server Authentication, valid now and longer than the pinned one; what auto-enrollment leaves
        there, unpinned) and always reports it (C(certificate.pinned_renewal_available)) with what blocks using it.
      - With V(true) it pins the renewal. If NETWORK SERVICE cannot read the renewal's private key, it first adds a
        NETWORK SERVICE read entry to that one key file's ACL (the file is saved with its ACL first, so
        M(rdpfix.rdp.restore) puts both back); no other key file is touched.
      - If the renewal cannot be used even so (no private key on the host, a deny entry, an unreadable ACL) the task
        fails before anything is changed, in check mode too. O(replacement_thumbprint), when it applies, wins.
      - With V(false) (the default) the renewal is only reported.
    type: bool
    default: false
seealso:
  - name: Remote Desktop listener certificate configurations
    description: Microsoft's description of how the listener picks its certificate.
    link: https://learn.microsoft.com/troubleshoot/windows-server/remote/remote-desktop-listener-certificate-configurations
  - name: An internal error has occurred (Remote Desktop)
    description: Microsoft's troubleshooting, including the pinned thumbprint and the RD Connection Broker exception.
    link: https://learn.microsoft.com/troubleshoot/windows-server/remote/internal-error-has-occurred-connecting-remote-machine
notes:
  - The private key permissions of a certificate are repaired by the machinekeys module, not by this one, since Windows does
    not regenerate a valid self-signed certificate whose key is unreadable.
  - A certificate from a Group Policy template is only reported; autoenrollment renews it.
  - In check mode RV(certificate) is the certificate in use now and RV(after) the predicted state.
"""

EXAMPLES = r"""
- name: Audit the RDP listener certificate (changes nothing)
  rdpfix.rdp.certificate:
  check_mode: true
  register: rdp_cert

- name: Fail the hosts whose listener certificate has an unresolved problem
  ansible.builtin.assert:
    that: rdp_cert.compliant
    fail_msg: "{{ rdp_cert.findings | map(attribute='title') | join('; ') }}"

- name: Regenerate an expired or soon-expiring self-signed certificate (sessions are kept)
  rdpfix.rdp.certificate:
    expiry_threshold_days: 45

- name: Regenerate through a TermService restart, accepting that RDP sessions are disconnected
  rdpfix.rdp.certificate:
    restart_service: TermService
    allow_session_disruption: true

- name: Replace an unusable pinned certificate with a CA-issued one from LocalMachine\My
  rdpfix.rdp.certificate:
    replacement_thumbprint: 3F2A9C01B7D4E5F60718293A4B5C6D7E8F901234

- name: Start using a CA-issued certificate instead of the self-signed one
  rdpfix.rdp.certificate:
    replacement_thumbprint: "{{ rdp_ca_thumbprint }}"
    replace_when: always
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
changed:
  description: Whether the host was changed (in check mode, whether it would be).
  returned: always
  type: bool
compliant:
  description:
    - True when, at the end of the run, no finding of severity C(critical) or C(warning) remains and nothing is
      pending.
      In check mode it describes the host as it is.
  returned: always
  type: bool
certificate:
  description:
    - The certificate the listener uses at the end of the run (in check mode, now), with where it comes from.
  returned: always
  type: dict
  contains:
    source:
      description: V(self_signed), V(pinned), V(gpo_template) or V(none).
      type: str
      sample: self_signed
    store:
      description: The LocalMachine store holding it.
      type: str
      sample: Remote Desktop
    thumbprint:
      description: SHA-1 thumbprint, upper-case hex.
      type: str
      sample: 9A3B5C7D9E1F2A3B4C5D6E7F8091A2B3C4D5E6F7
    subject:
      description: Subject distinguished name.
      type: str
      sample: CN=web01.corp.example
    sans:
      description: DNS names and IP addresses of the Subject Alternative Name extension.
      type: list
      elements: str
    issuer:
      description: Issuer distinguished name.
      type: str
    self_signed:
      description: Whether the certificate is signed by its own key.
      type: bool
    not_after:
      description: End of validity, ISO 8601 UTC.
      type: str
      sample: "2026-05-25T10:00:00Z"
    days_left:
      description: Whole days until expiry, negative when expired.
      type: int
      sample: 182
    expired:
      description: Whether it has expired.
      type: bool
    eku:
      description: Extended Key Usage OIDs (empty when the extension is absent).
      type: list
      elements: str
    server_auth:
      description:
        - Whether it may serve the listener - Server Authentication or Remote Desktop Authentication EKU, or no EKU
          extension at all (RFC 5280, no restriction).
      type: bool
    key_type:
      description: V(RSA), V(EC), ...
      type: str
    key_size:
      description: Key size in bits.
      type: int
    has_private_key:
      description: Whether the store links a private key to it.
      type: bool
    key_state:
      description: >-
        V(readable) (NETWORK SERVICE can read the key file), V(unreadable), V(missing), V(inaccessible) (the key
        exists, but the account rdpfix runs as can read neither it nor its ACL: see the token in
        C(rdpfix.rdp.selftest)) or V(unknown).
      type: str
    key_readable:
      description: V(true)/V(false) from RV(certificate.key_state), null when unknown.
      type: bool
    pinned_thumbprint:
      description: The thumbprint pinned in the registry, or null.
      type: str
    listener_thumbprint:
      description: The thumbprint Win32_TSGeneralSetting reports.
      type: str
    listener_hash_type:
      description: Win32_TSGeneralSetting SSLCertificateSHA1HashType (1 self-signed, 2 GPO template, 3 custom).
      type: int
before:
  description: The listener's certificate, the pin and the self-signed store before the run.
  returned: always
  type: dict
  sample:
    source: self_signed
    thumbprint: 1B2C3D4E5F60718293A4B5C6D7E8F9012345678A
    subject: CN=web01
    not_after: "2025-11-15T10:00:00Z"
    pinned_thumbprint: null
    self_signed_store: ["1B2C...678A (CN=web01, expires 2025-11-15T10:00:00Z)"]
after:
  description: The same view after the run (verified on the host), or predicted in check mode.
  returned: always
  type: dict
diff:
  description: RV(before) and RV(after), shown by C(--diff).
  returned: when diff mode is on
  type: dict
actions:
  description:
    - What was done (C(status=done)), would be done in check mode (C(planned)), or waits for a permitted restart
      (C(pending)).
  returned: always
  type: list
  elements: dict
  sample:
    - {action: remove_certificate, status: done, store: Remote Desktop, thumbprint: 1B2C3D4E5F60718293A4B5C6D7E8F9012345678A,
       description: "remove the self-signed certificate ... from LocalMachine\\Remote Desktop"}
    - {action: restart_service, status: done, service: SessionEnv, description: restart SessionEnv}
findings:
  description: Problems and observations found on the host before any change.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: >-
        Stable identifier, such as C(certificate.self_signed_expired), C(certificate.self_signed_expiring),
        C(certificate.self_signed_missing), C(certificate.self_signed_no_private_key),
        C(certificate.self_signed_key_unreadable), C(certificate.pinned_missing), C(certificate.pinned_expired),
        C(certificate.pinned_wrong_eku), C(certificate.pinned_no_private_key), C(certificate.connection_broker_pin),
        C(certificate.regeneration_blocked), C(certificate.restart_pending), C(certificate.ca_certificate_available),
        C(certificate.read_failed).
      type: str
    severity:
      description: >-
        V(critical) (the self-signed certificate cannot be used: RDP fails now), V(warning) (expiring, or a pinned or
        template certificate that cannot be used), V(security) or V(info).
      type: str
    title:
      description: What was found, in words.
      type: str
    cause:
      description: The cause family, V(certificate).
      type: str
    evidence:
      description: The listener's certificate as seen (source, thumbprint, subject, expiry, key state, pin).
      type: dict
    fix:
      description: >-
        C(module), C(options) and C(description) of the change this run makes (in check mode: would make) that repairs
        the finding, or null.
      type: dict
remaining_findings:
  description: The findings of the state re-read after the changes (empty when everything was fixed).
  returned: when changes were made
  type: list
  elements: dict
backup:
  description: The backup of what was changed, or null when nothing was.
  returned: always
  type: dict
  contains:
    manifest_id:
      description: Identifier of the backup (timestamp, module, random suffix).
      type: str
      sample: 20261125T103000Z-certificate-1a2b
    path:
      description: Folder on the host holding the saved items and C(manifest.json).
      type: str
      sample: C:\ProgramData\rdpfix\backups\20261125T103000Z-certificate-1a2b
    items:
      description:
        - What was saved, for example C(certificate) (DER), C(private_key_file) (copy of the key file, with its ACL
          C(sddl) and C(owner) as read) and C(registry_value) (previous content, kept in the manifest).
        - Each item the run carries out (a certificate removed, a key file's ACL replaced, the pin changed) has a
          C(status), C(done), C(failed) (its operation failed, so it did not happen) or C(not_run) (the run stopped
          before it). The manifest on the host says C(planned) until the run has made every change, then C(done);
          after a failed change, each item's status.
      type: list
      elements: dict
restart_pending:
  description: >-
    True when a fix needs a restart that would disconnect RDP sessions and O(allow_session_disruption) is false.
  returned: always
  type: bool
round_trips:
  description: Number of WinRM commands the task used.
  returned: always
  type: int
  sample: 1
"""
