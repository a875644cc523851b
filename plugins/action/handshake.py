# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.handshake. Documented in modules/handshake.py.

The probe needs nothing from the host it runs on but a network stack, and it normally runs on the controller
(``delegate_to: localhost``). There, this plugin runs it in the controller's own process - the same code, options and
result as the module - instead of starting a Python interpreter for the module on every host (a few hundred
milliseconds of controller CPU per host, most of the cost of the role's final verification). Anywhere else (delegated
to another host, a connection that is not local) the module runs there as any module does.
"""

from __future__ import annotations

import typing as t

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_probe
from ansible_collections.rdpfix.rdp.plugins.module_utils._handshake import ARGUMENT_SPEC, outcome

MODULE = "rdpfix.rdp.handshake"
# Connection plugins that run on the controller itself.
LOCAL_CONNECTIONS = frozenset({"local", "ansible.builtin.local", "ansible.legacy.local"})


class ActionModule(ActionBase):  # type: ignore[misc]  # ansible-core ships no type information
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def on_controller(self) -> bool:
        names = {
            str(getattr(self._connection, "transport", "") or ""),
            str(getattr(self._connection, "_load_name", "") or ""),
            str(getattr(self._connection, "ansible_name", "") or ""),
        }
        return bool(names & LOCAL_CONNECTIONS)

    def run(self, tmp: str | None = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        del tmp
        task_vars = task_vars or {}
        if not self.on_controller() or self._task.async_val:
            return t.cast(
                dict[str, t.Any],
                self._execute_module(module_name=MODULE, module_args=self._task.args, task_vars=task_vars),
            )
        try:
            _validation, params = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        except AnsibleActionFail as exc:
            return {"failed": True, "changed": False, "msg": exc.message}
        failed, result = outcome(params, _rdp_probe.run_probe)
        if failed:
            result["failed"] = True
        return result
