"""Real RDP servers from Debian packages, started on loopback for the handshake module's system tests.

xrdp (TLS / native RDP security layers, no CredSSP) and FreeRDP's shadow server (which does CredSSP) run in temporary
directories on free high ports; every process is started in its own session and its process group is stopped by
the fixture's finalizer, whatever the test did. ``scripts/install-system-packages.sh`` installs them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import subprocess
import time
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "rdp-test.example"
START_TIMEOUT = 10.0


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (run scripts/install-system-packages.sh)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_listener(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {START_TIMEOUT}s: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the process group this fixture started (xrdp forks one child per connection)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    else:
        # The leader is gone; children of the same group may remain.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@dataclass
class CertFiles:
    cert: Path
    key: Path
    der: bytes


def write_cert(directory: Path, name: str, days_left: int, key: rsa.RSAPrivateKey | None = None) -> CertFiles:
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400))
        .not_valid_after(now + datetime.timedelta(days=days_left))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return CertFiles(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertFiles]:
    directory = tmp_path_factory.mktemp("rdp-certs")
    valid = write_cert(directory, "valid", 90)
    expired = write_cert(directory, "expired", -5)
    # A certificate next to a private key that is not its own: the server cannot build its TLS credential.
    stranger = write_cert(directory, "stranger", 90)
    mismatched = CertFiles(valid.cert, stranger.key, valid.der)
    return {"valid": valid, "expired": expired, "mismatched": mismatched}


@dataclass
class Server:
    port: int
    log: Path
    directory: Path


XrdpFactory = t.Callable[..., Server]


@pytest.fixture
def xrdp(tmp_path: Path) -> Iterator[XrdpFactory]:
    """Start xrdp with a given security layer, certificate and TLS protocols; stopped after the test."""
    binary = require("xrdp")
    processes: list[subprocess.Popen[bytes]] = []

    def start(
        certificate: CertFiles,
        security_layer: str = "negotiate",
        ssl_protocols: str = "TLSv1.2, TLSv1.3",
        tls_ciphers: str | None = None,
    ) -> Server:
        directory = tmp_path / f"xrdp-{len(processes)}"
        directory.mkdir()
        port = free_port()
        log = directory / "xrdp.log"
        lines = [
            "[Globals]",
            "ini_version=1",
            "fork=true",
            f"port=tcp://127.0.0.1:{port}",
            f"security_layer={security_layer}",
            "crypt_level=high",
            f"certificate={certificate.cert}",
            f"key_file={certificate.key}",
            f"ssl_protocols={ssl_protocols}",
        ]
        if tls_ciphers:
            lines.append(f"tls_ciphers={tls_ciphers}")
        lines += ["[Logging]", f"LogFile={log}", "LogLevel=DEBUG", "EnableSyslog=false", "EnableConsole=false"]
        ini = directory / "xrdp.ini"
        ini.write_text("\n".join(lines) + "\n")
        output = directory / "stdout.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [binary, "--nodaemon", "-c", str(ini)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,
            )
        processes.append(process)
        wait_for_listener(port, process, output)
        return Server(port=port, log=log, directory=directory)

    yield start
    for process in processes:
        stop(process)


@pytest.fixture(scope="module")
def x_display(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Xvfb display for FreeRDP's shadow server; Xvfb picks a free display number itself."""
    binary = require("Xvfb")
    directory = tmp_path_factory.mktemp("xvfb")
    read_end, write_end = os.pipe()
    with (directory / "xvfb.log").open("wb") as sink:
        process = subprocess.Popen(
            [binary, "-displayfd", str(write_end), "-screen", "0", "800x600x24", "-nolisten", "tcp", "-noreset"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            pass_fds=(write_end,),
            start_new_session=True,
        )
    os.close(write_end)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        number = b""
        os.set_blocking(read_end, False)
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            try:
                chunk = os.read(read_end, 16)
            except BlockingIOError:
                chunk = b""
            if chunk:
                number += chunk
            else:
                if process.poll() is not None:
                    break
                time.sleep(0.05)
        if not number.strip():
            raise RuntimeError(f"Xvfb did not report a display: {(directory / 'xvfb.log').read_text()[-1000:]}")
        yield f":{number.strip().decode()}"
    finally:
        os.close(read_end)
        stop(process)


ShadowFactory = t.Callable[[str], Server]


@pytest.fixture
def shadow(tmp_path: Path, x_display: str) -> Iterator[ShadowFactory]:
    """Start FreeRDP's shadow server in a security mode (nla, tls, rdp); it makes its own certificate."""
    binary = require("freerdp-shadow-cli")
    processes: list[subprocess.Popen[bytes]] = []

    def start(mode: str) -> Server:
        directory = tmp_path / f"shadow-{mode}"
        directory.mkdir()
        port = free_port()
        log = directory / "shadow.log"
        env = dict(os.environ, DISPLAY=x_display, HOME=str(directory), XDG_CONFIG_HOME=str(directory / "config"))
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [binary, f"/port:{port}", "/bind-address:127.0.0.1", f"/sec:{mode}"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=directory,
                env=env,
                start_new_session=True,
            )
        processes.append(process)
        wait_for_listener(port, process, log)
        return Server(port=port, log=log, directory=directory)

    yield start
    for process in processes:
        stop(process)
