#!/usr/bin/env bash
# The data a request touches: how many distinct cache lines, where (stack,
# heap, the binary's data), and how far that is from fitting in an L1d.
# Each target runs under valgrind's lackey, which traces every memory access,
# in front of the same nginx backend as bench/callgrind.sh; one keep-alive
# connection sends WARMUP_REQUESTS, then the trace is kept for exactly
# REQUESTS more (the window opens and closes while the proxy is idle), and
# bench/footprint.py reports per request. Deterministic like callgrind, and
# the reason instruction counts alone do not predict CPU time: a request whose
# data does not fit in L1d pays a miss for every line that fell out.
#
# Usage: bench/footprint.sh
#
# Environment (defaults in brackets):
#   REQUESTS [100]          requests in the traced window (lackey writes ~50 MB each)
#   WARMUP_REQUESTS [300]
#   TARGETS ["opsgate hyper"]  opsgate, opsgate-nolog (access log off), hyper (the
#                           bare hyper proxy of bench/bare-hyper, built here)
#   OPSGATE_CONFIG [bench/conf/opsgate-policy.toml]
#   OPSGATE_BIN             opsgate binary; unset: the release build with symbols of
#                           bench/callgrind.sh, built into CALLGRIND_TARGET_DIR
#   CALLGRIND_TARGET_DIR [target/callgrind]
#   BASE_PORT [28700]
#   OUT_DIR [bench/out/footprint-<timestamp>]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

REQUESTS="${REQUESTS:-100}"
WARMUP_REQUESTS="${WARMUP_REQUESTS:-300}"
TARGETS="${TARGETS:-opsgate hyper}"
OPSGATE_CONFIG="${OPSGATE_CONFIG:-$HERE/conf/opsgate-policy.toml}"
CALLGRIND_TARGET_DIR="${CALLGRIND_TARGET_DIR:-$REPO/target/callgrind}"
BASE_PORT="${BASE_PORT:-28700}"
OUT_DIR="${OUT_DIR:-$REPO/bench/out/footprint-$(date +%Y%m%d-%H%M%S)}"

log() { printf '[footprint] %s\n' "$*" >&2; }
die() { printf '[footprint] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"
for tool in valgrind nginx curl python3 nm; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install valgrind nginx curl python3 binutils)"
done

if [[ -z "${OPSGATE_BIN:-}" ]]; then
    log "cargo build --release with symbols into $CALLGRIND_TARGET_DIR"
    OPSGATE_BIN=$(build_with_symbols "$CALLGRIND_TARGET_DIR") || die "cargo build --release failed"
fi
# shellcheck disable=SC2086 # one target per word
build_bare_hyper $TARGETS || die "bench/bare-hyper did not build"

start_run footprint
mkdir -p "$OUT_DIR"

write_tiny_client "$RUN/client.py"
start_tiny_backend "$RUN" || die "backend did not start (see $RUN/backend)"

# Until the collector has seen the flag: it looks while the proxy is idle.
await_flag() {
    local f=$1 deadline=$((SECONDS + 60))
    while [[ ! -e $f ]]; do
        ((SECONDS < deadline)) || die "the trace collector did not answer ($f)"
        sleep 0.1
    done
}

report_args=()
for t in $TARGETS; do
    dir="$RUN/$t"
    mkdir -p "$dir/conf" "$dir/flags"
    alloc_port; port=$ALLOCATED
    case $t in
        opsgate|opsgate-nolog)
            al=true; [[ $t == opsgate-nolog ]] && al=false
            alloc_port; admin=$ALLOCATED
            # Its own directory: the log next to the config would wake the config watcher.
            render "$OPSGATE_CONFIG" "$dir/conf/opsgate.toml" PORT="$port" BACKEND_PORT="$BACKEND_PORT" \
                ADMIN_PORT="$admin" ACCESS_LOG="$al"
            bin=$dir/opsgate.bin; cp "$OPSGATE_BIN" "$bin"
            cmd=("$bin" run --config "$dir/conf/opsgate.toml") ;;
        hyper)
            bin=$dir/bare-hyper.bin; cp "$BARE_HYPER_BIN" "$bin"
            cmd=("$bin" "127.0.0.1:$port" "127.0.0.1:$BACKEND_PORT") ;;
        *) die "unknown target $t" ;;
    esac
    log "$t: $WARMUP_REQUESTS warm-up + $REQUESTS traced requests under lackey"
    mkfifo "$dir/trace"
    python3 "$HERE/footprint.py" collect "$dir/flags" "$dir/trace.pkl" <"$dir/trace" 2>"$dir/collect.log" &
    collector=$!
    PIDS+=("$collector")
    TOKIO_WORKER_THREADS=1 OPSGATE_LOG=info BARE_RUNTIME=current \
        valgrind --tool=lackey --trace-mem=yes --log-file="$dir/trace" "${cmd[@]}" \
        >"$dir/stdout.log" 2>"$dir/stderr.log" &
    pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$port/tiny" 300 200 || die "$t did not start under lackey (see $dir/stderr.log)"
    python3 "$RUN/client.py" "$port" "$WARMUP_REQUESTS" || die "$t: warm-up failed"
    touch "$dir/flags/go"; await_flag "$dir/flags/opened"
    python3 "$RUN/client.py" "$port" "$REQUESTS" || die "$t: traced run failed"
    cp "/proc/$pid/maps" "$dir/maps"
    touch "$dir/flags/stop"; await_flag "$dir/flags/done"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    wait "$collector" || die "$t: the trace collector failed (see $dir/collect.log)"
    # The binary keeps its name: the report finds it in the process's maps by it.
    mkdir -p "$OUT_DIR/$t"
    cp "$dir/trace.pkl" "$dir/maps" "$bin" "$OUT_DIR/$t/"
    report_args+=("$t" "$OUT_DIR/$t/$(basename "$bin")" "$REQUESTS" "$OUT_DIR/$t/trace.pkl" "$OUT_DIR/$t/maps")
done

{
    echo "date: $(date -Is)"
    echo "host: $(uname -srm), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "params: REQUESTS=$REQUESTS WARMUP_REQUESTS=$WARMUP_REQUESTS TARGETS='$TARGETS' config $(basename "$OPSGATE_CONFIG")"
    echo
    python3 "$HERE/footprint.py" report "${report_args[@]}"
} | tee "$OUT_DIR/summary.md"
log "results in $OUT_DIR"
