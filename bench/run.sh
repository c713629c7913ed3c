#!/usr/bin/env bash
# Reverse-proxy benchmark: opsgate against nginx, HAProxy and the bare backend.
#
# Layout (2+ cores): backend (nginx) and load generator pinned to BACKEND_CPU /
# LOAD_CPU (core 0), each proxy alone on PROXY_CPU (core 1) with one worker.
# Every target is driven in turn (A B C D ... A B C D ...) for ROUNDS rounds per
# body size, so a slow phase of the machine hits all of them alike. Everything
# binds 127.0.0.1 and is stopped on exit.
#
# Usage: bench/run.sh            # full run (~8 min)
#        QUICK=1 bench/run.sh    # smoke check (< 1 min)
#
# Environment (defaults in brackets):
#   ROUNDS [3]          rounds per body size
#   DURATION [5s]       wrk duration per run
#   CONNS [32]          connections (wrk and the fixed-rate client)
#   THREADS [1]         wrk threads
#   WARMUP [1s]         wrk warm-up per target and size before round 1 (0 = none)
#   SIZES ["tiny 16k 1m"]
#   TARGETS ["direct nginx haproxy hyper opsgate opsgate-nolog"]; `hyper` is the
#                       bare hyper proxy of bench/bare-hyper (built here when named),
#                       `hyper-mt` the same on tokio's multi-threaded runtime, one worker,
#                       `hyper-503` the same answering every request 503 itself,
#                       `hyper-pgo` the same built with a profile of its own
#                       (bench/bare-hyper/pgo.sh, about a minute)
#   RATE [2000]         fixed-rate run: requests per second (0 = skip)
#   FIXED_DURATION [5s] fixed-rate run duration
#   FIXED_SIZES ["tiny 16k"]
#   OPSGATE_ACCESS_LOG [true]  access log of every opsgate target but opsgate-nolog
#   METHOD [GET]        request method of the measured runs (e.g. POST; no body)
#   OPSGATE_VARIANTS    extra opsgate targets, "name=template.toml ...": each runs
#                       as target "opsgate-<name>" from a template with the same
#                       placeholders as bench/conf/opsgate.toml; "name=template.toml@BIN"
#                       runs another opsgate binary (A/B of two builds in one run)
#   SETUP_HOOK          shell command run once every target is up, before the idle
#                       window; $BENCH_PORTS names a file of "target port admin_port pid",
#                       $BENCH_OUT the result directory
#   IDLE [2s]           idle window before any load: each proxy's idle CPU and RSS
#   OPSGATE_BIN         opsgate binary; unset: `cargo build --release` and use
#                       ${CARGO_TARGET_DIR:-target}/release/opsgate
#   BASE_PORT [28400]   first port tried; busy ports are skipped
#   BACKEND_CPU [0]  LOAD_CPU [0]  PROXY_CPU [1]
#   INSTALL_OHA [1]     `cargo install oha` when missing (~5 min once; not in QUICK)
#   OUT_DIR [bench/out/<timestamp>]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    ROUNDS="${ROUNDS:-1}"
    DURATION="${DURATION:-2s}"
    WARMUP="${WARMUP:-0}"
    FIXED_DURATION="${FIXED_DURATION:-2s}"
    FIXED_SIZES="${FIXED_SIZES:-tiny}"
    INSTALL_OHA="${INSTALL_OHA:-0}"
    IDLE="${IDLE:-1s}"
fi
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5s}"
CONNS="${CONNS:-32}"
THREADS="${THREADS:-1}"
WARMUP="${WARMUP:-1s}"
SIZES="${SIZES:-tiny 16k 1m}"
TARGETS="${TARGETS:-direct nginx haproxy hyper opsgate opsgate-nolog}"
RATE="${RATE:-2000}"
FIXED_DURATION="${FIXED_DURATION:-5s}"
FIXED_SIZES="${FIXED_SIZES:-tiny 16k}"
BASE_PORT="${BASE_PORT:-28400}"
BACKEND_CPU="${BACKEND_CPU:-0}"
LOAD_CPU="${LOAD_CPU:-0}"
PROXY_CPU="${PROXY_CPU:-1}"
INSTALL_OHA="${INSTALL_OHA:-1}"
OPSGATE_VARIANTS="${OPSGATE_VARIANTS:-}"
METHOD="${METHOD:-GET}"
export WRK_METHOD="$METHOD"   # read by bench/wrk-report.lua
IDLE="${IDLE:-2s}"
OUT_DIR="${OUT_DIR:-$REPO/bench/out/$(date +%Y%m%d-%H%M%S)}"
declare -A VARIANT_TPL=() VARIANT_BIN=()
for v in $OPSGATE_VARIANTS; do
    [[ $v == *=* ]] || die "OPSGATE_VARIANTS entry '$v' is not name=template"
    tpl=${v#*=}
    if [[ $tpl == *@* ]]; then
        bin=${tpl#*@}; tpl=${tpl%%@*}
        [[ -x $bin ]] || die "no opsgate binary at $bin"
        VARIANT_BIN[opsgate-${v%%=*}]=$bin
    fi
    [[ $tpl == /* ]] || tpl="$PWD/$tpl"
    [[ -f $tpl ]] || die "no such template: $tpl"
    VARIANT_TPL[opsgate-${v%%=*}]=$tpl
    TARGETS="$TARGETS opsgate-${v%%=*}"
done

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- tools
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

ensure_packages() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # Debian's postinst may try to start the system services; keep them down.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

ensure_oha() {
    command -v oha >/dev/null && return 0
    [[ "$RATE" != 0 && "$INSTALL_OHA" == 1 ]] || return 1
    command -v cargo >/dev/null || return 1
    log "installing oha (fixed-rate client) with cargo install; takes a few minutes once"
    timeout 900 cargo install --locked --quiet oha >/dev/null 2>&1 || return 1
    command -v oha >/dev/null
}

ensure_packages
HAVE_OHA=0
if [[ "$RATE" != 0 ]]; then
    if ensure_oha; then HAVE_OHA=1; else log "oha not available: no fixed-rate run (closed-loop p99 only)"; fi
fi

if [[ -z "${OPSGATE_BIN:-}" ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
    OPSGATE_BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/opsgate"
fi
[[ -x "$OPSGATE_BIN" ]] || die "no opsgate binary at $OPSGATE_BIN"
# shellcheck disable=SC2086 # one target per word
build_bare_hyper $TARGETS || die "bench/bare-hyper did not build"

NCPU=$(nproc)
PINNED=1
if (( NCPU < 2 )); then
    log "warning: $NCPU CPU(s): pinning disabled, figures mean little"
    PINNED=0
fi
# pin CPU COMMAND...: run COMMAND on one core (in the foreground, or as a
# background job whose pid does not matter; see launch for the proxies).
pin() { local cpu=$1; shift; if (( PINNED )); then taskset -c "$cpu" "$@"; else "$@"; fi; }

# ---------------------------------------------------------------- state
RUN="$(mktemp -d /tmp/opsgate-bench.XXXXXX)"
chmod 755 "$RUN"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
: >"$RESULTS"
declare -a PIDS=()
declare -A PORT=() MAIN_PID=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pids 3
    # Keep the tail of every process's output (opsgate's access log can be
    # large: keep its line count and the last lines), drop the bodies.
    local d f
    mkdir -p "$OUT_DIR/logs"
    for d in "$RUN"/*/; do
        for f in "$d"*.log; do
            [[ -f "$f" ]] || continue
            { echo "# $(wc -l <"$f") lines, last 50:"; tail -n 50 "$f"; } \
                >"$OUT_DIR/logs/$(basename "$d")-$(basename "$f")"
        done
    done
    rm -rf "$RUN"
    exit "$rc"
}

trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_ticks() { # utime+stime of the pids, in clock ticks
    local t=0 pid f
    for pid in "$@"; do
        read -ra f <"/proc/$pid/stat" || continue
        # fields after the "(comm)" are shifted if comm had spaces; ours have none
        t=$((t + f[13] + f[14]))
    done
    echo "$t"
}

rss_kb() { # sum of VmRSS of the pids
    local t=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

core_ticks() { # "busy total softirq steal" ticks of one core from /proc/stat
    awk -v c="cpu$1" '$1 == c { idle = $5 + $6; tot = 0; for (i = 2; i <= 9; i++) tot += $i; print tot - idle, tot, $8, $9 }' /proc/stat
}

# ---------------------------------------------------------------- backend
DATA="$RUN/data"
mkdir -p "$DATA"
write_bodies "$DATA"
chmod 755 "$DATA"; chmod 644 "$DATA"/*

launch() { # name cpu command... -> sets MAIN_PID[name]
    local name=$1 cpu=$2; shift 2
    # taskset execs the command: $! is the proxy's own pid
    if (( PINNED )); then
        taskset -c "$cpu" "$@" >"$RUN/$name/$name.stdout.log" 2>"$RUN/$name/$name.stderr.log" &
    else
        "$@" >"$RUN/$name/$name.stdout.log" 2>"$RUN/$name/$name.stderr.log" &
    fi
    local pid=$!
    PIDS+=("$pid")
    MAIN_PID[$name]=$pid
}

# pids whose CPU and RSS count for a target: nginx's worker(s), else the process
measured_pids() {
    local name=$1 pid=${MAIN_PID[$1]}
    case $name in
        nginx|backend) pgrep -P "$pid" | tr '\n' ' ' ;;
        *) echo "$pid" ;;
    esac
}

log "run dir $RUN, results $OUT_DIR"
alloc_port; PORT[backend]=$ALLOCATED
mkdir -p "$RUN/backend/tmp"; chmod 755 "$RUN/backend"
render "$HERE/conf/backend.nginx.conf" "$RUN/backend/nginx.conf" DIR="$RUN/backend" DATA="$DATA" PORT="${PORT[backend]}"
launch backend "$BACKEND_CPU" nginx -p "$RUN/backend" -c "$RUN/backend/nginx.conf"
wait_http "http://127.0.0.1:${PORT[backend]}/tiny" || die "backend did not start (see $RUN/backend)"
PORT[direct]=${PORT[backend]}

# ---------------------------------------------------------------- proxies
cp "$OPSGATE_BIN" "$RUN/opsgate.bin"   # a rebuild elsewhere must not swap it mid-run
for t in "${!VARIANT_BIN[@]}"; do cp "${VARIANT_BIN[$t]}" "$RUN/$t.bin"; done
OPSGATE_VERSION=$("$RUN/opsgate.bin" --version 2>/dev/null || echo unknown)

for t in $TARGETS; do
    [[ $t == direct ]] && continue
    alloc_port; PORT[$t]=$ALLOCATED
    dir="$RUN/$t"; mkdir -p "$dir/tmp"; chmod 755 "$dir"
    case $t in
        nginx)
            render "$HERE/conf/proxy.nginx.conf" "$dir/nginx.conf" DIR="$dir" PORT="${PORT[$t]}" BACKEND_PORT="${PORT[backend]}"
            launch "$t" "$PROXY_CPU" nginx -p "$dir" -c "$dir/nginx.conf" ;;
        haproxy)
            render "$HERE/conf/haproxy.cfg" "$dir/haproxy.cfg" DIR="$dir" PORT="${PORT[$t]}" BACKEND_PORT="${PORT[backend]}"
            launch "$t" "$PROXY_CPU" haproxy -db -f "$dir/haproxy.cfg" ;;
        hyper|hyper-mt|hyper-503|hyper-pgo)
            bare_runtime=current; [[ $t == hyper-mt ]] && bare_runtime=multi
            bare_upstream="127.0.0.1:${PORT[backend]}"; [[ $t == hyper-503 ]] && bare_upstream=-
            bare_bin=$BARE_HYPER_BIN; [[ $t == hyper-pgo ]] && bare_bin=$BARE_HYPER_PGO_BIN
            cp "$bare_bin" "$dir/bare-hyper"
            launch "$t" "$PROXY_CPU" env BARE_RUNTIME=$bare_runtime TOKIO_WORKER_THREADS=1 \
                "$dir/bare-hyper" "127.0.0.1:${PORT[$t]}" "$bare_upstream" ;;
        opsgate|opsgate-*)
            al=${OPSGATE_ACCESS_LOG:-true}; [[ $t == opsgate-nolog ]] && al=false
            tpl="${VARIANT_TPL[$t]:-$HERE/conf/opsgate.toml}"
            alloc_port; admin=$ALLOCATED; PORT[$t-admin]=$admin
            # Its own directory: opsgate watches the config's directory, and the
            # log written next to it would wake the watcher on every write.
            mkdir -p "$dir/conf"
            render "$tpl" "$dir/conf/opsgate.toml" PORT="${PORT[$t]}" BACKEND_PORT="${PORT[backend]}" ADMIN_PORT="$admin" ACCESS_LOG="$al"
            bin="$RUN/opsgate.bin"; [[ -n ${VARIANT_BIN[$t]:-} ]] && bin="$RUN/$t.bin"
            launch "$t" "$PROXY_CPU" env TOKIO_WORKER_THREADS=1 OPSGATE_LOG=info "$bin" run --config "$dir/conf/opsgate.toml" ;;
        *) die "unknown target $t" ;;
    esac
done

for t in $TARGETS; do
    wait_http "http://127.0.0.1:${PORT[$t]}/tiny" || die "$t did not start (see $RUN/$t)"
done
BENCH_PORTS="$OUT_DIR/ports.txt"
for t in $TARGETS; do
    [[ $t == direct ]] && pid=- || pid=$(measured_pids "$t" | awk '{print $1}')
    echo "$t ${PORT[$t]} ${PORT[$t-admin]:--} ${pid:--}"
done >"$BENCH_PORTS"
if [[ -n ${SETUP_HOOK:-} ]]; then
    log "setup hook: $SETUP_HOOK"
    BENCH_PORTS="$BENCH_PORTS" BENCH_OUT="$OUT_DIR" LOAD_CPU="$LOAD_CPU" PINNED="$PINNED" \
        bash -c "$SETUP_HOOK" || die "setup hook failed"
fi

# Idle: let start-up settle, then measure each proxy's CPU over IDLE (health
# checks, timers) and its resident memory.
sleep 1
declare -A RSS_IDLE=() IDLE_C0=()
for t in $TARGETS; do
    [[ $t == direct ]] && continue
    IDLE_C0[$t]=$(cpu_ticks $(measured_pids "$t"))
done
idle_start=$(date +%s.%N)
sleep "$IDLE"
idle_secs=$(awk -v a="$idle_start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
for t in $TARGETS; do
    [[ $t == direct ]] && { RSS_IDLE[$t]=0; continue; }
    RSS_IDLE[$t]=$(rss_kb $(measured_pids "$t"))
    c=$(cpu_ticks $(measured_pids "$t"))
    printf '{"mode":"idle","target":"%s","seconds":%s,"cpu_s":%s,"cpu_pct":%s,"rss_idle_kb":%s}\n' "$t" "$idle_secs" \
        "$(awk -v c=$((c - IDLE_C0[$t])) -v hz="$(getconf CLK_TCK)" 'BEGIN { print c / hz }')" \
        "$(awk -v c=$((c - IDLE_C0[$t])) -v hz="$(getconf CLK_TCK)" -v s="$idle_secs" 'BEGIN { printf "%.3f", 100 * c / hz / s }')" \
        "${RSS_IDLE[$t]}" >>"$RESULTS"
done

# ---------------------------------------------------------------- runs
path_of() { case $1 in tiny) echo /tiny ;; 16k) echo /16k ;; 1m) echo /1m ;; *) die "unknown size $1" ;; esac; }
secs() { local d=$1; case $d in *ms) awk -v v="${d%ms}" 'BEGIN { print v / 1000 }' ;; *s) echo "${d%s}" ;; *m) echo $(( ${d%m} * 60 )) ;; *) echo "$d" ;; esac; }

# run_one mode round size target
run_one() {
    local mode=$1 round=$2 size=$3 t=$4
    local url="http://127.0.0.1:${PORT[$t]}$(path_of "$size")"
    local pids="" raw="$OUT_DIR/raw/$mode-$size-$t-r$round.txt"
    [[ $t != direct ]] && pids=$(measured_pids "$t")
    local c0 b0 tot0 si0 st0 c1 b1 tot1 si1 st1 rss_peak=0 r
    c0=$(cpu_ticks $pids); read -r b0 tot0 si0 st0 < <(core_ticks "$PROXY_CPU") || true
    local dur
    if [[ $mode == closed ]]; then
        dur=$DURATION
        pin "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 10s --latency \
            -s "$HERE/wrk-report.lua" "$url" >"$raw" 2>&1 &
    else
        dur=$FIXED_DURATION
        pin "$LOAD_CPU" oha -z "$FIXED_DURATION" -w -m "$METHOD" -q "$RATE" -c "$CONNS" --latency-correction \
            --no-tui --output-format json "$url" >"$raw" 2>"$raw.err" &
    fi
    local lp=$!
    # sample RSS a few times while the load runs
    local quarter; quarter=$(awk -v d="$(secs "$dur")" 'BEGIN { print d / 4 }')
    for _ in 1 2 3; do
        sleep "$quarter"
        [[ -n $pids ]] && { r=$(rss_kb $pids); (( r > rss_peak )) && rss_peak=$r; }
    done
    wait "$lp" || log "warning: load generator exited non-zero for $mode $size $t (see $raw)"
    c1=$(cpu_ticks $pids); read -r b1 tot1 si1 st1 < <(core_ticks "$PROXY_CPU") || true
    python3 - "$raw" "$mode" "$round" "$size" "$t" "$((c1 - c0))" "$((b1 - b0))" "$((tot1 - tot0))" \
        "$rss_peak" "${RSS_IDLE[$t]}" "$(getconf CLK_TCK)" "$((si1 - si0))" "$((st1 - st0))" >>"$RESULTS" <<'PY'
import json, sys
raw, mode, rnd, size, target, cpu, busy, tot, rss, rss_idle, hz, softirq, steal = sys.argv[1:]
cpu, busy, tot, hz, softirq, steal = int(cpu), int(busy), int(tot), int(hz), int(softirq), int(steal)
rec = dict(mode=mode, round=int(rnd), size=size, target=target)
text = open(raw).read()
if mode == "closed":
    line = next((l for l in text.splitlines() if l.startswith("JSON ")), None)
    if line is None:
        rec.update(failed=True)
    else:
        w = json.loads(line[5:])
        secs = w["duration_us"] / 1e6
        rec.update(requests=w["requests"], seconds=secs, rps=w["requests"] / secs,
                   p50_us=w["p50_us"], p99_us=w["p99_us"], p999_us=w["p999_us"], max_us=w["max_us"],
                   errors=w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"],
                   non_2xx=w["err_status"], bytes=w["bytes"])
else:
    try:
        o = json.loads(text)
        s, lp = o["summary"], o.get("latencyPercentiles", {})
        codes = o.get("statusCodeDistribution", {})
        ok = sum(v for k, v in codes.items() if k.startswith("2"))
        n = sum(codes.values())
        errs = sum(o.get("errorDistribution", {}).values())
        secs = s.get("total") or 0
        rec.update(requests=n, seconds=secs, rps=s.get("requestsPerSec"),
                   p50_us=(lp.get("p50") or 0) * 1e6, p99_us=(lp.get("p99") or 0) * 1e6,
                   p999_us=(lp.get("p99.9") or 0) * 1e6, max_us=(s.get("slowest") or 0) * 1e6,
                   errors=errs, non_2xx=n - ok)
    except Exception as e:  # keep going; the raw file tells what happened
        rec.update(failed=True, error=str(e))
if target != "direct":
    rec.update(cpu_s=cpu / hz, rss_kb=int(rss), rss_idle_kb=int(rss_idle))
    if rec.get("requests"):
        rec["cpu_us_per_req"] = cpu / hz * 1e6 / rec["requests"]
# the proxy core: how busy, how much of it the proxy process had, and how much
# went to something else (other processes on the machine, softirq, steal)
if tot:
    if target == "direct":
        cpu = 0
    rec["core_busy_pct"] = 100.0 * busy / tot
    rec["core_proxy_pct"] = 100.0 * cpu / tot
    rec["core_other_pct"] = 100.0 * max(busy - cpu, 0) / tot
    rec["core_softirq_pct"] = 100.0 * softirq / tot
    rec["core_steal_pct"] = 100.0 * steal / tot
print(json.dumps(rec))
PY
}

mkdir -p "$OUT_DIR/raw"
{
    echo "date: $(date -Is)"
    echo "host: $(uname -srm), $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "opsgate: $OPSGATE_VERSION ($OPSGATE_BIN)"
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
    echo "haproxy: $(haproxy -v 2>/dev/null | head -1)"
    echo "wrk: $(wrk -v 2>&1 | head -1)"
    [[ $HAVE_OHA == 1 ]] && echo "oha: $(oha --version 2>/dev/null)"
    echo "params: ROUNDS=$ROUNDS DURATION=$DURATION CONNS=$CONNS THREADS=$THREADS SIZES='$SIZES' METHOD=$METHOD RATE=$RATE FIXED_DURATION=$FIXED_DURATION FIXED_SIZES='$FIXED_SIZES' IDLE=$IDLE"
    echo "targets: $TARGETS"
    [[ -n $OPSGATE_VARIANTS ]] && echo "opsgate variants: $OPSGATE_VARIANTS"
    echo "opsgate access log: ${OPSGATE_ACCESS_LOG:-true}"
    echo "pinning: backend cpu$BACKEND_CPU, load cpu$LOAD_CPU, proxies cpu$PROXY_CPU"
    echo "loadavg before: $(cat /proc/loadavg)"
    echo "busiest processes before:"
    ps -eo pcpu,comm --sort=-pcpu | sed -n '2,6p' 
} >"$OUT_DIR/env.txt"

total_runs=$(( $(wc -w <<<"$SIZES") * $(wc -w <<<"$TARGETS") * ROUNDS ))
log "closed loop: $total_runs runs of $DURATION (wrk -t$THREADS -c$CONNS)"
for size in $SIZES; do
    if [[ $WARMUP != 0 ]]; then
        for t in $TARGETS; do
            pin "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:${PORT[$t]}$(path_of "$size")" >/dev/null 2>&1 || true
        done
    fi
    for round in $(seq 1 "$ROUNDS"); do
        for t in $TARGETS; do
            log "closed $size r$round $t"
            run_one closed "$round" "$size" "$t"
        done
    done
done

if [[ $HAVE_OHA == 1 && $RATE != 0 ]]; then
    log "fixed rate: $RATE req/s for $FIXED_DURATION, sizes: $FIXED_SIZES"
    for size in $FIXED_SIZES; do
        for round in $(seq 1 "$ROUNDS"); do
            for t in $TARGETS; do
                log "fixed $size r$round $t"
                run_one fixed "$round" "$size" "$t"
            done
        done
    done
fi
{
    echo "loadavg after: $(cat /proc/loadavg)"
    echo "busiest processes after:"
    ps -eo pcpu,comm --sort=-pcpu | sed -n '2,6p'
} >>"$OUT_DIR/env.txt"

python3 "$HERE/summarize.py" "$OUT_DIR" | tee "$OUT_DIR/summary.md"
