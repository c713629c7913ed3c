# Helpers the benchmark scripts share: free ports, config templates, waiting for a
# server. Sourced, after the script has set BASE_PORT.

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
NEXT_PORT=${BASE_PORT:?BASE_PORT must be set before sourcing bench/lib.sh}
alloc_port() { # sets $ALLOCATED (no subshell, so the counter moves on)
    while port_busy "$NEXT_PORT"; do NEXT_PORT=$((NEXT_PORT + 1)); done
    ALLOCATED=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
}

render() { # template out KEY=VALUE...: every @KEY@ in template replaced
    local tpl=$1 out=$2; shift 2
    local args=() kv
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$tpl" >"$out"
}

# url [seconds, 10] [status]: until it answers with that status, or at all when none is
# given (a 503 from a gate counts).
wait_http() {
    local url=$1 deadline=$((SECONDS + ${2:-10})) want=${3:-} got
    while :; do
        got=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null) || true
        if [[ -z $want && $got != 000 ]] || [[ $got == "$want" ]]; then
            return 0
        fi
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}
