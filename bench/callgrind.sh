#!/usr/bin/env bash
# Instructions per request, deterministically: opsgate, nginx and HAProxy each
# run under valgrind's callgrind in front of the same fast backend, one client
# connection with keep-alive sends WARMUP_REQUESTS then REQUESTS tiny GETs, and
# only the measured requests are counted (the counters are zeroed after the
# warm-up and dumped after the last response, so start-up and shutdown are
# out). Every target is measured REPEAT times; the runs should agree within
# 0.5 %. For opsgate the top functions by inclusive and by self cost, and the
# self cost grouped by component, go to OUT_DIR.
#
# Usage: bench/callgrind.sh
#
# Environment (defaults in brackets):
#   REQUESTS [20000]        measured requests per run
#   WARMUP_REQUESTS [2000]  requests before the counters are zeroed
#   REPEAT [2]              runs per target
#   TARGETS ["opsgate nginx haproxy hyper"]; `hyper` is the bare hyper proxy of
#                           bench/bare-hyper (built here when named), hyper-mt the same on
#                           tokio's multi-threaded runtime with one worker (what
#                           #[tokio::main] gives), hyper-503 the same answering every
#                           request 503 itself (a hyper server's floor for a rejection),
#                           hyper-pgo the same built with a profile of its own
#                           (bench/bare-hyper/pgo.sh);
#                           also opsgate-plain (bench/conf/opsgate.toml:
#                           no breaker, no retry), opsgate-nolog (access log off) and
#                           opsgate-maint (maintenance on: every request a 503)
#   OPSGATE_CONFIG [bench/conf/opsgate-policy.toml]  template, placeholders as
#                           bench/conf/opsgate.toml (breaker + retry + metrics)
#   OPSGATE_ACCESS_LOG [true]
#   OPSGATE_BIN             opsgate binary; unset: a release build with symbols
#                           (strip off, line tables on) into CALLGRIND_TARGET_DIR
#   CALLGRIND_TARGET_DIR [target/callgrind]  so target/release is not touched
#   TOP [25]                functions listed per profile
#   BASE_PORT [28600]       first port tried; busy ports are skipped
#   OUT_DIR [bench/out/callgrind-<timestamp>]
#   CACHE_SIM [0]           1: also simulate caches and branch prediction (valgrind's
#                           --cache-sim/--branch-sim; runs about twice as long) and report
#                           misses per request and an estimated cycle count
#   VALGRIND_ARGS []        more valgrind options, split on blanks (e.g. "--D1=65536,16,64"
#                           to ask how misses fall with a larger simulated L1d)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

REQUESTS="${REQUESTS:-20000}"
WARMUP_REQUESTS="${WARMUP_REQUESTS:-2000}"
REPEAT="${REPEAT:-2}"
TARGETS="${TARGETS:-opsgate nginx haproxy hyper}"
OPSGATE_CONFIG="${OPSGATE_CONFIG:-$HERE/conf/opsgate-policy.toml}"
OPSGATE_ACCESS_LOG="${OPSGATE_ACCESS_LOG:-true}"
CALLGRIND_TARGET_DIR="${CALLGRIND_TARGET_DIR:-$REPO/target/callgrind}"
TOP="${TOP:-25}"
BASE_PORT="${BASE_PORT:-28600}"
OUT_DIR="${OUT_DIR:-$REPO/bench/out/callgrind-$(date +%Y%m%d-%H%M%S)}"
CACHE_SIM="${CACHE_SIM:-0}"
VALGRIND_ARGS="${VALGRIND_ARGS:-}"

log() { printf '[callgrind] %s\n' "$*" >&2; }
die() { printf '[callgrind] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- tools
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

ensure_packages() {
    local missing=()
    command -v valgrind >/dev/null || missing+=(valgrind)
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
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
ensure_packages
[[ -f $OPSGATE_CONFIG ]] || die "no such opsgate config template: $OPSGATE_CONFIG"

if [[ -z "${OPSGATE_BIN:-}" ]]; then
    # Symbols and line tables for the profile; the optimisation (fat LTO, one
    # codegen unit) stays that of the shipped release build.
    log "cargo build --release with symbols into $CALLGRIND_TARGET_DIR"
    OPSGATE_BIN=$(build_with_symbols "$CALLGRIND_TARGET_DIR") || die "cargo build --release failed"
fi
[[ -x "$OPSGATE_BIN" ]] || die "no opsgate binary at $OPSGATE_BIN"
# shellcheck disable=SC2086 # one target per word
build_bare_hyper $TARGETS || die "bench/bare-hyper did not build"

# ---------------------------------------------------------------- state
start_run callgrind 5
mkdir -p "$OUT_DIR"

write_tiny_client "$RUN/client.py"

# ---------------------------------------------------------------- backend
start_tiny_backend "$RUN" || die "backend did not start (see $RUN/backend)"

cp "$OPSGATE_BIN" "$RUN/opsgate.bin"   # a rebuild elsewhere must not swap it mid-run
[[ -n ${BARE_HYPER_BIN:-} ]] && cp "$BARE_HYPER_BIN" "$RUN/bare-hyper.bin"
[[ -n ${BARE_HYPER_PGO_BIN:-} ]] && cp "$BARE_HYPER_PGO_BIN" "$RUN/bare-hyper-pgo.bin"
{
    echo "date: $(date -Is)"
    echo "host: $(uname -srm), $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (+ local changes)')"
    echo "opsgate: $("$RUN/opsgate.bin" --version 2>/dev/null | head -1 || echo unknown) ($OPSGATE_BIN), config $(basename "$OPSGATE_CONFIG"), access log $OPSGATE_ACCESS_LOG"
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*: //')"
    echo "haproxy: $(haproxy -v 2>/dev/null | head -1)"
    echo "valgrind: $(valgrind --version)"
    echo "params: REQUESTS=$REQUESTS WARMUP_REQUESTS=$WARMUP_REQUESTS REPEAT=$REPEAT TARGETS='$TARGETS'"
} >"$OUT_DIR/env.txt"

# ---------------------------------------------------------------- runs
RESULTS="$OUT_DIR/results.tsv"
printf 'target\trun\tinstructions\trequests\tinstructions_per_request\n' >"$RESULTS"

# measure target run: start it under callgrind, warm up, zero, drive, dump, stop.
measure() {
    local t=$1 rep=$2 dir="$RUN/$1-r$2" port
    mkdir -p "$dir/tmp"
    alloc_port; port=$ALLOCATED
    local vg=(valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" --dump-line=no)
    [[ $CACHE_SIM == 1 ]] && vg+=(--cache-sim=yes --branch-sim=yes)
    # shellcheck disable=SC2206 # split on blanks on purpose: one option per word
    [[ -n $VALGRIND_ARGS ]] && vg+=($VALGRIND_ARGS)
    local cmd expect=200 ready=/tiny ready_status=200 bare_runtime=current
    case $t in
        nginx)
            render "$HERE/conf/proxy.nginx.conf" "$dir/nginx.conf" DIR="$dir" PORT="$port" BACKEND_PORT="$BACKEND_PORT"
            # no master: the one process callgrind runs is the worker
            cmd=(nginx -p "$dir" -c "$dir/nginx.conf" -g 'master_process off;') ;;
        haproxy)
            render "$HERE/conf/haproxy.cfg" "$dir/haproxy.cfg" DIR="$dir" PORT="$port" BACKEND_PORT="$BACKEND_PORT"
            cmd=(haproxy -db -f "$dir/haproxy.cfg") ;;
        hyper|hyper-mt)
            [[ $t == hyper-mt ]] && bare_runtime=multi
            cmd=("$RUN/bare-hyper.bin" "127.0.0.1:$port" "127.0.0.1:$BACKEND_PORT") ;;
        hyper-pgo)
            cmd=("$RUN/bare-hyper-pgo.bin" "127.0.0.1:$port" "127.0.0.1:$BACKEND_PORT") ;;
        hyper-503)
            expect=503; ready_status=503
            cmd=("$RUN/bare-hyper.bin" "127.0.0.1:$port" -) ;;
        opsgate|opsgate-plain|opsgate-nolog|opsgate-maint)
            local admin tpl=$OPSGATE_CONFIG al=$OPSGATE_ACCESS_LOG
            [[ $t == opsgate-plain ]] && tpl=$HERE/conf/opsgate.toml
            [[ $t == opsgate-maint ]] && { tpl=$HERE/conf/opsgate-maintenance.toml; expect=503; ready=/_health/live; }
            [[ $t == opsgate-nolog ]] && al=false
            alloc_port; admin=$ALLOCATED
            # Its own directory: opsgate watches the config's directory, and the
            # log written next to it would wake the watcher on every write.
            mkdir -p "$dir/conf"
            render "$tpl" "$dir/conf/opsgate.toml" PORT="$port" BACKEND_PORT="$BACKEND_PORT" \
                ADMIN_PORT="$admin" ACCESS_LOG="$al"
            cmd=("$RUN/opsgate.bin" run --config "$dir/conf/opsgate.toml") ;;
        *) die "unknown target $t" ;;
    esac
    # valgrind runs the command in its own process ($! is the pid
    # callgrind_control talks to); the environment is set outside it, as an
    # `env` under valgrind would exec the proxy uninstrumented.
    TOKIO_WORKER_THREADS=1 OPSGATE_LOG=info BARE_RUNTIME=$bare_runtime "${vg[@]}" "${cmd[@]}" >"$dir/stdout.log" 2>"$dir/stderr.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$port$ready" 120 "$ready_status" || die "$t did not start under callgrind (see $dir/stderr.log)"
    python3 "$RUN/client.py" "$port" "$WARMUP_REQUESTS" "$expect" || die "$t: warm-up failed"
    callgrind_control --zero "$pid" >/dev/null 2>&1 || die "callgrind_control --zero $pid failed"
    python3 "$RUN/client.py" "$port" "$REQUESTS" "$expect" || die "$t: measured run failed"
    callgrind_control --dump=measured "$pid" >/dev/null 2>&1 || die "callgrind_control --dump $pid failed"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # The dump is callgrind.out.1 (the file of the process's exit has no suffix).
    local dump="$dir/callgrind.out.1"
    [[ -f $dump ]] || { ls -la "$dir" >&2; tail -n 20 "$dir/stderr.log" >&2; die "$t: no callgrind dump in $dir"; }
    local ir
    ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
    [[ -n $ir ]] || die "$t: no instruction total in $dump"
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$rep" "$ir" "$REQUESTS" \
        "$(awk -v i="$ir" -v n="$REQUESTS" 'BEGIN { printf "%.0f", i / n }')" >>"$RESULTS"
    if [[ $CACHE_SIM == 1 ]]; then
        # Every event of the dump, per request: "events:" names them, "summary:" counts them.
        awk -v t="$t" -v run="$rep" -v n="$REQUESTS" '
            /^events:/ { for (i = 2; i <= NF; i++) name[i] = $i; k = NF }
            /^(summary|totals):/ && !done { done = 1
                for (i = 2; i <= k; i++) printf "%s\t%s\t%s\t%.2f\n", t, run, name[i], $i / n }
        ' "$dump" >>"$OUT_DIR/events.tsv"
    fi
    mkdir -p "$OUT_DIR/profiles"
    cp "$dump" "$OUT_DIR/profiles/$t-r$rep.callgrind.out"
    tail -n 3 "$dir/stderr.log" >"$OUT_DIR/profiles/$t-r$rep.stderr.tail" 2>/dev/null || true
    log "$t run $rep: $((ir / REQUESTS)) instructions per request"
}

for rep in $(seq 1 "$REPEAT"); do
    for t in $TARGETS; do
        log "$t run $rep: $WARMUP_REQUESTS warm-up + $REQUESTS measured requests under callgrind"
        measure "$t" "$rep"
    done
done

# ---------------------------------------------------------------- profiles
if [[ " $TARGETS " == *" opsgate "* ]]; then
    prof="$OUT_DIR/profiles/opsgate-r1.callgrind.out"
    callgrind_annotate --inclusive=yes --auto=no --threshold=100 "$prof" >"$OUT_DIR/opsgate-inclusive-full.txt" 2>/dev/null
fi

python3 - "$OUT_DIR" "$TOP" "$REQUESTS" <<'PY' | tee "$OUT_DIR/summary.md"
import collections, os, re, sys

out, top, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "results.tsv"))][1:]
per = collections.defaultdict(list)
for t, run, ir, n, ipr in rows:
    per[t].append(int(ir) / int(n))
print(open(os.path.join(out, "env.txt")).read())
nginx = sum(per["nginx"]) / len(per["nginx"]) if per.get("nginx") else None
print("| target | instructions/request (mean) | runs | spread | ratio to nginx |")
print("|---|---|---|---|---|")
for t, v in per.items():
    mean = sum(v) / len(v)
    spread = (max(v) - min(v)) / mean * 100
    ratio = f"{mean / nginx:.2f}" if nginx else "-"
    runs = " / ".join(f"{x:,.0f}" for x in v)
    flag = "" if spread <= 0.5 else " (over 0.5 %)"
    print(f"| {t} | {mean:,.0f} | {runs} | {spread:.2f} %{flag} | {ratio} |")

events_path = os.path.join(out, "events.tsv")
if os.path.exists(events_path):
    # Simulated caches (valgrind's model of this host's L1 and last level) and branch
    # predictor, per request, mean over runs. The cycle estimate is a rough model, for
    # comparing targets on one machine only: an L1 miss 10 cycles, a last-level miss
    # 100, a mispredicted branch 15, every instruction 1.
    ev = collections.defaultdict(lambda: collections.defaultdict(list))
    for l in open(events_path):
        t, run, name, v = l.rstrip("\n").split("\t")
        ev[t][name].append(float(v))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    print()
    print("| target | instructions | L1i misses | L1d misses | last-level misses | mispredicted branches | estimated cycles |")
    print("|---|---|---|---|---|---|---|")
    for t, e in ev.items():
        m = {k: mean(v) for k, v in e.items()}
        l1i = m.get("I1mr", 0)
        l1d = m.get("D1mr", 0) + m.get("D1mw", 0)
        ll = m.get("ILmr", 0) + m.get("DLmr", 0) + m.get("DLmw", 0)
        bm = m.get("Bcm", 0) + m.get("Bim", 0)
        cycles = m.get("Ir", 0) + 10 * (l1i + l1d) + 100 * ll + 15 * bm
        print(f"| {t} | {m.get('Ir', 0):,.0f} | {l1i:,.0f} | {l1d:,.0f} | {ll:,.1f} | {bm:,.0f} | {cycles:,.0f} |")

line = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$")

def functions(path):
    """(cost, name) per function of a callgrind_annotate listing."""
    res, started = [], False
    for l in open(path):
        if "file:function" in l:
            started = True
            continue
        if started and not l.strip() and res:
            break
        m = line.match(l)
        if started and m and "PROGRAM TOTALS" not in l:
            res.append((int(m.group(1).replace(",", "")), m.group(2).strip()))
    return res

def self_costs(path):
    """(cost, name) per function, self cost, read from the callgrind file itself
    (callgrind_annotate 3.19 misreports self cost with inlined frames)."""
    names, cost = {}, collections.Counter()
    fn, after_call = None, False
    ref = re.compile(r"^\((\d+)\)(?: (.*))?$")
    for l in open(path):
        if l.startswith("fn="):
            m = ref.match(l[3:].rstrip("\n"))
            if m:
                if m.group(2) is not None:
                    names[m.group(1)] = m.group(2)
                fn = names.get(m.group(1), m.group(1))
            else:
                fn = l[3:].strip()
        elif l.startswith("cfn="):
            m = ref.match(l[4:].rstrip("\n"))
            if m and m.group(2) is not None:
                names[m.group(1)] = m.group(2)
        elif l.startswith("calls="):
            after_call = True
        elif l[:1].isdigit() or l[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            parts = l.split()
            if fn is not None and len(parts) >= 2:
                cost[fn] += int(parts[1])
    return [(c, n) for n, c in cost.most_common()]

# Self cost by component: symbol prefixes, first match wins.
GROUPS = [
    ("hyper-util client (pool, legacy client)", r"hyper_util::client"),
    ("hyper-util other", r"hyper_util::"),
    ("h1 codec (hyper::proto::h1)", r"hyper::proto::h1|httparse::"),
    ("hyper other (client/server dispatch, body)", r"hyper::"),
    ("h2", r"\bh2::"),
    ("tokio", r"\btokio::|mio::"),
    ("metrics", r"opsgate::telemetry::(metrics|histogram)|prometheus_client::"),
    ("access log", r"opsgate::telemetry::access"),
    ("opsgate pipeline (proxy, breaker, retry, routing)", r"opsgate::"),
    ("http/bytes/headers types", r"\bhttp::|\bbytes::|http_body"),
    ("allocator (malloc/free/realloc)", r"\b(_int_)?(malloc|free|realloc|calloc|cfree)\b|malloc_consolidate|tcache|__rust_(alloc|dealloc|realloc)|alloc::alloc::|_rjem_|jemalloc"),
    ("memcpy/memmove/memset", r"mem(cpy|move|set|cmp)|__memcpy|__memmove|__memset"),
    ("tracing", r"\btracing(_core|_subscriber)?::"),
    ("std/core/alloc (Rust runtime)", r"\b(core|std|alloc)::"),
    ("libc syscalls & other libc", r"libc\.so|ld-linux"),
]
GROUPS = [(g, re.compile(p)) for g, p in GROUPS]

def group(name):
    for g, p in GROUPS:
        if p.search(name):
            return g
    return "other"

inc = os.path.join(out, "opsgate-inclusive-full.txt")
prof = os.path.join(out, "profiles", "opsgate-r1.callgrind.out")
if os.path.exists(inc):
    selfc = self_costs(prof)
    for title, fns, fname in (("inclusive", functions(inc), "opsgate-top-inclusive.txt"),
                              ("self", selfc, "opsgate-top-self.txt")):
        with open(os.path.join(out, fname), "w") as f:
            for cost, name in fns[:top]:
                f.write(f"{cost / requests:10.0f}  {group(name):45.45s}  {name}\n")
        print(f"\nopsgate, top {top} functions by {title} cost (instructions per request, group, function): {fname}")
    total = collections.Counter()
    for cost, name in selfc:
        total[group(name)] += cost
    s = sum(total.values())
    print("\nopsgate, self cost by component (instructions per request):\n")
    print("| component | instructions/request | share |")
    print("|---|---|---|")
    for g, c in total.most_common():
        print(f"| {g} | {c / requests:,.0f} | {100 * c / s:.1f} % |")
PY
log "results in $OUT_DIR"
