# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options shared by every rdpfix.rdp module that changes a Windows host (the ``rdpfix.rdp.backup`` action group)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  backup_root:
    description:
      - Folder on the target under which each run that changes something creates its backup folder,
        named after the manifest id (for example C(20261125T103000Z-certificate-1a2b)), holding the saved items and
        C(manifest.json).
      - Defaults to C(%ProgramData%\rdpfix\backups). The folder is created readable by SYSTEM and Administrators only,
        since backups can hold private keys.
    type: str
attributes:
  check_mode:
    support: full
    description: Check mode reads the host and reports what would change; it writes nothing.
  diff_mode:
    support: full
    description: Returns the state before and after (predicted in check mode).
  platform:
    platforms: windows
notes:
  - Runs as an action plugin on the controller and talks to the host through its connection (C(winrm) or C(psrp)),
    sending one small PowerShell agent per round trip; nothing is copied to the host.
  - Everything changed is backed up first on the host and listed in the returned RV(backup) manifest.
  - Every batch that changes the host holds the host's run lock (the file C(%ProgramData%\rdpfix\run.lock)) while it
    runs; a second run on the same host waits up to 30 seconds, then fails naming the run that holds it and changes
    nothing. A lock left by a run that was cut or crashed is taken over at once, with a warning.
  - The folder C(%ProgramData%\rdpfix) is kept writable by SYSTEM and Administrators only, so that no standard user
    can create the lock file and block every run; a folder an earlier version left open to other users is given that
    protected ACL, with a warning naming who could write there and its previous ACL.
"""
