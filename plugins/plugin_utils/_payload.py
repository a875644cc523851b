# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's payload, built by ansible-core once per run instead of once per batch.

Every batch is sent as Ansible's PowerShell exec wrapper with the agent as the module (``_wrapper.ModuleWrapper``):
ansible-core's module builder scans the agent for its dependencies, base64-encodes every script and serialises the
manifest - some 15 to 25 ms of controller CPU for each batch, paid again in every forked worker. Only the batch
argument differs between two batches of the same kind, so the payload is built once with a placeholder in its place,
kept in the controller's temporary directory of this run (what the workers of one ``ansible-playbook`` share, as
ansible-core's own module cache does), and each batch is the template with its JSON-escaped batch put in - byte for
byte what the builder makes (json.dumps of the manifest escapes a string as json.dumps of that string does).

Only payloads without secrets and without randomness are kept: no become (the runas password travels in the
payload), no ``environment:``, not async (each job gets a random id), no coverage wrapper. Those are built each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import typing as t

import ansible
from ansible import constants as C

from ._agent import AGENT_PATH, Batch, WireCommand
from ._wrapper import AGENT_MODULE_NAME, BATCH_ARGUMENT

CACHE_PREFIX = "rdpfix-agent-payload-"


def _local_tmp() -> str | None:
    try:
        path = str(C.DEFAULT_LOCAL_TMP)
    except Exception:  # an unreadable configuration: build each time
        return None
    return path if path and os.path.isdir(path) else None


def cacheable(wrapper: t.Any) -> bool:
    """Whether this task's payloads can be shared: nothing in them but Ansible's wrappers, the agent and the batch."""
    if wrapper.become_plugin is not None or wrapper.environment or wrapper.async_timeout:
        return False
    try:
        coverage = C.config.get_config_value("COVERAGE_REMOTE_OUTPUT", variables=wrapper.task_vars)
    except Exception:
        return False
    return not coverage


def _key(wrapper: t.Any) -> str:
    with open(AGENT_PATH, "rb") as handle:
        agent = handle.read()
    shell = type(wrapper.shell).__module__ + "." + type(wrapper.shell).__qualname__
    material = b"\0".join([agent, ansible.__version__.encode(), shell.encode(), AGENT_PATH.encode()])
    return hashlib.sha256(material).hexdigest()[:32]


class CachedBuilder:
    """A builder (Batch -> WireCommand) that puts each batch into one template payload (see the module's doc)."""

    def __init__(self, wrapper: t.Any, directory: str | None = None) -> None:
        self.wrapper = wrapper
        self.directory = directory if directory is not None else _local_tmp()
        self._template: tuple[str, bytes, bytes] | None = None  # (command, before the batch, after it)

    def __call__(self, batch: Batch) -> WireCommand:
        template = self._template or self._load()
        if template is None:
            return t.cast(WireCommand, self.wrapper(batch))
        command, before, after = template
        # What json.dumps writes for the batch string inside the manifest, without its quotes.
        escaped = json.dumps(batch.to_json())[1:-1].encode("ascii")
        return WireCommand(command=command, stdin=before + escaped + after)

    def _load(self) -> tuple[str, bytes, bytes] | None:
        if self.directory is None:
            return None
        path = os.path.join(self.directory, CACHE_PREFIX + _key(self.wrapper) + ".json")
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
            self._template = (
                str(document["command"]),
                document["before"].encode("latin-1"),
                document["after"].encode("latin-1"),
            )
            return self._template
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        template = self._build()
        if template is None:
            return None
        command, before, after = template
        document = {"command": command, "before": before.decode("latin-1"), "after": after.decode("latin-1")}
        try:
            # Written whole and renamed: a worker reading at the same time sees the old state or the new file.
            descriptor, temporary = tempfile.mkstemp(prefix=CACHE_PREFIX, dir=self.directory)
            with os.fdopen(descriptor, "w", encoding="utf-8") as out:
                json.dump(document, out)
            os.replace(temporary, path)
        except OSError:
            pass
        self._template = template
        return template

    def _build(self) -> tuple[str, bytes, bytes] | None:
        marker = f"rdpfix-batch-{secrets.token_hex(16)}"
        built = self.wrapper.build(AGENT_MODULE_NAME, AGENT_PATH, {BATCH_ARGUMENT: marker}, 0)
        parts = built.stdin.split(marker.encode("ascii"))
        if len(parts) != 2:
            return None
        return built.command, parts[0], parts[1]


def builder_for(wrapper: t.Any) -> t.Callable[[Batch], WireCommand]:
    """The cached builder where the payload holds no secret and no randomness, else the wrapper itself."""
    return CachedBuilder(wrapper) if cacheable(wrapper) else t.cast(t.Callable[[Batch], WireCommand], wrapper)
