#!/usr/bin/env bash
# build/rustc-pgo.sh decides per compile whether the optimization profile is read: a
# stand-in rustc that prints its arguments shows what it was given in each case.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wrapper="$PWD/build/rustc-pgo.sh"
[ -f build/opsgate.profdata ] && [ -f build/opsgate.profdata.llvm ] || {
    echo "pgo-wrapper: build/opsgate.profdata or its .llvm is missing; run bench/pgo.sh" >&2
    exit 1
}
profile_llvm=$(cat build/opsgate.profdata.llvm)
host=$(uname -sm)

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# A rustc with LLVM $FAKE_LLVM: `-vV` as rustc prints it, else its arguments.
cat >"$dir/rustc" <<'SH'
#!/bin/sh
if [ "$1" = -vV ]; then
    echo "rustc 9.99.0"
    echo "LLVM version: $FAKE_LLVM.1.0"
    exit 0
fi
echo "$@"
SH
chmod +x "$dir/rustc"

failed=0
# expect yes|no, then the environment and rustc arguments of one compile.
expect() {
    local want=$1 got=no out
    shift
    out=$(env "$@")
    case $out in *profile-use=*) got=yes ;; esac
    if [ "$got" != "$want" ]; then
        echo "pgo-wrapper: profile $got, expected $want, for: $*" >&2
        failed=1
    fi
}
lib=(--crate-name hyper --edition=2021 src/lib.rs --crate-type lib)
x86=("${lib[@]}" -C opt-level=3 --target x86_64-unknown-linux-gnu)
now="FAKE_LLVM=$profile_llvm"
if [ "$host" = "Linux x86_64" ]; then
    expect yes "$now" "$wrapper" "$dir/rustc" "${lib[@]}" -C opt-level=3
fi
expect yes "$now" "$wrapper" "$dir/rustc" "${x86[@]}"
expect no "$now" "$wrapper" "$dir/rustc" "${lib[@]}" -C debuginfo=2
expect no "$now" "$wrapper" "$dir/rustc" "${lib[@]}" -C opt-level=3 --target aarch64-unknown-linux-gnu
expect no "$now" OPSGATE_NO_PGO=1 "$wrapper" "$dir/rustc" "${x86[@]}"
expect no "FAKE_LLVM=$((profile_llvm - 1))" "$wrapper" "$dir/rustc" "${x86[@]}"
expect no "$now" "$wrapper" "$dir/rustc" "${x86[@]}" -Cprofile-generate=/tmp/p
expect no "$now" "$wrapper" "$dir/rustc" "${x86[@]}" -Zsanitizer=address
# Changed functions are compiled without the profile silently, unless OPSGATE_PGO_WARN
# asks LLVM to name them (ci/check-docker-steps.sh).
case $(env "$now" "$wrapper" "$dir/rustc" "${x86[@]}") in
*no-pgo-warn-mismatch*) ;;
*) echo "pgo-wrapper: a release build warns about functions changed since the profile" >&2 && failed=1 ;;
esac
case $(env "$now" OPSGATE_PGO_WARN=1 "$wrapper" "$dir/rustc" "${x86[@]}") in
*no-pgo-warn-mismatch*) echo "pgo-wrapper: OPSGATE_PGO_WARN=1 did not turn the mismatch warnings on" >&2 && failed=1 ;;
*profile-use=*) ;;
*) echo "pgo-wrapper: OPSGATE_PGO_WARN=1 dropped the profile" >&2 && failed=1 ;;
esac
# Cargo's version query passes through unchanged: Cargo hashes it into every symbol's
# name, which the profile finds its functions by.
if [ "$(FAKE_LLVM=$profile_llvm "$wrapper" "$dir/rustc" -vV)" != "$(FAKE_LLVM=$profile_llvm "$dir/rustc" -vV)" ]; then
    echo "pgo-wrapper: rustc -vV did not pass through unchanged" >&2
    failed=1
fi
((failed == 0)) && echo "pgo-wrapper: release builds for x86_64 Linux read the profile; every other compile runs as given"
exit "$failed"
