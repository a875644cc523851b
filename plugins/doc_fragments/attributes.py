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
