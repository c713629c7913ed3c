#!/usr/bin/env bash
# Interop suite: the real opsgate binary between third-party clients and servers
# (grpcio, hypercorn, gunicorn + psycopg2 + PostgreSQL, Prometheus, curl, websockets).
#
#   bash ci/interop.sh                       # builds target/debug/opsgate first
#   OPSGATE_BIN=path/to/opsgate bash ci/interop.sh [pytest args, e.g. -k grpc]
#
# Installs what it needs when missing, and only then:
#   apt: curl, prometheus, postgresql (initdb and postgres for throwaway clusters),
#        python3 and python3-venv
#   pip: tests/interop/requirements.txt (pinned) into a venv, $target/interop-venv
#        (INTEROP_VENV=path to use another), rebuilt when the requirements change
# Every server runs on 127.0.0.1 on a port the OS picks; all are stopped at the end.
# Exit status: pytest's, except that "no tests collected" (5) is a failure too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$ROOT/$target" ;; esac
VENV="${INTEROP_VENV:-$target/interop-venv}"
REQS="$ROOT/tests/interop/requirements.txt"

log() { printf 'interop: %s\n' "$*" >&2; }

PY=/usr/bin/python3
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x "$PY" ] || need+=(python3)
{ [ -x "$PY" ] && "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; } || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    log "installing: ${need[*]}"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The venv is reused while the requirements and the interpreter stay the same.
stamp="$(sha256sum "$REQS" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.interop-stamp" 2>/dev/null)" != "$stamp" ]; then
    log "creating $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQS"
    echo "$stamp" >"$VENV/.interop-stamp"
fi

if [ -z "${OPSGATE_BIN:-}" ]; then
    log "building target/debug/opsgate"
    cargo build --locked --bin opsgate
    OPSGATE_BIN="$target/debug/opsgate"
fi
case "$OPSGATE_BIN" in /*) ;; *) OPSGATE_BIN="$ROOT/$OPSGATE_BIN" ;; esac
[ -x "$OPSGATE_BIN" ] || { log "no executable at OPSGATE_BIN=$OPSGATE_BIN"; exit 1; }
export OPSGATE_BIN

set +e
"$VENV/bin/python" -m pytest -c "$ROOT/tests/interop/pytest.ini" "$ROOT/tests/interop" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    log "pytest collected no tests: that is a failure"
    exit 1
fi
exit "$rc"
