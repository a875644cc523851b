#!/usr/bin/env bash
# The collection builds, the tarball leaves the lab and local files out, installs, and ansible-doc renders its modules.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root"
# A neutral configuration: the checkout's ansible.cfg would put its own copy of the collection first.
printf '[defaults]\n' > "$tmp/ansible.cfg"
export ANSIBLE_CONFIG="$tmp/ansible.cfg"
ANSIBLE_CONFIG="$root/ansible.cfg" "$bin/ansible-galaxy" collection build --force --output-path "$tmp" . >/dev/null
tarball=$(ls "$tmp"/rdpfix-rdp-*.tar.gz)
unwanted=$(tar -tzf "$tarball" | grep -E '^(tests/lab/|\.venv/|\.cache/|\.lab/|\.hypothesis/|inventory/lab|molecule/|scripts/|benchmarks/|build/|reports/|\.git/)' || true)
if [ -n "$unwanted" ]; then
  echo "the collection tarball carries files it must leave out:"; echo "$unwanted" | head -20; exit 1
fi
"$bin/ansible-galaxy" collection install --force --offline -p "$tmp/installed" "$tarball" >/dev/null
modules=$(ANSIBLE_COLLECTIONS_PATH="$tmp/installed" "$bin/ansible-doc" -l rdpfix.rdp | awk '{print $1}')
[ -n "$modules" ] || { echo "ansible-doc lists no modules in the installed collection"; exit 1; }
for module in $modules; do
  ANSIBLE_COLLECTIONS_PATH="$tmp/installed" "$bin/ansible-doc" "$module" >/dev/null || { echo "ansible-doc cannot render $module"; exit 1; }
done
echo "built $(basename "$tarball"): $(tar -tzf "$tarball" | wc -l) files; ansible-doc renders: $(echo "$modules" | tr '\n' ' ')"
