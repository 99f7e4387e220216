#!/usr/bin/env bash
# The browser client's tests under Node against a real wsrelay (and redis-server).
# From the repo root: clients/js/test/run.sh   (WSRELAY_BIN: the binary, default target/debug/wsrelay)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="$(cd "$here/../.." && pwd)"
export WSRELAY_BIN="${WSRELAY_BIN:-target/debug/wsrelay}"
case "$WSRELAY_BIN" in /*) ;; *) WSRELAY_BIN="$root/$WSRELAY_BIN" ;; esac  # relative to the repo root
[ -x "$WSRELAY_BIN" ] || { echo "clients/js: no wsrelay binary at $WSRELAY_BIN (cargo build, or set WSRELAY_BIN)"; exit 1; }
command -v node >/dev/null || { echo "clients/js: node is missing"; exit 1; }
command -v redis-server >/dev/null || { echo "clients/js: redis-server is missing"; exit 1; }
cd "$here"
# The devDependencies (ws) into clients/js/node_modules, exactly as locked.
if [ ! -d node_modules/ws ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
exec node --test test/client.test.js
