#!/usr/bin/env bash
# Real-browser check of the admin status page (GET /_ops/) in headless Chromium.
#
#   OPSGATE_BIN=target/debug/opsgate bash ci/check-status-page.sh
#
# Builds nothing: OPSGATE_BIN (default target/debug/opsgate) must exist.
# Installs what it needs when missing (and only then):
#   apt: chromium                 (CHROMIUM=path to use another binary)
#   npm: tests/browser (`npm ci`, versions pinned by package-lock.json)
# Needs python3 and Node.js >= 20.
#
# Starts, on free 127.0.0.1 ports and all of them torn down on exit:
#   - an HTTP upstream (python3 http.server over a temp dir)    -> upstream "app", route "/"
#   - a TCP listener standing in for a dependency               -> tcp check "queue"
#   - opsgate with an admin token, plus upstream "payments" on a port where
#     nothing listens, behind a breaker with failure_threshold = 1 (route "/payments")
# then runs tests/browser/status-page.mjs, which signs in through the page's token
# prompt, kills the TCP listener and trips the breaker, and expects the page to follow
# both without a reload. Screenshot: target/status-page.png (SCREENSHOT=path to change).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OPSGATE_BIN="${OPSGATE_BIN:-target/debug/opsgate}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
SCREENSHOT="${SCREENSHOT:-$ROOT/target/status-page.png}"
WAIT_S=10

log() { printf 'check-status-page: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
[ -x "$OPSGATE_BIN" ] || die "no opsgate binary at $OPSGATE_BIN (build it first, or set OPSGATE_BIN)"
command -v python3 >/dev/null || die "python3 is required"
# The Node.js ci/install-test-deps.sh installs when the system's is missing or too old.
NODE_BIN="${OPSGATE_CI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/opsgate-ci}/node-bin"
if [ -x "$NODE_BIN/node" ] && ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null; then
    PATH="$NODE_BIN:$PATH"
fi
command -v node >/dev/null || die "Node.js >= 20 is required (node not found; bash ci/install-test-deps.sh installs it)"
node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' \
    || die "Node.js >= 20 is required (found $(node --version))"

if [ ! -x "$CHROMIUM" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing (apt): chromium"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } \
        >"$TMP/apt.log" 2>&1 || { cat "$TMP/apt.log" >&2; die "could not install chromium"; }
    [ -x "$CHROMIUM" ] || die "chromium installed but $CHROMIUM is missing (set CHROMIUM)"
fi

# Reinstalled when node_modules is missing or was installed from another lock file.
STAMP=tests/browser/node_modules/.opsgate-lock
if ! cmp -s tests/browser/package-lock.json "$STAMP" 2>/dev/null; then
    log "installing (npm ci): tests/browser"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error) >"$TMP/npm.log" 2>&1 \
        || { cat "$TMP/npm.log" >&2; die "npm ci failed"; }
    cp tests/browser/package-lock.json "$STAMP"
fi

# ---------------------------------------------------------------- processes
# Five distinct free ports, all held open at once while choosing so none repeats.
read -r P_PROXY P_ADMIN P_APP P_TCP P_DEAD < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')

mkdir -p "$TMP/www"
printf '<!doctype html><title>app</title>ok\n' >"$TMP/www/index.html"
python3 -m http.server "$P_APP" --bind 127.0.0.1 --directory "$TMP/www" >"$TMP/app.log" 2>&1 &
PIDS+=($!)

python3 -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
while True:
    c, _ = s.accept()
    c.close()
' "$P_TCP" >"$TMP/tcp.log" 2>&1 &
TCP_PID=$!
PIDS+=("$TCP_PID")

TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
cat >"$TMP/opsgate.toml" <<EOF
[proxy]
listen = "127.0.0.1:$P_PROXY"
access_log = false

[admin]
listen = "127.0.0.1:$P_ADMIN"
token = "\${STATUS_PAGE_TOKEN}"

[upstreams.app]
url = "http://127.0.0.1:$P_APP"

[upstreams.app.breaker]
failure_threshold = 5

[upstreams.payments]
url = "http://127.0.0.1:$P_DEAD"
connect_timeout = "500ms"

[upstreams.payments.breaker]
failure_threshold = 1
recovery_timeout = "5m"

[[routes]]
name = "payments"
prefix = "/payments"
upstream = "payments"

[[routes]]
name = "default"
prefix = "/"
upstream = "app"

[health]
interval = "500ms"
timeout = "400ms"

[[health.checks]]
name = "app"
type = "http"
url = "http://127.0.0.1:$P_APP/"

[[health.checks]]
name = "queue"
type = "tcp"
address = "127.0.0.1:$P_TCP"
EOF

STATUS_PAGE_TOKEN="$TOKEN" "$OPSGATE_BIN" run --config "$TMP/opsgate.toml" >"$TMP/opsgate.log" 2>&1 &
PIDS+=($!)

# Bounded wait until the admin API answers with the token.
if ! python3 - "$P_ADMIN" "$TOKEN" "$WAIT_S" <<'EOF'
import sys, time, urllib.request
port, token, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/_ops/status",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit(1)
EOF
then
    cat "$TMP/opsgate.log" >&2
    die "opsgate admin API not up within ${WAIT_S}s"
fi

# ---------------------------------------------------------------- the test
mkdir -p "$(dirname "$SCREENSHOT")"
start=$(date +%s)
rc=0
ADMIN_URL="http://127.0.0.1:$P_ADMIN" PROXY_URL="http://127.0.0.1:$P_PROXY" \
ADMIN_TOKEN="$TOKEN" TCP_PID="$TCP_PID" CHROMIUM="$CHROMIUM" SCREENSHOT="$SCREENSHOT" \
WAIT_MS="$((WAIT_S * 1000))" \
    timeout 120 node tests/browser/status-page.mjs || rc=$?
if [ "$rc" -ne 0 ]; then
    log "opsgate log:"
    tail -n 40 "$TMP/opsgate.log" >&2
    die "FAILED (exit $rc)"
fi
log "passed in $(( $(date +%s) - start ))s"
