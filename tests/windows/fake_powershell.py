# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A stand-in for powershell.exe in the tests of rdpfix_local.py: it forwards its arguments and stdin to a simulated
host of the lab (the test's server at RDPFIX_FAKE_POWERSHELL=host:port), which verifies them exactly as its WinRM
endpoint verifies a command, and returns what the lab's agent emulation answered: exit code, stdout, stderr."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys


def main() -> int:
    address, port = os.environ["RDPFIX_FAKE_POWERSHELL"].rsplit(":", 1)
    request = {"argv": sys.argv[1:], "stdin_b64": base64.b64encode(sys.stdin.buffer.read()).decode("ascii")}
    with socket.create_connection((address, int(port)), timeout=120) as connection:
        connection.sendall(json.dumps(request).encode("utf-8") + b"\n")
        connection.shutdown(socket.SHUT_WR)
        answer = json.loads(b"".join(iter(lambda: connection.recv(65536), b"")).decode("utf-8"))
    sys.stdout.buffer.write(base64.b64decode(answer["stdout_b64"]))
    sys.stderr.buffer.write(base64.b64decode(answer["stderr_b64"]))
    return int(answer["rc"])


if __name__ == "__main__":
    sys.exit(main())
