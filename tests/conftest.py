"""Make this checkout importable as ``ansible_collections.rdpfix.rdp`` for every test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / ".cache" / "collections"

if not (COLLECTIONS / "ansible_collections" / "rdpfix" / "rdp").exists():
    subprocess.run([str(ROOT / "scripts" / "link-collection.sh")], check=True)
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))
