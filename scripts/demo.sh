#!/usr/bin/env bash
# The demo: a lab of simulated Windows servers, some with the faults behind RDP error 0x904 / 0x7, repaired by
# playbooks/fix_rdp.yml through Ansible's own winrm connection: the fleet report (audit_rdp.yml), the audit in check
# mode, the fix, a rerun that has nothing left to change, and the fleet report again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$root/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$root/ansible.cfg" ANSIBLE_COLLECTIONS_PATH="$root/.cache/collections"
network=${RDPFIX_DEMO_NETWORK:-127.0.0}
fleet=${RDPFIX_DEMO_FLEET:-tests/lab/fleets/demo.yml}
state_dir=.lab
inventory=inventory/lab.yml
report_dir=${RDPFIX_DEMO_REPORT_DIR:-build/demo}

# Bold banners on a terminal only: redirected to a file (make demo > demo.log) the output carries no escape codes.
# ansible-playbook colours only a terminal too, unless ANSIBLE_FORCE_COLOR says otherwise.
if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then
  banner() { printf '\n\033[1m=== %s\033[0m\n' "$*"; }
else
  banner() { printf '\n=== %s\n' "$*"; }
fi

rdplab down --state-dir "$state_dir" >/dev/null 2>&1 || true
mkdir -p inventory "$report_dir"
banner "Starting a lab of simulated Windows hosts ($fleet)"
rdplab up --network "$network" --state-dir "$state_dir" --inventory "$inventory" "$fleet"
trap 'banner "Stopping the lab"; rdplab down --state-dir "$state_dir"' EXIT

python scripts/demo_summary.py --state-dir "$state_dir" --inventory "$inventory" --phase before \
  --save "$report_dir/before.json"

banner "1. Fleet report before the fix: ansible-playbook playbooks/audit_rdp.yml (changes nothing)"
rdplab state --state-dir "$state_dir" --reset-counters >/dev/null
ansible-playbook -i "$inventory" playbooks/audit_rdp.yml -e rdpfix_server_audit_handshake=true \
  -e "rdpfix_audit_report_dir=$root/$report_dir/report-before"
python scripts/demo_summary.py --state-dir "$state_dir" --inventory "$inventory" --phase report --expect-no-writes \
  --report "$report_dir/report-before"

banner "2. Audit as a dry run: ansible-playbook playbooks/fix_rdp.yml --check --diff (changes nothing)"
rdplab state --state-dir "$state_dir" --reset-counters >/dev/null
ansible-playbook -i "$inventory" playbooks/fix_rdp.yml --check --diff
python scripts/demo_summary.py --state-dir "$state_dir" --inventory "$inventory" --phase audit --expect-no-writes

banner "3. Fix: ansible-playbook playbooks/fix_rdp.yml"
rdplab state --state-dir "$state_dir" --reset-counters >/dev/null
ansible-playbook -i "$inventory" playbooks/fix_rdp.yml
python scripts/demo_summary.py --state-dir "$state_dir" --inventory "$inventory" --phase fix

banner "4. Rerun: nothing left to change"
rdplab state --state-dir "$state_dir" --reset-counters >/dev/null
ANSIBLE_NOCOLOR=1 ansible-playbook -i "$inventory" playbooks/fix_rdp.yml | tee "$report_dir/rerun.log"
python scripts/demo_summary.py --state-dir "$state_dir" --inventory "$inventory" --phase rerun \
  --expect-no-writes --before "$report_dir/before.json"

banner "5. Fleet report after the fix: ansible-playbook playbooks/audit_rdp.yml"
rdplab state --state-dir "$state_dir" --reset-counters >/dev/null
ansible-playbook -i "$inventory" playbooks/audit_rdp.yml -e rdpfix_server_audit_handshake=true \
  -e "rdpfix_audit_report_dir=$root/$report_dir/report-after"
python scripts/demo_summary.py --state-dir "$state_dir" --inventory "$inventory" --phase report --expect-no-writes \
  --report "$report_dir/report-after" --report-before "$report_dir/report-before"
