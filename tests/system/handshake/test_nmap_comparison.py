"""Our security-layer answers against nmap's rdp-enum-encryption on the same real servers.

nmap counts any RDP_NEG_RSP as SUCCESS without reading which protocol the server selected, so it is right about the
layers a server really selects and wrong where the server answers with a different one (xrdp and CredSSP). The
comparison therefore agrees on native RDP and SSL, and on CredSSP the server's own log settles who is right.
See docs/handshake-vs-nmap.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import typing as t

import pytest

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe

pytestmark = pytest.mark.system

NMAP_LAYERS = {"Native RDP": "rdp", "SSL": "tls", "CredSSP (NLA)": "credssp", "RDSTLS": "rdstls"}


def nmap_security_layers(port: int) -> dict[str, str]:
    """Run rdp-enum-encryption (forced onto a non-standard port with '+') and return {our trial name: result}."""
    nmap = shutil.which("nmap")
    if nmap is None:
        pytest.skip("nmap is not installed (run scripts/install-system-packages.sh)")
    completed = subprocess.run(
        [nmap, "-Pn", "-n", "-d", "-p", str(port), "--script", "+rdp-enum-encryption", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    layers: dict[str, str] = {}
    for label, name in NMAP_LAYERS.items():
        match = re.search(rf"^\|\s+{re.escape(label)}: (SUCCESS|FAILED.*)$", completed.stdout, re.MULTILINE)
        if match:
            layers[name] = match.group(1)
    assert layers, f"no security layer lines in nmap's output:\n{completed.stdout}"
    return layers


def test_nmap_agrees_where_it_is_right_and_xrdp_log_settles_credssp(
    xrdp: t.Callable[..., t.Any], certs: dict[str, t.Any]
) -> None:
    server = xrdp(certs["valid"], security_layer="negotiate")
    ours = probe("127.0.0.1", server.port, checks=["negotiation"], read_timeout=3.0)["negotiation"]["trials"]
    theirs = nmap_security_layers(server.port)

    # Where the server really selects the protocol asked for, both tools say so.
    for name in ("rdp", "tls"):
        assert ours[name]["status"] == "accepted"
        assert theirs[name] == "SUCCESS"

    # nmap reports CredSSP as SUCCESS; xrdp does not implement CredSSP and selected TLS instead.
    assert theirs["credssp"] == "SUCCESS"
    assert ours["credssp"]["status"] == "selected_other"
    assert ours["credssp"]["selected_protocol"] == "tls"
    log = server.log.read_text(errors="replace")
    assert re.search(r"requested \[SSL\|HYBRID(\|RDP)?\], selected \[SSL\]", log), log[-2000:]
