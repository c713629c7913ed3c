#!/usr/bin/env bash
# Runs every fuzz target briefly from its committed corpus, when a nightly toolchain is
# present (cargo fuzz needs one); otherwise says it skipped. The fuzzing itself stays under
# FUZZ_BUDGET seconds (default 170); the sanitizer build before it gets FUZZ_BUILD_BUDGET
# (default 600: a cold build of the dependency tree takes a few minutes on 2 cores).
# Long runs: see docs/reliability.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

budget="${FUZZ_BUDGET:-170}"
build_budget="${FUZZ_BUILD_BUDGET:-600}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped (no nightly toolchain; the corpus is still replayed by the tests)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --quiet cargo-fuzz --locked
fi
# Kept outside the clone so a later run on the same machine reuses the build; a build that
# does not finish within its budget (a heavily loaded machine) is skipped, and the next run
# resumes it.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${HOME:-/tmp}/.cache/opsgate-fuzz-target}"
build=(-O)

rc=0
build_log=$(mktemp)
timeout "$build_budget" cargo +nightly fuzz build "${build[@]}" >"$build_log" 2>&1 || rc=$?
if ((rc == 124)); then
    echo "fuzz: skipped (the fuzz build did not finish in ${build_budget}s; it resumes next run)"
    exit 0
elif ((rc != 0)); then
    echo "fuzz: the fuzz build failed" >&2
    tail -30 "$build_log" >&2
    exit 1
fi
start=$SECONDS
targets=$(cargo +nightly fuzz list)
n=$(wc -w <<<"$targets")
per=$(((budget - (SECONDS - start) - 5) / n))
((per >= 3)) || per=3
echo "fuzz: $n targets, ${per}s each"
failed=0
for t in $targets; do
    mkdir -p "corpus/$t"
    # A scratch copy: new inputs found here are not committed by accident.
    work=$(mktemp -d)
    cp -r "corpus/$t/." "$work/"
    if cargo +nightly fuzz run "${build[@]}" "$t" "$work" -- \
        -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work.log" 2>&1; then
        echo "fuzz: $t ok ($(grep -o 'stat::number_of_executed_units: [0-9]*' "$work.log" | grep -o '[0-9]*$') runs)"
    else
        echo "fuzz: $t FAILED" >&2
        tail -40 "$work.log" >&2
        failed=1
    fi
    rm -rf "$work" "$work.log"
done
echo "fuzz: done in $((SECONDS - start))s"
exit "$failed"
