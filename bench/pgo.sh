#!/usr/bin/env bash
# Writes build/opsgate.profdata, the profile release builds are optimized by (see
# build/rustc-pgo.sh), and build/opsgate.profdata.llvm, the LLVM version that wrote it.
#
# How: an instrumented release build of opsgate (`-Cprofile-generate`) runs in front of
# an nginx backend and serves what a sidecar serves, each under load from wrk:
#   - the bench's policy config (breaker, retry, metrics, access log) on one worker
#     thread, the runtime a sidecar with one CPU runs (and the benchmarks): GETs of
#     13 B, 16 KiB and 1 MiB bodies, POSTs with a body, and requests rejected by a
#     forced-open breaker; then the mixed client of bench/symbol-order.sh (probes,
#     scrapes, admin calls, maintenance 503s on fresh connections);
#   - the same config on two worker threads (tokio's multi-threaded scheduler): GETs;
#   - maintenance for every method (bench/conf/opsgate-maintenance.toml), one worker:
#     every request a 503 from the sidecar itself.
# The compiler optimizes what ran for speed and the rest for size, so what the profile
# leaves out runs slower: the runtime of the other thread count, for one.
# Each process writes its counts when it stops; llvm-profdata (rustup's llvm-tools,
# added when missing) merges them.
#
# Run it after changes to the hot path or to dependencies, then bench/symbol-order.sh
# (its list names the functions of the optimized build). A stale profile costs speed,
# never correctness: the compiler skips functions whose code changed since.
# ci/check-docker-steps.sh fails when one of them is code the recorded requests ran.
#
# Environment: SECONDS_EACH [4] (length of each wrk run), BASE_PORT [28750],
#   PGO_TARGET_DIR [target/pgo-gen] (so target/release is not touched).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SECONDS_EACH="${SECONDS_EACH:-4}"
BASE_PORT="${BASE_PORT:-28750}"
PGO_TARGET_DIR="${PGO_TARGET_DIR:-$REPO/target/pgo-gen}"
PROFILE="$REPO/build/opsgate.profdata"

log() { echo "[pgo] $*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

for tool in nginx wrk python3 curl; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
find_llvm_profdata || die "llvm-tools could not be added"
LLVM_MAJOR=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')

log "instrumented release build into $PGO_TARGET_DIR"
# RUSTFLAGS replaces the profile build/rustc-pgo.sh would add; the counts go where
# LLVM_PROFILE_FILE says at run time.
(cd "$REPO" && OPSGATE_NO_SYMBOL_ORDER=1 RUSTFLAGS="-Cprofile-generate=$PGO_TARGET_DIR/profraw" \
    CARGO_TARGET_DIR="$PGO_TARGET_DIR" cargo build --release --locked --quiet) || die "build failed"
BIN="$PGO_TARGET_DIR/release/opsgate"

# Up to 10 s to stop: an instrumented process writes its counts as it exits.
start_run pgo 10

start_tiny_backend "$RUN" || die "backend did not start"
write_bodies "$RUN/data"

# template workers: starts opsgate from it; sets PORT, ADMIN, PID.
start_opsgate() {
    local tpl=$1 workers=$2 name
    name=$(basename "$tpl" .toml)-$workers
    alloc_port; PORT=$ALLOCATED
    alloc_port; ADMIN=$ALLOCATED
    render "$tpl" "$RUN/$name.toml" PORT="$PORT" BACKEND_PORT="$BACKEND_PORT" ADMIN_PORT="$ADMIN" \
        ACCESS_LOG=true
    LLVM_PROFILE_FILE="$RUN/profraw/$name-%p.profraw" TOKIO_WORKER_THREADS=$workers \
        "$BIN" run --config "$RUN/$name.toml" >"$RUN/$name.out" 2>"$RUN/$name.err" &
    PID=$!
    PIDS+=("$PID")
    wait_http "http://127.0.0.1:$ADMIN/_health/live" 30 200 || die "opsgate did not start (see $RUN/$name.err)"
}

# Stops opsgate gracefully: the counts are written as the process exits.
stop_opsgate() {
    kill -TERM "$PID"
    wait "$PID" 2>/dev/null || true
}

# url [connections] [lua script]: one wrk run of SECONDS_EACH.
load() {
    local summary
    summary=$(wrk_load "$1" "${2:-32}" "$SECONDS_EACH" "${3:-}") || die "load failed"
    log "$summary"
}

cat >"$RUN/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 512)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

start_opsgate "$HERE/conf/opsgate-policy.toml" 1
load "http://127.0.0.1:$PORT/tiny"
load "http://127.0.0.1:$PORT/16k"
load "http://127.0.0.1:$PORT/1m" 8
load "http://127.0.0.1:$PORT/tiny" 32 "$RUN/post.lua"
curl -fsS -X POST -o /dev/null "http://127.0.0.1:$ADMIN/_ops/breakers/app/open" || die "breaker open failed"
load "http://127.0.0.1:$PORT/tiny"
curl -fsS -X POST -o /dev/null "http://127.0.0.1:$ADMIN/_ops/breakers/app/close" || die "breaker close failed"
write_mix_client "$RUN/mix.py"
python3 "$RUN/mix.py" "$PORT" "$ADMIN" 2000 || die "mixed requests failed"
stop_opsgate

start_opsgate "$HERE/conf/opsgate-policy.toml" 2
load "http://127.0.0.1:$PORT/tiny"
load "http://127.0.0.1:$PORT/16k"
stop_opsgate

start_opsgate "$HERE/conf/opsgate-maintenance.toml" 1
load "http://127.0.0.1:$PORT/tiny"
stop_opsgate

shopt -s nullglob
raw=("$RUN"/profraw/*.profraw)
((${#raw[@]} == 3)) || die "expected 3 profiles, found ${#raw[@]} (see $RUN/*.err)"
"$LLVM_PROFDATA" merge -o "$PROFILE" "${raw[@]}" || die "merge failed"
echo "$LLVM_MAJOR" >"$PROFILE.llvm"
# Cargo cannot tell that a crate's profile changed: the release build is cleaned, so the
# next one compiles every crate with the new profile.
(cd "$REPO" && cargo clean --release --quiet)
log "cleaned the release build: the next one compiles every crate with the new profile"
log "$PROFILE: $(stat -c %s "$PROFILE") bytes, LLVM $LLVM_MAJOR"
