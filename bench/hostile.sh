#!/usr/bin/env bash
# Hostile clients against a live opsgate: one command, see docs/reliability.md.
#   bash bench/hostile.sh            # 10 minutes of attacks (the long mode)
#   bash bench/hostile.sh --short    # ~1 minute, what CI runs
#   bash bench/hostile.sh --duration 1800 --attackers 4   # any hostile.py option
# Exits non-zero when any pass criterion fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

args=(--duration 600)
if [[ "${1:-}" == "--short" ]]; then
    shift
    args=(--duration 30 --reset-streams 1000 --uploads 20)
fi
python3 -c 'import h2' 2>/dev/null || python3 -m pip install --quiet 'h2>=4,<5'
bin="${OPSGATE_BIN:-target/debug/opsgate}"
if [[ -z "${OPSGATE_BIN:-}" ]]; then
    cargo build --quiet --locked --bin opsgate
fi
exec python3 tests/hostile/hostile.py --bin "$bin" "${args[@]}" "$@"
