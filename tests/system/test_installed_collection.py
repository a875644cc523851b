"""The collection as a user installs it (README, "Using it on your servers"): the built tarball installed with its
dependency ansible.windows into an empty collections path, and a baseline play with the server role run from there -
not from this checkout - against a lab. The play also sets module defaults for the ``rdpfix.rdp.backup`` action group,
as the README shows, next to modules outside the group (facts, fleet_report)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import typing as t
from pathlib import Path

import pytest
import yaml
from harness import BIN, ROOT, Lab, ansible_env

pytestmark = pytest.mark.system

# The role's backups go where its variable says where it is set; elsewhere, and for a module used directly, backup_root
# comes from the action group's module defaults (the role never passes the server module a backup_root of its own).
ROLE_BACKUP_ROOT = "C:\\rdpfix-role\\backups"
GROUP_BACKUP_ROOT = "C:\\rdpfix-group\\backups"
CLIENT_BACKUP_ROOT = "C:\\rdpfix-client\\backups"


def bundled(name: str) -> Path:
    """Where the `ansible` package in the venv keeps a collection (ansible.windows, ansible.posix)."""
    spec = importlib.util.find_spec(f"ansible_collections.{name}")
    assert spec and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations)))


def install(tmp_path: Path) -> Path:
    """Build the tarball from this checkout and install it, with ansible.windows, into a new collections path."""
    neutral = tmp_path / "ansible.cfg"
    neutral.write_text("[defaults]\n")
    env = ansible_env(ANSIBLE_CONFIG=str(neutral))
    built = tmp_path / "built"
    subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(built), str(ROOT)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    (tarball,) = built.glob("rdpfix-rdp-*.tar.gz")
    installed = tmp_path / "collections"
    # Galaxy stands in: ansible.windows as `ansible-galaxy collection install ansible.windows` leaves it (here from the
    # `ansible` package in the venv); the tarball is then installed offline and must find its dependency.
    windows = installed / "ansible_collections" / "ansible" / "windows"
    windows.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(bundled("ansible.windows")), str(windows)], check=True)
    proc = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "-p", str(installed), str(tarball)],
        capture_output=True,
        text=True,
        # Only the new path counts: this checkout's own link (in ANSIBLE_COLLECTIONS_PATH) is not an installation.
        env={**env, "ANSIBLE_COLLECTIONS_PATH": str(installed)},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ansible.windows" in proc.stdout
    return installed


def test_a_baseline_runs_from_the_installed_collection(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    installed = install(tmp_path)
    lab = lab_factory("expired-selfsigned", "missing-selfsigned", "healthy")
    # The role's variable for one host only (an inventory host variable beats the role's default).
    inventory = yaml.safe_load(lab.inventory.read_text())
    hosts = inventory["all"]["children"]["windows"]["hosts"]
    hosts["expired-selfsigned"]["rdpfix_server_backup_root"] = ROLE_BACKUP_ROOT
    hosts["expired-selfsigned"]["rdpfix_client_backup_root"] = CLIENT_BACKUP_ROOT
    lab.inventory.write_text(yaml.safe_dump(inventory))
    site = tmp_path / "site.yml"
    site.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Baseline",
                    "hosts": "windows",
                    "gather_facts": False,
                    "module_defaults": {"group/rdpfix.rdp.backup": {"backup_root": GROUP_BACKUP_ROOT}},
                    "roles": ["rdpfix.rdp.rdpfix_server", "rdpfix.rdp.rdpfix_client"],
                    "tasks": [
                        {"name": "TCP only", "rdpfix.rdp.transport": {"mode": "tcp_only"}},
                        {"name": "Read the hosts", "rdpfix.rdp.facts": None, "register": "baseline_facts"},
                        {
                            "name": "Report",
                            "rdpfix.rdp.fleet_report": {
                                "findings_var": "baseline_facts",
                                "dest": str(tmp_path / "reports"),
                            },
                            "run_once": True,
                            "delegate_to": "localhost",
                        },
                    ],
                }
            ],
            sort_keys=False,
        )
    )
    neutral = tmp_path / "ansible.cfg"
    # Only the installed collections, and the `ansible` package's (for the ansible.posix.json callback that this test
    # reads the results with): rdpfix.rdp can come from nowhere but the installed tarball.
    env = ansible_env(
        ANSIBLE_CONFIG=str(neutral),
        ANSIBLE_COLLECTIONS_PATH=os.pathsep.join([str(installed), str(bundled("ansible.posix").parents[2])]),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
    )
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(lab.inventory), str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    document = json.loads(proc.stdout[proc.stdout.find("{") :])
    assert document["stats"]["expired-selfsigned"]["changed"] > 0
    assert document["stats"]["missing-selfsigned"]["changed"] > 0
    assert document["stats"]["healthy"]["failures"] == 0
    # The role's repair was backed up under the role's folder, the direct module's change under the group default's.
    paths = " ".join(lab.host("expired-selfsigned")["snapshot"]["files"]["entries"])
    assert "rdpfix-role\\backups\\" in paths and "manifest.json" in paths, paths[:2000]
    assert "rdpfix-group\\backups\\" in paths, paths[:2000]
    # Without the role's variable the role's repair goes under the group default too, and nothing under the
    # built-in default.
    paths = " ".join(lab.host("missing-selfsigned")["snapshot"]["files"]["entries"])
    repair = [path for path in paths.split() if "rdpfix-group\\backups\\" in path and "-certificate-" in path]
    assert repair and "rdpfix-role" not in paths, paths[:2000]
    assert "programdata\\rdpfix\\backups" not in paths.lower(), paths[:2000]
    # The client role's change (the client transport policy) follows the same rules: its own variable when set, else
    # the play's group default - beside the server-side change of the play's own transport task, never under
    # %ProgramData% (asserted above).
    transport_manifests = [
        path
        for path in paths.split()
        if "rdpfix-group\\backups\\" in path and "-transport-" in path and path.endswith("manifest.json")
    ]
    assert len(transport_manifests) == 2, paths[:2000]
    paths = " ".join(lab.host("expired-selfsigned")["snapshot"]["files"]["entries"])
    client_change = [path for path in paths.split() if "rdpfix-client\\backups\\" in path and "-transport-" in path]
    assert client_change, paths[:2000]
    assert (tmp_path / "reports" / "report.json").is_file()
