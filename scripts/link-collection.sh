#!/usr/bin/env bash
# Make this checkout importable as ansible_collections.rdpfix.rdp without building it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.cache/collections/ansible_collections/rdpfix"
mkdir -p "$target"
ln -sfn ../../../.. "$target/rdp"
