#!/usr/bin/env bash
# Runs the Socket.IO protocol conformance suite (socketio/socket.io-protocol,
# test-suite/) against wsrelay, with tests/conformance/hookapp.py playing the
# suite's reference server through wsrelay's hooks.
#
# Usage: WSRELAY_BIN=/path/to/wsrelay tests/conformance/run.sh /path/to/socket.io-protocol/test-suite [mocha args...]
#   The suite dir must have its npm deps installed (npm ci).
#   Env: WSRELAY_BIN (default: wsrelay on PATH), LOGDIR (default: a new /tmp dir),
#        WSRELAY_LOG_LEVEL (default: wsrelay=debug,info), AUTH_DELAY (default 0.1 s).
# Everything listens on 127.0.0.1 (free ports picked at start). Exit code: mocha's.
set -euo pipefail

SUITE=${1:?usage: WSRELAY_BIN=... $0 /path/to/test-suite [mocha args...]}
shift
SUITE=$(cd "$SUITE" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${WSRELAY_BIN:-$(command -v wsrelay || true)}
[ -x "$BIN" ] || { echo "run.sh: set WSRELAY_BIN to the wsrelay binary" >&2; exit 2; }
[ -f "$SUITE/test-suite.js" ] || { echo "run.sh: no test-suite.js in $SUITE" >&2; exit 2; }
[ -x "$SUITE/node_modules/.bin/mocha" ] || { echo "run.sh: run 'npm ci' in $SUITE first" >&2; exit 2; }
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/wsrelay-conformance.XXXXXX)}
mkdir -p "$LOGDIR"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
PUBLIC=$(free_port); ADMIN=$(free_port); APP=$(free_port)
TOKEN=conformance-$(python3 -c 'import secrets; print(secrets.token_hex(8))')

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

wait_http() { # url, what
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "run.sh: $2 did not come up ($1); logs in $LOGDIR" >&2
  exit 3
}

python3 "$HERE/hookapp.py" --listen "127.0.0.1:$APP" --admin "http://127.0.0.1:$ADMIN" \
  --token "$TOKEN" --auth-delay "${AUTH_DELAY:-0.1}" 2>"$LOGDIR/hookapp.log" &
PIDS+=($!)
wait_http "http://127.0.0.1:$APP/healthz" "hook app"

# pingTimeout = --idle-timeout - --ping-interval = 200 ms (the suite's PING_TIMEOUT);
# --handshake-timeout 1s plays Socket.IO's connectTimeout: 1000.
"$BIN" \
  --listen "127.0.0.1:$PUBLIC" \
  --admin-listen "127.0.0.1:$ADMIN" \
  --api-token "$TOKEN" \
  --upstream "http://127.0.0.1:$APP" \
  --socketio-path /socket.io/ \
  --ping-interval 300ms \
  --idle-timeout 500ms \
  --handshake-timeout 1s \
  --socketio-recovery-window 0s \
  --connect-hook /hooks/connect \
  --message-hook /hooks/message \
  --disconnect-hook /hooks/disconnect \
  --log-level "${WSRELAY_LOG_LEVEL:-wsrelay=debug,info}" \
  >"$LOGDIR/wsrelay.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$ADMIN/healthz" "wsrelay"

# The suite hardcodes http://localhost:3000: run a copy that reads SIO_URL
# (127.0.0.1, not localhost, which Node may resolve to ::1).
PATCHED="$SUITE/test-suite.wsrelay.js"
sed 's#^const URL = "http://localhost:3000";#const URL = (typeof process !== "undefined" \&\& process.env.SIO_URL) || "http://localhost:3000";#' \
  "$SUITE/test-suite.js" >"$PATCHED"
grep -q 'process.env.SIO_URL' "$PATCHED" || { echo "run.sh: could not patch the suite's URL" >&2; exit 2; }

echo "wsrelay: $BIN  public 127.0.0.1:$PUBLIC  admin 127.0.0.1:$ADMIN  hook app 127.0.0.1:$APP  logs $LOGDIR"
set +e
(cd "$SUITE" && SIO_URL="http://127.0.0.1:$PUBLIC" ./node_modules/.bin/mocha --reporter spec "$@" test-suite.wsrelay.js) \
  2>&1 | tee "$LOGDIR/mocha.log"
rc=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^ +[0-9]+ passing' "$LOGDIR/mocha.log" | grep -Eo '[0-9]+' || echo 0)
failed=$(grep -Eo '^ +[0-9]+ failing' "$LOGDIR/mocha.log" | grep -Eo '[0-9]+' || echo 0)
echo "conformance: $passed passed, $failed failed (logs in $LOGDIR)"
exit "$rc"
