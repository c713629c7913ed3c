#!/usr/bin/env bash
# The whole test suite: unit and integration tests (real upstreams, real PostgreSQL and
# Redis, throwaway servers for outages), then every shipped file against the built binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
target="${CARGO_TARGET_DIR:-target}"

# Its stdout is `export` lines: the test database's URL, and PATH when it installed node.
# (Assigned first: a failure inside "$(...)" given straight to eval would go unnoticed.)
deps_env="$(bash ci/install-test-deps.sh)"
eval "$deps_env"

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
else
    cargo test --locked --no-fail-fast
fi

cargo build --locked --bin opsgate
OPSGATE_BIN="$target/debug/opsgate" bash ci/interop.sh
OPSGATE_BIN="$target/debug/opsgate" bash ci/check-deploy.sh
bash ci/check-pgo-wrapper.sh
bash ci/check-docker-steps.sh
OPSGATE_BIN="$target/debug/opsgate" SCREENSHOT="$target/status-page.png" bash ci/check-status-page.sh
