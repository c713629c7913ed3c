#!/usr/bin/env bash
# Template (bench/run.sh placeholders) with ROUTES routes over UPSTREAMS
# upstreams, all pointing at the benchmark backend: the config for the reload
# measurement. Route i (prefix /r<i>) uses upstream i mod UPSTREAMS; the last
# route is the catch-all "/" (so /tiny still reaches the backend).
# Usage: bench/gen-routes.sh ROUTES UPSTREAMS > template.toml
set -euo pipefail
routes=${1:?routes} upstreams=${2:?upstreams}
cat <<'HEAD'
[proxy]
listen = "127.0.0.1:@PORT@"
access_log = @ACCESS_LOG@

[admin]
listen = "127.0.0.1:@ADMIN_PORT@"
HEAD
for ((u = 0; u < upstreams; u++)); do
    printf '\n[upstreams.u%03d]\nurl = "http://127.0.0.1:@BACKEND_PORT@"\n' "$u"
    printf '\n[upstreams.u%03d.breaker]\nfailure_threshold = 5\nrecovery_timeout = "30s"\n' "$u"
done
for ((r = 0; r < routes - 1; r++)); do
    printf '\n[[routes]]\nname = "r%03d"\nprefix = "/r%03d"\nupstream = "u%03d"\n' "$r" "$r" $((r % upstreams))
done
printf '\n[[routes]]\nname = "default"\nprefix = "/"\nupstream = "u000"\n'
