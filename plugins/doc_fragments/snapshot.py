# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The snapshot option of the fixing modules: plan from a read made earlier in the play."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  snapshot:
    description:
      - Plan from this snapshot of the host instead of reading it again - the registered result of M(rdpfix.rdp.facts)
        for the same host (or the result of a module that was given a snapshot, which returns it updated, or either's
        C(snapshot) value). Give M(rdpfix.rdp.facts) the same options as this module, so that it reads what this
        module reads; anything missing from the snapshot is read from the host in one batch.
      - Check mode, and a run that finds nothing to change, then send nothing to the host.
      - A run that changes something starts its one apply batch with guards comparing what the plan took from the
        snapshot (registry values, certificates and thumbprints, key and folder ACLs, firewall rules, service states)
        with the host as it is at the write. When the host changed since the snapshot (a value that appeared since,
        such as one Group Policy created, counts as a change), the batch stops before its first write; the module
        reads the host again, plans anew once, says so in RV(replanned) and a warning, and fails without changing
        anything when the host changed again.
      - A snapshot taken on another host, or in a format of another version of the collection, is refused before
        anything is sent.
      - Without it the module reads the host itself, as it always has.
    type: raw
"""
