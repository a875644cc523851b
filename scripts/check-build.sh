#!/usr/bin/env bash
# The collection as users get it: it builds, the tarball carries only what users run, it installs with its dependency
# (ansible.windows) the way the README says, a play using the roles parses against that installation alone, ansible-doc
# renders every module and role, galaxy-importer (the checks Galaxy and Automation Hub run on an upload) passes, and
# `ansible-builder create` prepares an execution environment from a clean copy of the sources with no build step first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
export PATH="$bin:$PATH"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root"
# A neutral configuration: the checkout's ansible.cfg would put its own copy of the collection first.
printf '[defaults]\n' > "$tmp/ansible.cfg"
export ANSIBLE_CONFIG="$tmp/ansible.cfg" ANSIBLE_LOCAL_TEMP="$tmp/ansible-tmp" ANSIBLE_NOCOLOR=1

# A clean copy of the sources: the files git knows (tracked, or new and not ignored), as a fresh clone has them.
mkdir -p "$tmp/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -cf - -T - | tar -C "$tmp/src" -xf -

"$bin/ansible-galaxy" collection build --force --output-path "$tmp" "$tmp/src" >/dev/null
tarball=$(ls "$tmp"/rdpfix-rdp-*.tar.gz)
files=$(tar -tzf "$tarball")
unwanted=$(echo "$files" | grep -E '(^|/)\.|^tests/(lab|unit|system|output|windows|tools)/|^tests/[^/]+\.(py|cfg)$|^(inventory|molecule|scripts|benchmarks|build|reports|requirements|changelogs/fragments)/|^docs/(lab|benchmarks|handshake-vs-nmap|windows-ci)\.md$|^(Makefile|pyproject\.toml|ansible\.cfg|execution-environment\.yml)$|__pycache__|\.pyc$' || true)
if [ -n "$unwanted" ]; then
  echo "the collection tarball carries files it must leave out:"; echo "$unwanted" | head -20; exit 1
fi
for wanted in LICENSE README.md CHANGELOG.rst requirements.txt bindep.txt meta/execution-environment.yml meta/runtime.yml \
  roles/rdpfix_server/README.md roles/rdpfix_client/README.md; do
  echo "$files" | grep -qxF "$wanted" || { echo "the collection tarball lacks $wanted"; exit 1; }
done

# Install as the README says. Galaxy is not reachable from every machine that runs this: ansible.windows is taken from
# the `ansible` package in the venv (an installed collection, as `ansible-galaxy collection install ansible.windows`
# leaves it), then the tarball is installed offline and must find its dependency there.
installed="$tmp/installed"
bundle=$("$bin/python" -c 'import importlib.util as u; print(list(u.find_spec("ansible_collections.ansible.windows").submodule_search_locations)[0])')
mkdir -p "$installed/ansible_collections/ansible"
cp -r "$bundle" "$installed/ansible_collections/ansible/windows"
ANSIBLE_COLLECTIONS_PATH="$installed" "$bin/ansible-galaxy" collection install --offline -p "$installed" "$tarball" >"$tmp/install.log" 2>&1 \
  || { cat "$tmp/install.log"; exit 1; }
export ANSIBLE_COLLECTIONS_PATH="$installed"
listed=$("$bin/ansible-galaxy" collection list -p "$installed" 2>/dev/null)
echo "$listed" | grep -q '^ansible.windows ' || { echo "ansible.windows is not installed beside rdpfix.rdp"; exit 1; }

# A play with both roles and every playbook parse against that installation only (not this checkout).
cat > "$tmp/site.yml" <<'YAML'
- name: Baseline with the server role
  hosts: windows
  gather_facts: false
  roles:
    - role: rdpfix.rdp.rdpfix_server
      vars:
        rdpfix_server_allow_reboot: true
- name: Clients
  hosts: rdp_clients
  gather_facts: false
  roles:
    - rdpfix.rdp.rdpfix_client
YAML
printf '[windows]\nweb01\n[rdp_clients]\npc01\n' > "$tmp/hosts.ini"
# One ansible-playbook for all of them (it checks each playbook it is given, and fails when any one fails).
playbooks=()
for playbook in "$installed"/ansible_collections/rdpfix/rdp/playbooks/*.yml; do
  playbooks+=("rdpfix.rdp.$(basename "$playbook" .yml)")
done
[ ${#playbooks[@]} -gt 0 ] || { echo "the installed collection has no playbooks"; exit 1; }
(cd "$tmp" && "$bin/ansible-playbook" -i hosts.ini --syntax-check site.yml "${playbooks[@]}" >/dev/null)

# One ansible-doc for every module and one for both roles: it fails when a page cannot be rendered, and each page must
# be there (ansible-doc only warns about a name it does not find).
modules=$("$bin/ansible-doc" -l rdpfix.rdp | awk '{print $1}')
[ -n "$modules" ] || { echo "ansible-doc lists no modules in the installed collection"; exit 1; }
# shellcheck disable=SC2086 # one argument per module name
pages=$("$bin/ansible-doc" $modules) || { echo "ansible-doc cannot render every module of: $modules"; exit 1; }
pages+=$'\n'$("$bin/ansible-doc" -t role rdpfix.rdp.rdpfix_server rdpfix.rdp.rdpfix_client) \
  || { echo "ansible-doc cannot render the roles"; exit 1; }
for module in $modules; do
  grep -q "^> MODULE $module " <<<"$pages" || { echo "ansible-doc renders no page for $module"; exit 1; }
done
for role in rdpfix_server rdpfix_client; do
  grep -q "^> ROLE: \*rdpfix.rdp.$role\* " <<<"$pages" || { echo "ansible-doc renders no page for role $role"; exit 1; }
done

# galaxy-importer, configured in tests/galaxy-importer.cfg (no container, so no ansible-test: sanity runs on its own).
# Galaxy requires a repository URL; galaxy.yml has none while the project has no public repository, so the importer
# checks a tarball built with a stand-in URL, and says so.
importer_tarball=$tarball
if ! grep -q '^repository:' "$tmp/src/galaxy.yml"; then
  echo "NOTE: galaxy.yml has no repository URL; Galaxy needs one before an upload (galaxy-importer runs with a stand-in)"
  mkdir -p "$tmp/importer-src" "$tmp/importer"
  cp -r "$tmp/src/." "$tmp/importer-src/"
  printf 'repository: https://repository.invalid/rdpfix/rdp\n' >> "$tmp/importer-src/galaxy.yml"
  "$bin/ansible-galaxy" collection build --force --output-path "$tmp/importer" "$tmp/importer-src" >/dev/null
  importer_tarball=$(ls "$tmp"/importer/rdpfix-rdp-*.tar.gz)
fi
(cd "$tmp" && GALAXY_IMPORTER_CONFIG="$root/tests/galaxy-importer.cfg" "$bin/python" -m galaxy_importer.main \
  "$importer_tarball" >"$tmp/importer.log" 2>&1) || { cat "$tmp/importer.log"; exit 1; }
problems=$(grep -E '^(WARNING|ERROR)' "$tmp/importer.log" || true)
if [ -n "$problems" ]; then
  echo "galaxy-importer reports:"; echo "$problems"; exit 1
fi

# ansible-builder: the context for the execution environment, from the clean copy, with no build step first; then the
# collection installed from that context as the image does (a directory source), and what ansible-builder's
# introspection finds in it.
"$bin/ansible-builder" create -f "$tmp/src/execution-environment.yml" --context "$tmp/ee" >/dev/null
[ -f "$tmp/ee/_build/rdpfix-rdp/galaxy.yml" ] || { echo "the EE context lacks the collection's sources"; exit 1; }
grep -q 'rdpfix-rdp' "$tmp/ee/_build/requirements.yml" || { echo "the EE does not install rdpfix.rdp"; exit 1; }
# azure.azcollection (the azure_rm inventory) with requirements/azure-rm.txt in place of its own Python requirements,
# which conflict with this collection's cryptography (docs/azure.md, "The azure_rm inventory").
if ! { grep -q 'azure.azcollection' "$tmp/ee/_build/requirements.yml" \
  && grep -qx 'azure.azcollection' "$tmp/ee/_build/exclude-collections.txt" \
  && grep -q '^azure-cli-core==' "$tmp/ee/_build/requirements.txt"; }; then
  echo "the EE lacks azure.azcollection with requirements/azure-rm.txt instead of its own requirements"
  exit 1
fi
mkdir -p "$tmp/ee-installed/ansible_collections/ansible"
cp -r "$bundle" "$tmp/ee-installed/ansible_collections/ansible/windows"
ANSIBLE_COLLECTIONS_PATH="$tmp/ee-installed" \
  "$bin/ansible-galaxy" collection install --offline -p "$tmp/ee-installed" "$tmp/ee/_build/rdpfix-rdp" \
  >"$tmp/ee-install.log" 2>&1 || { cat "$tmp/ee-install.log"; exit 1; }
introspected=$("$bin/ansible-builder" introspect "$tmp/ee-installed")
for requirement in 'pywinrm' 'cryptography' 'krb5-workstation'; do
  echo "$introspected" | grep -q "$requirement.*rdpfix.rdp" \
    || { echo "ansible-builder introspect does not find rdpfix.rdp's $requirement:"; echo "$introspected"; exit 1; }
done

echo "built $(basename "$tarball"): $(echo "$files" | wc -l) files; installs with ansible.windows; playbooks parse;" \
  "ansible-doc renders: $(echo "$modules" | tr '\n' ' ')+ 2 roles; galaxy-importer clean; ansible-builder context ok"
