#!/usr/bin/env bash
# Chaos soak: steady wrk load through opsgate for 10 minutes while its config is
# reloaded (valid and invalid), its upstream killed and restarted, the network to
# the upstream delayed, stalled, reset, blackholed and partitioned, Redis and
# PostgreSQL killed and restarted, SIGHUP sent in bursts, and finally SIGTERM under
# load. Every request is accounted for; exit 0 only when every criterion passes.
# What it does and how to read the figures: docs/soak.md.
#
# Usage: bench/soak.sh            # full run, 600 s, release binary
#        bench/soak.sh --short    # 60 s (CI), debug binary
#
# Environment (defaults in brackets):
#   SOAK_SECONDS [600, 60 with --short]   length of the load before the final SIGTERM
#   SOAK_CONNS [4]       wrk connections, one per wrk thread
#   SOAK_DELAY_MS [10]   pause between two requests of one connection
#   OPSGATE_BIN          opsgate binary; unset: built with cargo (release for the full
#                        run, nice'd; debug for --short)
#   SOAK_OUT [bench/out/soak-<timestamp>]  logs, per-request records and report.json
#
# Needs root (a network namespace and a veth pair; PostgreSQL runs as `postgres`),
# wrk (installed with apt-get when missing), redis-server, PostgreSQL binaries,
# python3. Only 127.0.0.1 and the namespace's private /30 are used.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

short=0
for arg in "$@"; do
    case "$arg" in
        --short) short=1 ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
if [[ "$short" == 1 ]]; then
    SOAK_SECONDS="${SOAK_SECONDS:-60}"
else
    SOAK_SECONDS="${SOAK_SECONDS:-600}"
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bench/soak.sh needs root (ip netns, veth, PostgreSQL as the postgres user)" >&2
    exit 2
fi
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [[ "${#need[@]}" -gt 0 ]]; then
    echo "installing: ${need[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [[ -z "${OPSGATE_BIN:-}" ]]; then
    target="${CARGO_TARGET_DIR:-$REPO/target}"
    if [[ "$short" == 1 ]]; then
        # Built as the integration tests build it (same features), so after the test
        # suite in CI this is a no-op rather than a second build of the dependencies.
        (cd "$REPO" && cargo test --locked --quiet --no-run --test it)
        OPSGATE_BIN="$target/debug/opsgate"
    else
        (cd "$REPO" && nice -n 19 cargo build --locked --quiet --release --bin opsgate)
        OPSGATE_BIN="$target/release/opsgate"
    fi
fi

# The accounting must see a lost request as lost before its verdict means anything.
(cd "$HERE/soak" && PYTHONDONTWRITEBYTECODE=1 python3 -m unittest -q test_soak)

OUT="${SOAK_OUT:-$REPO/bench/out/soak-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
# A rebuild during the run must not change the binary under test.
cp "$OPSGATE_BIN" "$OUT/opsgate"
OPSGATE_BIN="$OUT/opsgate"

# soak.py cleans up after itself; this catches what it cannot (killed hard).
tag="$$"
cleanup() {
    ip netns del "opsgate-soak-$tag" 2>/dev/null || true
    ip link del "sk${tag}a" 2>/dev/null || true
}
trap cleanup EXIT

python3 "$HERE/soak/soak.py" --bin "$OPSGATE_BIN" --seconds "$SOAK_SECONDS" \
    --conns "${SOAK_CONNS:-4}" --delay-ms "${SOAK_DELAY_MS:-10}" --out "$OUT" --tag "$tag"
