#!/usr/bin/env bash
# Builds the bare hyper proxy with a profile of its own, as bench/pgo.sh does for opsgate,
# into target/bare-hyper-pgo, and prints the binary's path (build output goes to stderr).
# The question it answers: how much of opsgate's lead over the bare proxy is the profile.
# An instrumented build serves what the bare proxy can serve, GETs of 13 B, 16 KiB and
# 1 MiB from the bench's nginx backend under wrk, one worker, then exits on SIGTERM and
# writes its counts; rustup's llvm-profdata merges them. The profile stays in the target
# dir: it is a benchmark's, rebuilt when asked.
#
# Environment: SECONDS_EACH [4] (length of each wrk run), BASE_PORT [28800].
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="$REPO/target/bare-hyper-pgo"
SECONDS_EACH="${SECONDS_EACH:-4}"
BASE_PORT="${BASE_PORT:-28800}"

log() { echo "[bare-hyper-pgo] $*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=bench/lib.sh
source "$HERE/../lib.sh"

for tool in nginx wrk curl; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
find_llvm_profdata || die "llvm-tools could not be added"

# OPSGATE_NO_PGO: opsgate's rustc wrapper (this crate lives under its .cargo/) stays out.
build() { # target dir, RUSTFLAGS
    (cd "$HERE" && OPSGATE_NO_PGO=1 RUSTFLAGS="$2" CARGO_TARGET_DIR="$1" \
        cargo build --release --locked --quiet) >&2 || die "build failed"
}

log "instrumented build into $OUT/gen"
rm -rf "$OUT/profraw"
build "$OUT/gen" "-Cprofile-generate=$OUT/profraw"

start_run bare-hyper-pgo 10
start_tiny_backend "$RUN" || die "backend did not start"
write_bodies "$RUN/data"
alloc_port; port=$ALLOCATED
LLVM_PROFILE_FILE="$OUT/profraw/bare-%p.profraw" TOKIO_WORKER_THREADS=1 \
    "$OUT/gen/release/bare-hyper" "127.0.0.1:$port" "127.0.0.1:$BACKEND_PORT" 2>"$RUN/proxy.log" &
pid=$!
PIDS+=("$pid")
wait_http "http://127.0.0.1:$port/tiny" 10 200 || die "the instrumented proxy did not start"
for path in tiny 16k 1m; do
    summary=$(wrk_load "http://127.0.0.1:$port/$path" 32 "$SECONDS_EACH") || die "load failed"
    log "$summary"
done
# It writes its counts as it exits.
kill -TERM "$pid"
wait "$pid" || die "the instrumented proxy did not end cleanly on SIGTERM (see $RUN/proxy.log)"
compgen -G "$OUT/profraw/*.profraw" >/dev/null || die "no counts written"

"$LLVM_PROFDATA" merge -o "$OUT/bare.profdata" "$OUT"/profraw/*.profraw >&2
log "profile $OUT/bare.profdata; optimized build into $OUT"
# Cargo cannot tell that the profile changed (the flags read the same): build afresh.
rm -rf "$OUT/release"
build "$OUT" "-Cprofile-use=$OUT/bare.profdata -Cllvm-args=-no-pgo-warn-mismatch"
echo "$OUT/release/bare-hyper"
