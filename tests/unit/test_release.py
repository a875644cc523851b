"""What a release promises, checked against the files that make it: documented options are the options the action
plugins take, the action group is the modules that take ``backup_root``, the roles' variables are documented where
users look, and the declared requirements match what is tested."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def argument_spec(module: str) -> dict[str, t.Any]:
    action = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.action.{module}")
    return t.cast(dict[str, t.Any], getattr(action.ActionModule, "ARGUMENT_SPEC", {}))


# The action plugins built on the collection's action base, which validate their options against ARGUMENT_SPEC.
ACTION_MODULES = sorted(
    p.stem for p in (ROOT / "plugins" / "action").glob("*.py") if not p.stem.startswith("_") and argument_spec(p.stem)
)


def ansible_doc(*names: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".cache" / "collections"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [str(BIN / "ansible-doc"), "--json", *names], capture_output=True, text=True, check=check, env=env, timeout=300
    )


@functools.cache
def module_docs() -> dict[str, t.Any]:
    """Every action module's documentation as ansible-doc renders it, from one ansible-doc run ({} if one fails)."""
    proc = ansible_doc(*(f"rdpfix.rdp.{module}" for module in ACTION_MODULES), check=False)
    return t.cast(dict[str, t.Any], json.loads(proc.stdout)) if proc.returncode == 0 else {}


def documented_options(module: str) -> set[str]:
    name = f"rdpfix.rdp.{module}"
    # When one module's documentation cannot be rendered, each module is asked alone: the error names the culprit.
    doc = module_docs().get(name) or json.loads(ansible_doc(name).stdout)[name]
    return set(doc["doc"].get("options") or {})


@pytest.mark.parametrize("module", ACTION_MODULES)
def test_every_documented_option_is_taken_and_every_taken_option_documented(module: str) -> None:
    assert documented_options(module) == set(argument_spec(module))


def test_the_backup_action_group_is_exactly_the_modules_that_take_backup_root() -> None:
    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    taking = {module for module in ACTION_MODULES if "backup_root" in argument_spec(module)}
    assert set(runtime["action_groups"]["backup"]) == taking
    # A group is only useful for module_defaults when every member takes the options given to it: no catch-all group.
    assert set(runtime["action_groups"]) == {"backup"}


def test_session_disruption_is_an_option_only_where_a_step_can_end_sessions() -> None:
    taking = {module for module in ACTION_MODULES if "allow_session_disruption" in argument_spec(module)}
    assert taking == {"certificate", "machinekeys", "restore"}


@pytest.mark.parametrize("role", ["rdpfix_server", "rdpfix_client"])
def test_role_variables_are_prefixed_defaulted_and_documented(role: str) -> None:
    role_dir = ROOT / "roles" / role
    specs = yaml.safe_load((role_dir / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    defaults = yaml.safe_load((role_dir / "defaults" / "main.yml").read_text())
    readme = (role_dir / "README.md").read_text()
    for entry_point in specs.values():
        for name, option in entry_point["options"].items():
            assert name.startswith(f"{role}_")
            assert name in defaults, f"{name} has no default in defaults/main.yml"
            assert defaults[name] == option.get("default"), f"{name}: defaults/main.yml and argument_specs disagree"
            assert f"`{name}`" in readme, f"{name} is not in {role}/README.md"
    # Every default is a documented variable of some entry point.
    documented = {name for entry_point in specs.values() for name in entry_point["options"]}
    assert set(defaults) <= documented


def test_server_role_tasks_pass_backup_root_to_every_module_that_takes_it() -> None:
    takes = {f"rdpfix.rdp.{module}" for module in ACTION_MODULES if "backup_root" in argument_spec(module)}
    for path in (ROOT / "roles").glob("*/tasks/*.yml"):
        for task in yaml.safe_load(path.read_text()) or []:
            module = next((key for key in task if key.startswith("rdpfix.rdp.")), None)
            if module == "rdpfix.rdp.server":
                # Never its own backup_root (even omit would hide the backup group's module default from it): each
                # concern's options carry the role's variable, and the module fills in the default where that is unset.
                assert "backup_root" not in (task[module] or {}), f"{path.name}: {task['name']}"
            elif module in takes:
                assert "backup_root" in (task[module] or {}), f"{path.name}: {task['name']} does not pass backup_root"
    role_vars = yaml.safe_load((ROOT / "roles" / "rdpfix_server" / "vars" / "main.yml").read_text())
    # Every concern's options in one expression (each template is compiled anew for every host); each concern
    # passes the role's backup_root.
    options = role_vars["rdpfix_server_concern_options"]
    for concern in ("machinekeys", "certificate", "firewall", "transport", "tls"):
        block = options.split(f"'{concern}': ({{", 1)[1].split("}", 1)[0]
        assert "'backup_root': rdpfix_server_backup_root or none" in block, concern
    assert options.count("{{") == 1, "one template"


def test_the_templates_a_forked_worker_evaluates_on_every_host_use_no_jinja_test() -> None:
    # The first Jinja test a worker uses (`is defined`, select('in'), ...) loads Ansible's test plugins: some
    # milliseconds of controller CPU per host and task. The role's per-host tasks and the variables they use keep to
    # filters and the `in` operator.
    role_vars = yaml.safe_load((ROOT / "roles" / "rdpfix_server" / "vars" / "main.yml").read_text())
    main = yaml.safe_load((ROOT / "roles" / "rdpfix_server" / "tasks" / "main.yml").read_text())
    templates = [
        role_vars[name]
        for name in (
            "rdpfix_server_concerns",
            "rdpfix_server_concern_options",
            "rdpfix_server_verify_here",
            "rdpfix_server_reboot_args",
        )
    ]
    for task in main:
        templates.extend(str(task.get(key, "")) for key in ("when", "failed_when", "loop"))
        module = next(key for key in task if key.startswith(("rdpfix.rdp.", "ansible.builtin.")))
        if isinstance(task[module], dict):  # an import names its file
            templates.extend(str(value) for value in task[module].values())
    for template in templates:
        for test in (" is ", "select(", "reject(", "selectattr(", "rejectattr("):
            assert test not in template, f"{test.strip()} in {template}"


def test_each_concern_has_its_tag() -> None:
    main = yaml.safe_load((ROOT / "roles" / "rdpfix_server" / "tasks" / "main.yml").read_text())
    role_vars = yaml.safe_load((ROOT / "roles" / "rdpfix_server" / "vars" / "main.yml").read_text())
    by_module: dict[str, set[str]] = {}
    for task in main:
        module = next(key for key in task if key.startswith(("rdpfix.rdp.", "ansible.builtin.")))
        by_module.setdefault(module, set()).update(task.get("tags", []))
    concerns = ("machinekeys", "certificate", "firewall", "transport", "tls")
    # The read and the one apply batch (one task) run whenever any concern's tag is asked for; each concern is then
    # run only when its own tag is (rdpfix_server_concerns, from ansible_run_tags and ansible_skip_tags).
    assert set(concerns) <= by_module["rdpfix.rdp.server"]
    assert "ansible_run_tags" in role_vars["rdpfix_server_concerns"]
    assert "ansible_skip_tags" in role_vars["rdpfix_server_concerns"]
    # --skip-tags reboot leaves a needed reboot pending (the repair task reboots, rdpfix_server_reboot_args).
    assert "none if 'reboot' in ansible_skip_tags" in role_vars["rdpfix_server_reboot_args"]
    repair = next(task for task in main if "rdpfix.rdp.server" in task and "concerns" in task["rdpfix.rdp.server"])
    assert repair["rdpfix.rdp.server"]["reboot"] == "{{ rdpfix_server_reboot_args or omit }}"
    # The verification on its own runs only with --tags verify (never: dropped before any worker in other runs).
    verify = next(task for task in main if "ansible.builtin.import_tasks" in task)
    assert verify["ansible.builtin.import_tasks"] == "verify.yml" and set(verify["tags"]) == {"never", "verify"}
    # No include is left: a skipped include costs every host a task run.
    assert not any("ansible.builtin.include_tasks" in task for task in main)
    assert not (ROOT / "roles" / "rdpfix_server" / "tasks" / "after_repair.yml").exists()


def test_galaxy_metadata_declares_the_dependency_and_no_placeholder() -> None:
    galaxy_text = (ROOT / "galaxy.yml").read_text()
    galaxy = yaml.safe_load(galaxy_text)
    assert "ansible.windows" in galaxy["dependencies"]
    assert "example.invalid" not in galaxy_text and "example.com" not in galaxy_text
    assert galaxy["license"] == ["GPL-3.0-or-later"]
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text()


def test_ansible_lint_skips_no_rule_and_warns_only_while_there_is_no_repository() -> None:
    # The anchors (ansible.windows, microsoft.ad) skip no rule; the missing repository URL is reported on every run.
    config = yaml.safe_load((ROOT / ".ansible-lint").read_text())
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    assert config["profile"] == "production"
    assert not config.get("skip_list")
    assert (config.get("warn_list") or []) == ([] if galaxy.get("repository") else ["galaxy[no-repository]"])


def test_the_readmes_name_only_the_tested_controller_python() -> None:
    tested = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    for readme in ("README.md", "roles/rdpfix_server/README.md", "roles/rdpfix_client/README.md"):
        text = " ".join((ROOT / readme).read_text().split())
        assert f"ansible-core 2.19 on {tested}" in text, readme
        assert not re.search(r"ansible-core 2\.19 on Python [0-9.]+ or later", text), readme


def test_requires_ansible_covers_exactly_the_tested_ansible_core() -> None:
    from ansible.module_utils.compat.version import LooseVersion

    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    tested = re.search(r"^ansible-core==(\S+)$", (ROOT / "requirements" / "runtime.txt").read_text(), re.M)
    assert tested
    version = LooseVersion(tested.group(1))
    low, high = (part.strip() for part in runtime["requires_ansible"].split(","))
    assert low.startswith(">=") and version >= LooseVersion(low[2:])
    assert high.startswith("<") and version < LooseVersion(high[1:])
    # The declared range is one minor release: the one the tests run.
    assert LooseVersion(low[2:]).version[:2] == version.version[:2]


def test_ee_requirements_are_declared_where_ansible_builder_looks() -> None:
    ee = yaml.safe_load((ROOT / "meta" / "execution-environment.yml").read_text())
    python = (ROOT / ee["dependencies"]["python"]).read_text()
    pinned = (ROOT / "requirements" / "runtime.txt").read_text()
    for package in ("pywinrm", "cryptography"):
        assert re.search(rf"^{package}\b", python, re.M)
        tested = re.search(rf"^{package}==(\S+)$", pinned, re.M)
        assert tested, package
    assert (ROOT / ee["dependencies"]["system"]).read_text().strip()
    definition = (ROOT / "execution-environment.yml").read_text()
    assert "0.1.0" not in definition and ".tar.gz" not in definition


def test_no_module_claims_a_version_after_this_one() -> None:
    import ast

    from ansible.module_utils.compat.version import LooseVersion

    released = str(yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"])
    version = LooseVersion(released)
    # While changelog fragments wait for the next release, a new module may name that release (the next minor).
    if any(path.suffix in (".yml", ".yaml") for path in (ROOT / "changelogs" / "fragments").iterdir()):
        major, minor = (int(part) for part in released.split(".")[:2])
        version = LooseVersion(f"{major}.{minor + 1}.0")
    for path in sorted((ROOT / "plugins" / "modules").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        doc = next(
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(x, "id", None) == "DOCUMENTATION" for x in node.targets)
        )
        added = LooseVersion(str(yaml.safe_load(doc)["version_added"]))
        assert added <= version, f"{path.name}: version_added {added} is after the collection's {version}"


def test_the_version_is_released_in_the_changelog() -> None:
    version = str(yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"])
    changelog = yaml.safe_load((ROOT / "changelogs" / "changelog.yaml").read_text())
    assert version in changelog["releases"] and changelog["releases"][version].get("release_date")
    assert f"v{version}\n" in (ROOT / "CHANGELOG.rst").read_text()
