#!/usr/bin/env bash
# Writes build/symbol-order.txt: the functions of the release binary that
# start-up, an idle daemon and its requests run, hottest first. build.rs hands
# the list to the linker, which places those functions together at the start
# of .text, so the pages the kernel maps for them are few (see build.rs).
#
# How: the release build (its symbol table is kept for this) runs under
# valgrind's callgrind with the benchmark's policy config in front of an nginx
# backend; it serves proxied requests, probes, scrapes, admin calls and
# maintenance 503s, then stops. Every function callgrind saw run in the binary
# is listed, by instructions spent in it.
#
# Run it after changes to the hot path or to dependencies, and after
# bench/pgo.sh (the profile decides what is inlined, so which functions
# exist): names carry a hash of their crate, so a stale list matches less and
# less (and costs memory, never correctness). `bench/symbol-order.sh --check` reports how many listed
# names the current build still has.
#
# Environment: REQUESTS [2000], BASE_PORT [28700],
#   ORDER_TARGET_DIR [target/symbol-order] (so target/release is not touched).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ORDER="$REPO/build/symbol-order.txt"
REQUESTS="${REQUESTS:-2000}"
BASE_PORT="${BASE_PORT:-28700}"
ORDER_TARGET_DIR="${ORDER_TARGET_DIR:-$REPO/target/symbol-order}"

log() { printf '[symbol-order] %s\n' "$*" >&2; }
die() { printf '[symbol-order] error: %s\n' "$*" >&2; exit 1; }

for tool in valgrind nginx curl python3 nm; do
    command -v "$tool" >/dev/null || die "needs $tool (apt-get install valgrind nginx curl python3 binutils)"
done

log "cargo build --release into $ORDER_TARGET_DIR"
# The release profile as it is: a symbol's name carries a hash of its crate's build
# settings, so only the same settings give the names the shipped build has. Without the
# list: what the list holds must not depend on an older list.
(cd "$REPO" && OPSGATE_NO_SYMBOL_ORDER=1 CARGO_TARGET_DIR="$ORDER_TARGET_DIR" \
    cargo build --release --quiet) || die "build failed"
BIN="$ORDER_TARGET_DIR/release/opsgate"

if [[ ${1:-} == --check ]]; then
    [[ -f $ORDER ]] || die "no $ORDER"
    have=$(nm --defined-only "$BIN" | awk '{print $3}' | sort -u)
    listed=$(wc -l <"$ORDER")
    found=$(comm -12 <(sort -u "$ORDER") <(printf '%s\n' "$have") | wc -l)
    log "$found of $listed listed functions are in the current build"
    exit 0
fi

# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# Up to 30 s to stop: valgrind writes its profile as opsgate exits.
start_run symbol-order 30
start_tiny_backend "$RUN" || die "backend did not start"
mkdir -p "$RUN/conf"

alloc_port; PORT=$ALLOCATED
alloc_port; ADMIN=$ALLOCATED
render "$HERE/conf/opsgate-policy.toml" "$RUN/conf/opsgate.toml" PORT="$PORT" \
    BACKEND_PORT="$BACKEND_PORT" ADMIN_PORT="$ADMIN" ACCESS_LOG=true
log "opsgate under callgrind: $REQUESTS proxied requests, probes, scrapes, admin calls, 503s"
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$RUN/callgrind.out" \
    "$BIN" run --config "$RUN/conf/opsgate.toml" >"$RUN/stdout.log" 2>"$RUN/stderr.log" &
PID=$!
PIDS+=("$PID")
wait_http "http://127.0.0.1:$PORT/tiny" 120 200 || die "opsgate did not start (see $RUN/stderr.log)"
write_mix_client "$RUN/mix.py"
python3 "$RUN/mix.py" "$PORT" "$ADMIN" "$REQUESTS" || die "requests failed"
kill -TERM "$PID"
wait "$PID" 2>/dev/null || true
[[ -s $RUN/callgrind.out ]] || die "no callgrind output (see $RUN/stderr.log)"

python3 - "$RUN/callgrind.out" "$(basename "$BIN")" "$ORDER" <<'PY'
import collections, re, sys
path, binary, out = sys.argv[1:4]
ref = re.compile(r"^\((\d+)\)(?: (.*))?$")
objs, fns, cost = {}, {}, collections.Counter()
def name(table, s):
    m = ref.match(s)
    if not m:
        return s
    if m.group(2) is not None:
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1))
ob = fn = None
after_call = False
for line in open(path):
    line = line.rstrip("\n")
    if line.startswith("ob="):
        ob = name(objs, line[3:])
    elif line.startswith("cob="):
        name(objs, line[4:])
    elif line.startswith("fn="):
        fn = name(fns, line[3:])
        if ob and ob.endswith("/" + binary) and not fn.startswith("0x"):
            cost[fn] += 0
        else:
            fn = None
    elif line.startswith("cfn="):
        name(fns, line[4:])
    elif line.startswith("calls="):
        after_call = True
    elif line[:1].isdigit() or line[:1] in "+-*":
        if after_call:
            after_call = False
        elif fn is not None and len(line.split()) >= 2:
            cost[fn] += int(line.split()[1])
names = sorted(cost, key=lambda n: (-cost[n], n))
with open(out, "w") as f:
    f.write("\n".join(names) + "\n")
print(f"[symbol-order] {len(names)} functions written to {out}", file=sys.stderr)
PY
