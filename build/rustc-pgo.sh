#!/bin/sh
# Cargo's rustc wrapper (.cargo/config.toml): profile-guided optimization. Release
# builds for x86_64 Linux compile every crate with build/opsgate.profdata, what an
# instrumented opsgate counted under load (bench/pgo.sh): the compiler lays out and
# inlines the code a proxied request runs by how often it ran. Every other compile runs
# rustc exactly as Cargo asked: debug and test builds, other targets, builds that
# instrument or sanitize themselves, a rustc whose LLVM is older than the one that wrote
# the profile (it could not read it), and any build with OPSGATE_NO_PGO set.
#
# A wrapper, not `rustflags`: the profile needs an absolute path (Cargo runs rustc in
# each dependency's own directory) and only release builds should read it. A stale
# profile costs speed, never correctness: functions changed since are compiled without.
# What `rustc -vV` answers passes through unchanged: Cargo hashes it into every symbol's
# name, and the profile finds its functions by name.
set -eu
rustc=$1
shift
here=$(dirname "$0")
profile="$here/opsgate.profdata"

use_profile() {
    [ -z "${OPSGATE_NO_PGO:-}" ] && [ -f "$profile" ] && [ -f "$profile.llvm" ] || return 1
    release=0 target=
    prev=
    for arg in "$@"; do
        case "$arg" in
        opt-level=3) release=1 ;;
        *profile-generate* | *profile-use* | *instrument-coverage* | *sanitizer* | *sancov*) return 1 ;;
        esac
        [ "$prev" = --target ] && target=$arg
        prev=$arg
    done
    [ "$release" = 1 ] || return 1
    if [ -n "$target" ]; then
        [ "$target" = x86_64-unknown-linux-gnu ] || return 1
    else
        [ "$(uname -sm)" = "Linux x86_64" ] || return 1
    fi
    # The profile's format is the LLVM version's that wrote it: only as new an LLVM reads it.
    llvm=$("$rustc" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    [ -n "$llvm" ] && [ "$llvm" -ge "$(cat "$profile.llvm")" ]
}

if use_profile "$@"; then
    abs=$(cd "$here" && pwd)/opsgate.profdata
    # Functions changed since the profile was made are compiled without it: silently,
    # unless OPSGATE_PGO_WARN is set. Then LLVM names each one with the largest count the
    # profile held for it, which ci/check-docker-steps.sh turns into a verdict.
    if [ -n "${OPSGATE_PGO_WARN:-}" ]; then
        exec "$rustc" "$@" -Cprofile-use="$abs"
    fi
    exec "$rustc" "$@" -Cprofile-use="$abs" -Cllvm-args=-no-pgo-warn-mismatch
fi
exec "$rustc" "$@"
