#!/usr/bin/env bash
# ansible-test sanity without Docker: it wants the collection at ansible_collections/rdpfix/rdp, so the files git knows
# (tracked, or new and not ignored) are copied there first.
# Not offline: ansible-test builds a venv per sanity test and installs pip and each test's pinned requirements into it
# from PyPI (cached under ~/.ansible/test after the first run). Only its pip bootstrap script, which it would download
# from a site other than PyPI, is replaced by the stand-in below.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
work="$root/.cache/sanity"
dest="$work/ansible_collections/rdpfix/rdp"

# ansible-test bootstraps pip in its own venvs from a get-pip script it downloads. This stand-in installs the requested
# pip version from PyPI with the pip wheel Python ships in ensurepip.
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
# The pip version ansible-test pins for its venvs (e.g. pip='24.2' in python_requirements.py).
reqs="$("$bin/python" -c 'import ansible_test._internal.python_requirements as r; print(r.__file__)')"
while IFS= read -r version; do
  stand_in="$cache/get_pip_${version//./_}.py"
  [ -f "$stand_in" ] && continue
  cat > "$stand_in" <<'PY'
"""Offline stand-in for get-pip.py: run the pip wheel bundled with ensurepip to install the requested pip."""
import glob
import os
import sys

import ensurepip

wheels = glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl"))
sys.path.insert(0, wheels[0])
from pip._internal.cli.main import main  # noqa: E402

# --no-setuptools / --no-wheel are get-pip's own options: without them nothing but pip is installed anyway.
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", *args]))
PY
done < <(grep -oE "pip='[0-9.]+'" "$reqs" | cut -d"'" -f2 | sort -u)

rm -rf "$work"
mkdir -p "$dest"
cd "$root"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -cf - -T - | tar -C "$dest" -xf -
cd "$dest"
# The copy lives inside this checkout's ignored .cache: give it a git index of its own so ansible-test lists its files.
git init -q . && git add -A
"$bin/ansible-test" sanity --python 3.11 --color no "$@"
