"""Fleets: several host files (or directories of them, or fleet files listing them) loaded as one lab."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from rdplab.model.certs import LabCA
from rdplab.model.errors import HostFileError
from rdplab.model.host import WindowsHost
from rdplab.model.schema import DEFAULT_CA_NAME, build_host, read_yaml
from rdplab.model.timeutil import anchor_of, utc_now

HOST_SUFFIXES = (".yml", ".yaml")


def _is_fleet(document: object) -> bool:
    return isinstance(document, dict) and "hosts" in document and "name" not in document


def _expand(path: Path, seen_fleets: set[Path]) -> list[tuple[Path, object]]:
    """(file, parsed document) of every host file a path stands for, in a stable order."""
    if path.is_dir():
        found: list[tuple[Path, object]] = []
        for child in sorted(path.iterdir()):
            if child.is_file() and child.suffix in HOST_SUFFIXES:
                found.extend(_expand(child, seen_fleets))
        return found
    if not path.is_file():
        raise HostFileError(f"{path}: no such host file, fleet file or directory")
    document = read_yaml(path)
    if not _is_fleet(document):
        return [(path, document)]
    resolved = path.resolve()
    if resolved in seen_fleets:
        raise HostFileError(f"{path}: the fleet includes itself")
    seen_fleets.add(resolved)
    assert isinstance(document, dict)
    unknown = sorted(set(document) - {"hosts", "description", "ca_name"})
    if unknown:
        raise HostFileError(f"{path}: {unknown[0]}: unknown field (allowed: ca_name, description, hosts)")
    entries = document["hosts"]
    if not isinstance(entries, list) or not entries or not all(isinstance(item, str) for item in entries):
        raise HostFileError(f"{path}: hosts: expected a non-empty list of host file paths (relative to the fleet file)")
    found = []
    for index, entry in enumerate(entries):
        target = path.parent / entry
        if not target.exists():
            raise HostFileError(f"{path}: hosts[{index}]: {entry} does not exist (relative to {path.parent})")
        found.extend(_expand(target, seen_fleets))
    return found


def _ca_name(paths: list[Path]) -> str:
    for path in paths:
        if path.is_file():
            document = read_yaml(path)
            if _is_fleet(document) and isinstance(document, dict) and isinstance(document.get("ca_name"), str):
                return str(document["ca_name"])
    return DEFAULT_CA_NAME


def load_fleet(paths: list[Path], now: datetime | None = None) -> list[WindowsHost]:
    """Every host of the given host files, directories and fleet files; one lab CA shared by all of them.

    HostFileError (a ValueError) names the file and the field of the first problem; host names must be unique.
    """
    moment = now or utc_now()
    ca = LabCA(_ca_name([Path(p) for p in paths]), anchor_of(moment))
    hosts: list[WindowsHost] = []
    origins: dict[str, Path] = {}
    seen_files: set[Path] = set()
    seen_fleets: set[Path] = set()
    for path in paths:
        for file, document in _expand(Path(path), seen_fleets):
            if file.resolve() in seen_files:
                continue  # listed twice (a directory and a fleet naming the same file): load once
            seen_files.add(file.resolve())
            host = build_host(document, file, ca=ca, now=moment)
            if host.name in origins:
                raise HostFileError(f"{file}: name: host {host.name!r} is already defined in {origins[host.name]}")
            origins[host.name] = file
            hosts.append(host)
    if not hosts:
        raise HostFileError(f"no host files found in {', '.join(str(p) for p in paths)}")
    return hosts
