#!/usr/bin/env bash
# Builds the bare hyper proxy into target/bare-hyper and prints the binary's path.
# Shared by bench/run.sh and bench/callgrind.sh; build output goes to stderr. Built as
# hyper's users build it: without opsgate's optimization profile (build/rustc-pgo.sh).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TARGET_DIR="$(cd "$HERE/../.." && pwd)/target/bare-hyper"
(cd "$HERE" && OPSGATE_NO_PGO=1 CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --locked --quiet) >&2
echo "$TARGET_DIR/release/bare-hyper"
