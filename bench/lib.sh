# shellcheck shell=bash
# Helpers the benchmark scripts share: free ports, config templates, waiting for a
# server. Sourced, after the script has set BASE_PORT.

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
NEXT_PORT=${BASE_PORT:?BASE_PORT must be set before sourcing bench/lib.sh}
alloc_port() { # sets $ALLOCATED (no subshell, so the counter moves on)
    while port_busy "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    ALLOCATED=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
}

render() { # template out KEY=VALUE...: every @KEY@ in template replaced
    local tpl=$1 out=$2; shift 2
    local args=() kv
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$tpl" >"$out"
}

# url [seconds, 10] [status]: until it answers with that status, or at all when none is
# given (a 503 from a gate counts).
wait_http() {
    local url=$1 deadline=$((SECONDS + ${2:-10})) want=${3:-} got
    while :; do
        got=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null) || true
        if [[ -z $want && $got != 000 ]] || [[ $got == "$want" ]]; then
            return 0
        fi
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# A run's scratch dir as $RUN (readable by all: nginx's workers run as nobody), an empty
# PIDS, and traps that stop those processes (`stop_pids seconds`, default 3) and remove
# the dir on exit, Ctrl-C exiting 130. Usage: start_run NAME [seconds].
start_run() {
    RUN_STOP_SECONDS=${2:-3}
    RUN="$(mktemp -d "/tmp/opsgate-$1.XXXXXX")"
    chmod 755 "$RUN"
    PIDS=()
    trap end_run EXIT
    trap 'exit 130' INT TERM
}

end_run() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pids "$RUN_STOP_SECONDS"
    rm -rf "$RUN"
    exit "$rc"
}

# Stops every process in the caller's PIDS array: TERM, up to `seconds` (default 3) for
# them to go, then KILL. For the scripts' exit traps.
stop_pids() {
    local seconds=${1:-3} pid alive
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 $((seconds * 10))); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

# The release build with symbols and line tables the valgrind tools profile (same
# optimisation as the shipped build), into target_dir; prints the binary's path.
build_with_symbols() {
    local target_dir=$1
    (cd "$BENCH_DIR/.." && CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=1 \
        CARGO_TARGET_DIR="$target_dir" cargo build --release --quiet) >&2 || return 1
    echo "$target_dir/release/opsgate"
}

# The bare hyper proxies the targets name: sets BARE_HYPER_BIN when one is `hyper` or
# `hyper-*`, and BARE_HYPER_PGO_BIN when one is `hyper-pgo` (built with a profile of its
# own). Usage: build_bare_hyper TARGET...
build_bare_hyper() {
    local t
    for t in "$@"; do
        [[ $t == hyper || $t == hyper-* ]] || continue
        # shellcheck disable=SC2034 # for the caller
        BARE_HYPER_BIN=$(bash "$BENCH_DIR/bare-hyper/build.sh") || return 1
        break
    done
    for t in "$@"; do
        [[ $t == hyper-pgo ]] || continue
        # shellcheck disable=SC2034 # for the caller
        BARE_HYPER_PGO_BIN=$(bash "$BENCH_DIR/bare-hyper/pgo.sh") || return 1
    done
}

# Rustup's llvm-profdata, which merges the counts of profile-instrumented builds; adds the
# llvm-tools component when it is missing. Sets LLVM_PROFDATA.
find_llvm_profdata() {
    local bin
    bin="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
    if [[ ! -x $bin/llvm-profdata ]]; then
        echo "rustup component add llvm-tools" >&2
        rustup component add llvm-tools >&2 || return 1
    fi
    # shellcheck disable=SC2034 # for the caller
    LLVM_PROFDATA=$bin/llvm-profdata
}

# The bodies the backend serves as /16k and /1m: random bytes, written into its data dir.
write_bodies() {
    head -c 16384 /dev/urandom >"$1/16k.bin"
    head -c 1048576 /dev/urandom >"$1/1m.bin"
    chmod 644 "$1/16k.bin" "$1/1m.bin"
}

# url connections seconds [lua script]: one wrk run, its req/s and non-2xx count printed;
# fails on a failed run or socket errors.
wrk_load() {
    local url=$1 conns=$2 secs=$3 script=${4:-} out
    out=$(wrk -t1 -c"$conns" -d"${secs}s" ${script:+-s "$script"} "$url") || {
        echo "wrk $url failed" >&2
        return 1
    }
    if grep -q "Socket errors" <<<"$out"; then
        echo "wrk $url: $(grep 'Socket errors' <<<"$out")" >&2
        return 1
    fi
    echo "$url ($conns connections${script:+, $(basename "$script" .lua)}):" \
        "$(awk '/Requests\/sec/ {print $2}' <<<"$out") req/s," \
        "$(awk '/Non-2xx/ {n = $NF} END {print n + 0}' <<<"$out") non-2xx"
}

# The valgrind tools' backend: nginx from conf/backend.nginx.conf under dir/backend, `/tiny`
# answered from memory. Sets BACKEND_PORT and adds its pid to PIDS.
start_tiny_backend() {
    local dir=$1
    alloc_port; BACKEND_PORT=$ALLOCATED
    mkdir -p "$dir/backend/tmp" "$dir/data"
    render "$BENCH_DIR/conf/backend.nginx.conf" "$dir/backend/nginx.conf" DIR="$dir/backend" DATA="$dir/data" PORT="$BACKEND_PORT"
    nginx -p "$dir/backend" -c "$dir/backend/nginx.conf" >"$dir/backend/stdout.log" 2>&1 &
    PIDS+=("$!")
    wait_http "http://127.0.0.1:$BACKEND_PORT/tiny" 10 200
}

# The valgrind tools' client, written to `file`: one keep-alive connection, a fixed
# number of GETs of /tiny, every response read whole and checked. Its own cost is not
# measured. Usage: python3 file PORT N [EXPECTED_STATUS, 200].
write_tiny_client() {
    cat >"$1" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
# 200 with the backend's body, or the status a rejecting target answers with
expect = int(sys.argv[3]) if len(sys.argv) > 3 else 200
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    c.request("GET", "/tiny")
    r = c.getresponse()
    body = r.read()
    if r.status != expect or (expect == 200 and body != b"hello, world\n"):
        sys.exit(f"request {i}: status {r.status}, body {body[:64]!r}")
    if r.will_close:
        sys.exit(f"request {i}: the proxy closed the connection")
c.close()
PY
}

# The mixed client of the profiles the build is tuned by (bench/symbol-order.sh,
# bench/pgo.sh), written to `file`: N GETs of /tiny on one keep-alive connection, the
# probes and scrapes on both ports, the admin API's reads, then maintenance switched on
# and N/8 POSTs refused with 503, one connection each, and switched off again. Every
# status is checked. Usage: python3 file PORT ADMIN_PORT N.
write_mix_client() {
    cat >"$1" <<'PY'
import http.client, sys
port, admin, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    c.request("GET", "/tiny")
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"request {i}: {r.status}")
for path in ("/_health/live", "/_health/ready", "/_health/startup", "/metrics"):
    c.request("GET", path); c.getresponse().read()
a = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
for path in ("/metrics", "/_health/ready", "/_ops/", "/_ops/status"):
    a.request("GET", path); a.getresponse().read()
# Maintenance on (writes, the default mode): writes answered 503 by opsgate itself.
for enabled in ("true", "false"):
    a.request("PUT", "/_ops/maintenance", body=f'{{"enabled":{enabled}}}',
              headers={"Content-Type": "application/json"})
    r = a.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"PUT /_ops/maintenance: {r.status}")
    if enabled == "true":
        for i in range(n // 8):
            # A refused write may end its connection: one connection each.
            m = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            m.request("POST", "/tiny", body=b"{}")
            r = m.getresponse(); r.read(); m.close()
            if r.status != 503:
                sys.exit(f"maintenance request {i}: {r.status}")
PY
}
