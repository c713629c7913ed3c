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
# h2 (PyPI) for the HTTP/2 frames: from the interpreter if it has it, else from a venv of
# our own (Debian's system Python refuses pip installs).
py=python3
if ! "$py" -c 'import h2' 2>/dev/null; then
    venv="${CARGO_TARGET_DIR:-target}/hostile-venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet 'h2>=4,<5'
    fi
    py="$venv/bin/python"
fi
bin="${OPSGATE_BIN:-${CARGO_TARGET_DIR:-target}/debug/opsgate}"
if [[ -z "${OPSGATE_BIN:-}" ]]; then
    cargo build --quiet --locked --bin opsgate
fi
exec "$py" tests/hostile/hostile.py --bin "$bin" "${args[@]}" "$@"
