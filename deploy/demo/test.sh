#!/usr/bin/env bash
# The demo stack in headless Chromium (deploy/demo/browser.test.mjs), from the repo root:
#   deploy/demo/test.sh        WSRELAY_BIN: the binary (default target/debug/wsrelay)
#                              UPDATE_SCREENSHOT=1: rewrite docs/demo.png
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export WSRELAY_BIN="${WSRELAY_BIN:-target/debug/wsrelay}"
case "$WSRELAY_BIN" in /*) ;; *) WSRELAY_BIN="$root/$WSRELAY_BIN" ;; esac  # relative to the repo root
[ -x "$WSRELAY_BIN" ] || { echo "deploy/demo: no wsrelay binary at $WSRELAY_BIN (cargo build, or set WSRELAY_BIN)"; exit 1; }
for p in node python3 redis-server nginx chromium; do
    command -v "$p" >/dev/null || [ -x "/usr/sbin/$p" ] || { echo "deploy/demo: $p is missing (make test-browser installs it)"; exit 1; }
done
# The DevTools client is the `ws` package of clients/js (npm ci, locked).
cd "$root/clients/js"
if [ ! -d node_modules/ws ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
cd "$root"
exec node --test deploy/demo/browser.test.mjs
