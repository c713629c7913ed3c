#!/usr/bin/env bash
# Runs the Dockerfile's steps without a Docker engine: the build stage's commands, a
# check that the binary needs only what the distroless/cc runtime image has, then the
# image's ENTRYPOINT and HEALTHCHECK commands against the built binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"
out="$(mktemp -d)"
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT

# Build stage: the same commands as the Dockerfile's RUN.
# With the profile's mismatch warnings on, for the profile check below (build.rs has
# Cargo recompile the opsgate crates when the variable changes, and replay the warnings
# when nothing changed).
OPSGATE_PGO_WARN=1 cargo build --release --locked 2>"$out/build.log" ||
    { cat "$out/build.log" >&2; exit 1; }
grep -v 'hash mismatch' "$out/build.log" | grep -v '^$' >&2 || true
install -D -m 0755 "$target/release/opsgate" "$out/usr/local/bin/opsgate"
install -D -m 0644 config/minimal.toml "$out/etc/opsgate/opsgate.toml"
bin="$out/usr/local/bin/opsgate"

# The link order (build.rs): the functions build/symbol-order.txt lists must still be
# in the build, and must be what .text starts with, or the running code is scattered
# again (idle RSS +3.5 MiB) with nothing else failing.
if [ -f build/symbol-order.txt ] && [ "$(uname -m)" = x86_64 ]; then
    listed=$(sort -u build/symbol-order.txt | wc -l)
    found=$(nm --defined-only "$target/release/opsgate" | awk '{print $3}' | sort -u |
        comm -12 - <(sort -u build/symbol-order.txt) | wc -l)
    if ((found * 10 < listed * 8)); then
        echo "docker-steps: only $found of $listed functions in build/symbol-order.txt are in the release build; run bench/symbol-order.sh" >&2
        exit 1
    fi
    # awk reads to the end: `head` would leave nm a broken pipe, which pipefail reports.
    first=$(nm -n --defined-only "$target/release/opsgate" | awk '$2 ~ /^[tT]$/ && n++ < 200 {print $3}' |
        sort -u | comm -12 - <(sort -u build/symbol-order.txt) | wc -l)
    if ((first < 180)); then
        echo "docker-steps: .text does not start with the listed functions ($first of its first 200); is the linker rust-lld?" >&2
        exit 1
    fi
    echo "docker-steps: link order applied ($found of $listed listed functions; $first of the first 200 in .text)"
fi

# distroless/cc ships glibc, libgcc_s and libm; nothing else may be linked.
# A function changed since bench/pgo.sh ran is compiled as if there were no profile, and
# nothing else says so: the build stays correct, only slower. With OPSGATE_PGO_WARN, LLVM
# names each such function with the largest count the profile held for one of its blocks.
# HOT_COUNT or more means code the recorded requests ran (a recording serves a few hundred
# thousand), and fails the check; a change to code that ran a few times does not.
if [ -f build/opsgate.profdata ] && [ "$(uname -sm)" = "Linux x86_64" ]; then
    hot_count=${HOT_COUNT:-10000}
    changed=$(grep -c 'hash mismatch' "$out/build.log" || true)
    hot=$(sed -n 's/.*(hash mismatch) \([^ ]*\) Hash = [0-9]* up to \([0-9]*\) count discarded.*/\2 \1/p' "$out/build.log" |
        awk -v t="$hot_count" '$1 >= t' | sort -rn)
    if [ -n "$hot" ]; then
        echo "docker-steps: code the optimization profile saw run $hot_count+ times changed since build/opsgate.profdata was recorded, and is compiled without it; run bench/pgo.sh, then bench/symbol-order.sh. Largest count, function:" >&2
        head -20 <<<"$hot" | { c++filt 2>/dev/null || cat; } | awk '{print "  " $0}' >&2
        exit 1
    fi
    echo "docker-steps: the optimization profile matches the code ($changed functions changed since it was recorded, none that it saw run $hot_count+ times)"
fi

extra=$(ldd "$bin" | awk '{print $1}' | grep -Ev '^(linux-vdso\.so|libc\.so|libm\.so|libgcc_s\.so|/lib64/ld-linux|libpthread\.so|libdl\.so|librt\.so)' || true)
if [ -n "$extra" ]; then
    echo "docker-steps: the binary links libraries the runtime image lacks: $extra" >&2
    exit 1
fi

# ENTRYPOINT with the image's config; ports moved to free loopback ones by env.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin=$(free_port)
OPSGATE_LISTEN="127.0.0.1:$port" OPSGATE_ADMIN_LISTEN="127.0.0.1:$admin" \
    "$bin" run --config "$out/etc/opsgate/opsgate.toml" >"$out/log" 2>&1 &
pid=$!

# HEALTHCHECK: the probe passes once the daemon answers.
for _ in $(seq 1 100); do
    if "$bin" probe "http://127.0.0.1:$port/_health/live" --timeout 1s 2>/dev/null; then
        echo "docker-steps: build stage, runtime libraries, ENTRYPOINT and HEALTHCHECK ok"
        exit 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
echo "docker-steps: the HEALTHCHECK probe never passed; daemon log:" >&2
cat "$out/log" >&2
exit 1
