#!/usr/bin/env bash
# Template (bench/run.sh placeholders) of bench/conf/opsgate.toml plus N health
# checks at INTERVAL, a quarter of each kind: tcp and http against the
# benchmark backend, redis against REDIS_URL, postgres against POSTGRES_URL.
# Usage: bench/gen-checks.sh N INTERVAL > template.toml
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
n=${1:?n} interval=${2:?interval}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
pg=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cat "$here/conf/opsgate.toml"
printf '\n[health]\ninterval = "%s"\ntimeout = "3s"\n' "$interval"
for ((i = 0; i < n; i++)); do
    case $((i % 4)) in
        0) printf '\n[[health.checks]]\nname = "tcp%03d"\ntype = "tcp"\naddress = "127.0.0.1:@BACKEND_PORT@"\n' "$i" ;;
        1) printf '\n[[health.checks]]\nname = "http%03d"\ntype = "http"\nurl = "http://127.0.0.1:@BACKEND_PORT@/tiny"\n' "$i" ;;
        2) printf '\n[[health.checks]]\nname = "redis%03d"\ntype = "redis"\nurl = "%s"\ncritical = false\n' "$i" "$redis" ;;
        3) printf '\n[[health.checks]]\nname = "pg%03d"\ntype = "postgres"\nurl = "%s"\n' "$i" "$pg" ;;
    esac
done
