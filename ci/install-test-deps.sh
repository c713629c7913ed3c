#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine, and only what is missing:
# redis-server and PostgreSQL binaries (throwaway servers for outage tests), openssl
# (test certificates),
# promtool (metrics lint), and makes sure the local PostgreSQL and Redis run.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ "${#need[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing: ${need[*]}" >&2
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The health tests talk to a PostgreSQL on 127.0.0.1:5432 and a Redis on 127.0.0.1:6379.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 6379; then
    echo "starting redis-server on 127.0.0.1:6379" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no >/dev/null
fi
if ! port_open 5432; then
    echo "starting PostgreSQL on 127.0.0.1:5432" >&2
    if command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql/*/main >/dev/null 2>&1; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
fi
for _ in $(seq 1 50); do
    port_open 5432 && port_open 6379 && exit 0
    sleep 0.1
done
echo "warning: PostgreSQL or Redis is not reachable on 127.0.0.1; their tests will fail" >&2
