#!/usr/bin/env bash
# Feature benchmarks on top of bench/run.sh: what the resilience layer,
# maintenance mode, hot reload and health checks cost. Each command starts the
# backend and the opsgate variants it needs through bench/run.sh (same pinning,
# interleaved rounds, bounded runs, loopback only), sets runtime state through
# the admin API in a SETUP_HOOK, and prints an A/B table against plain
# pass-through (bench/compare.py).
#
# Usage: bench/features.sh resilience    # breaker+retry vs pass-through; forced-open breaker rejections
#        bench/features.sh maintenance   # maintenance off vs pass-through; rejected POSTs (mode = "writes")
#        bench/features.sh reload        # POST /_ops/reload with 100 routes (100 and 10 upstreams), idle and under load
#        bench/features.sh health        # 200 checks at 1 s: CPU, /_health/ready latency
#        bench/features.sh all
#
# Environment: ROUNDS, DURATION, OPSGATE_BIN, ... as for bench/run.sh;
# OPSGATE_ACCESS_LOG [true] (false: every opsgate variant without its access log);
# RELOADS [20] reloads per series; CHECKS [200], CHECK_INTERVAL [1s];
# HEALTH_IDLE [20s] window of the health-check CPU measurement;
# REDIS_URL, POSTGRES_URL for the redis and postgres checks (local defaults).
# Results: bench/out/features-<command>-<timestamp>/ (summary.md, compare.md,
# reload.md / health.md from the hooks).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

log() { printf '[features] %s\n' "$*" >&2; }
die() { printf '[features] error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------ hook helpers
# (run inside bench/run.sh's SETUP_HOOK: BENCH_PORTS, BENCH_OUT are set)
port_of() { awk -v t="$1" '$1 == t {print $2}' "$BENCH_PORTS"; }
admin_of() { awk -v t="$1" '$1 == t {print $3}' "$BENCH_PORTS"; }
pin() { if [[ ${PINNED:-1} == 1 ]]; then taskset -c "${LOAD_CPU:-0}" "$@"; else "$@"; fi; }
code_of() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@"; }
# one wrk run; prints its JSON line (requests, percentiles in µs, error counts)
wrk_json() { # conns duration url [method]
    WRK_METHOD="${4:-GET}" pin wrk -t1 -c"$1" -d"$2" --timeout 5s --latency -s "$HERE/wrk-report.lua" "$3" \
        | sed -n 's/^JSON //p'
}

hook_open() {
    local a; a=$(admin_of opsgate-open)
    curl -fsS -o /dev/null -X POST "http://127.0.0.1:$a/_ops/breakers/app/open"
    local c; c=$(code_of "http://127.0.0.1:$(port_of opsgate-open)/tiny")
    [[ $c == 503 ]] || die "breaker forced open but GET answered $c"
    [[ $(code_of "http://127.0.0.1:$(port_of opsgate-policy)/tiny") == 200 ]] || die "opsgate-policy is not passing"
    log "opsgate-open: breaker app forced open, GET /tiny -> $c"
}

hook_maint() {
    local a; a=$(admin_of opsgate-mainton)
    curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/json' \
        -d '{"enabled":true,"reason":"benchmark"}' "http://127.0.0.1:$a/_ops/maintenance"
    local p; p=$(port_of opsgate-mainton)
    local post get off
    post=$(code_of -X POST "http://127.0.0.1:$p/tiny")
    get=$(code_of "http://127.0.0.1:$p/tiny")
    off=$(code_of -X POST "http://127.0.0.1:$(port_of opsgate-maintoff)/tiny")
    log "opsgate-mainton: POST -> $post, GET -> $get; opsgate-maintoff: POST -> $off"
    [[ $post == 503 && $get == 200 && $off == 200 ]] || die "maintenance is not behaving as configured"
}

hook_reload() {
    local n=${RELOADS:-20} out="$BENCH_OUT/reload.md" t
    {
        echo "Client-side time of \`POST /_ops/reload\` (curl time_total, fresh connection each), $n reloads per series."
        echo
        echo "| config | series | median ms | p90 ms | max ms | failed reloads | wrk requests | wrk non-2xx + errors |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
    } >"$out"
    for t in $(awk '$1 ~ /^opsgate-routes/ {print $1}' "$BENCH_PORTS"); do
        local a p; a=$(admin_of "$t"); p=$(port_of "$t")
        for series in idle load; do
            local times="$BENCH_OUT/reload-$t-$series.txt" wj="" wpid=""
            : >"$times"
            if [[ $series == load ]]; then
                # bounded load across the whole series
                wrk_json 32 "$(( n / 5 + 4 ))s" "http://127.0.0.1:$p/tiny" >"$BENCH_OUT/reload-$t-wrk.json" &
                wpid=$!
                sleep 1
            fi
            local i fails=0
            for ((i = 0; i < n; i++)); do
                local r
                r=$(curl -s -o "$BENCH_OUT/reload-last.json" -w '%{http_code} %{time_total}' --max-time 10 \
                    -X POST "http://127.0.0.1:$a/_ops/reload")
                [[ ${r%% *} == 200 ]] && grep -q '"success"' "$BENCH_OUT/reload-last.json" || fails=$((fails + 1))
                echo "${r#* }" >>"$times"
                sleep 0.2
            done
            local wreq="—" wbad="—"
            if [[ -n $wpid ]]; then
                wait "$wpid" || true
                wj=$(cat "$BENCH_OUT/reload-$t-wrk.json")
                wreq=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$wj")
                wbad=$(python3 -c 'import json,sys; w=json.loads(sys.argv[1]); print(w["err_status"]+w["err_connect"]+w["err_read"]+w["err_write"]+w["err_timeout"])' "$wj")
            fi
            sort -n "$times" | awk -v t="$t" -v s="$series" -v f="$fails" -v wr="$wreq" -v wb="$wbad" \
                '{a[NR] = $1 * 1000} END {printf "| %s | %s | %.2f | %.2f | %.2f | %d | %s | %s |\n", t, s, a[int((NR + 1) / 2)], a[int(NR * 0.9 + 0.5)], a[NR], f, wr, wb}' >>"$out"
        done
    done
}

hook_health() {
    local t=opsgate-checks
    local p a; p=$(port_of $t); a=$(admin_of $t)
    sleep 3   # let every check run a few times
    local out="$BENCH_OUT/health.md"
    curl -s --max-time 2 "http://127.0.0.1:$a/_health/ready" >"$BENCH_OUT/health-ready.json" || true
    python3 - "$BENCH_OUT/health-ready.json" >"$out" <<'PY'
import collections, json, sys
b = json.load(open(sys.argv[1]))
c = collections.Counter(x["status"] for x in b.get("checks", []))
print(f"`/_health/ready` on the admin port with the checks running: overall `{b.get('status')}`, "
      f"{len(b.get('checks', []))} checks: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + ".\n")
bad = [x for x in b.get("checks", []) if x["status"] != "healthy"][:3]
for x in bad:
    print(f"- {x['name']}: {x['status']} {x.get('message', '')}")
PY
    {
        echo
        echo "\`GET /_health/ready\` on the proxy port, wrk closed loop, interleaved; µs. \`direct\` is the"
        echo "backend nginx answering \`/tiny\` from memory: the floor of what this machine's loopback and scheduler give."
        echo
        echo "| target | conns | round | req/s | p50 | p90 | p99 | p99.9 | max | non-2xx |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    } >>"$out"
    local round tt c
    for round in 1 2 3; do
        for c in 1 8; do
            for tt in direct opsgate $t; do
                local path=/_health/ready
                [[ $tt == direct ]] && path=/tiny   # the machine's floor: nginx answering from memory
                wrk_json "$c" 4s "http://127.0.0.1:$(port_of $tt)$path" | python3 -c '
import json, sys
w = json.loads(sys.stdin.read())
t, c, r = sys.argv[1:]
rps = w["requests"] / (w["duration_us"] / 1e6)
print("| %s | %s | %s | %.0f | %d | %d | %d | %d | %d | %d |" % (t, c, r, rps, w["p50_us"], w["p90_us"],
      w["p99_us"], w["p999_us"], w["max_us"], w["err_status"]))
' "$tt" "$c" "$round" >>"$out"
            done
        done
    done
}

# ------------------------------------------------------------ commands
TMPD=""
cleanup() { if [[ -n $TMPD ]]; then rm -rf "$TMPD"; fi; }
trap cleanup EXIT

run_bench() { # name, then VAR=value... for bench/run.sh
    local name=$1; shift
    local out="$REPO/bench/out/features-$name-log${OPSGATE_ACCESS_LOG:-true}-$(date +%Y%m%d-%H%M%S)"
    log "$name -> $out"
    (cd "$REPO" && env OUT_DIR="$out" "$@" "$HERE/run.sh" >/dev/null)
    python3 "$HERE/compare.py" "$out" opsgate | tee "$out/compare.md"
    local f
    for f in reload.md health.md; do
        [[ -f $out/$f ]] && { echo; cat "$out/$f"; }
    done
    return 0
}

common=(TARGETS=opsgate SIZES=tiny RATE=0 INSTALL_OHA=0)

cmd_resilience() {
    run_bench resilience "${common[@]}" ROUNDS="${ROUNDS:-5}" DURATION="${DURATION:-5s}" \
        OPSGATE_VARIANTS="routed=$HERE/conf/opsgate-routed.toml policy=$HERE/conf/opsgate-policy.toml open=$HERE/conf/opsgate-policy.toml" \
        SETUP_HOOK="'$HERE/features.sh' hook-open"
}

cmd_maintenance() {
    run_bench maintenance "${common[@]}" ROUNDS="${ROUNDS:-5}" DURATION="${DURATION:-5s}" METHOD=POST \
        OPSGATE_VARIANTS="maintoff=$HERE/conf/opsgate-maint-writes.toml mainton=$HERE/conf/opsgate-maint-writes.toml" \
        SETUP_HOOK="'$HERE/features.sh' hook-maint"
}

cmd_reload() {
    TMPD=$(mktemp -d)
    "$HERE/gen-routes.sh" 100 100 >"$TMPD/routes100.toml"
    "$HERE/gen-routes.sh" 100 10 >"$TMPD/routes10.toml"
    run_bench reload "${common[@]}" ROUNDS="${ROUNDS:-1}" DURATION="${DURATION:-3s}" \
        OPSGATE_VARIANTS="routes100=$TMPD/routes100.toml routes10=$TMPD/routes10.toml" \
        SETUP_HOOK="'$HERE/features.sh' hook-reload"
}

cmd_health() {
    TMPD=$(mktemp -d)
    "$HERE/gen-checks.sh" "${CHECKS:-200}" "${CHECK_INTERVAL:-1s}" >"$TMPD/checks.toml"
    run_bench health "${common[@]}" TARGETS="direct opsgate" ROUNDS="${ROUNDS:-1}" DURATION="${DURATION:-3s}" IDLE="${HEALTH_IDLE:-20s}" \
        OPSGATE_VARIANTS="checks=$TMPD/checks.toml" \
        SETUP_HOOK="'$HERE/features.sh' hook-health"
}

case ${1:-} in
    resilience|maintenance|reload|health) "cmd_$1" ;;
    all) cmd_resilience; cmd_maintenance; cmd_reload; cmd_health ;;
    hook-open) hook_open ;;
    hook-maint) hook_maint ;;
    hook-reload) hook_reload ;;
    hook-health) hook_health ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
