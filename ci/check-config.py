#!/usr/bin/env python3
"""Check the shipped opsgate config files against the documented keys.

Usage: check-config.py [--opsgate BIN] FILE...

FILE is an opsgate TOML file, or a Kubernetes ConfigMap YAML whose data key
`opsgate.toml` holds one. Each config is checked for:
  - TOML syntax;
  - keys: every key must be one the config reference (config/opsgate.toml)
    documents; unknown keys are errors in opsgate too;
  - closed sets: check types, maintenance mode, health details, encoded_slashes;
  - references: routes name a defined upstream, recover_on_check names a check,
    no `upstream` shorthand next to [upstreams.app], unique route/check names;
  - ${VAR} without a default (a config error when VAR is unset), so that the
    shipped files load with no environment set.
With --opsgate BIN, each config is also given to `BIN check-config`, with an
empty environment, which is the authoritative check.

Python 3.11+ standard library only (tomllib).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib

BREAKER = {
    "failure_threshold", "recovery_timeout", "half_open_max_calls", "success_threshold",
    "failure_status", "failure_rate", "window", "minimum_calls", "slow_call_duration",
    "max_half_open_wait", "max_recovery_timeout", "recover_on_check", "dry_run",
}
RETRY = {
    "attempts", "base_delay", "max_delay", "on", "per_try_timeout", "methods", "budget",
    "budget_min_per_second", "max_body",
}
ROUTE = {
    "name": None, "prefix": None, "host": None, "upstream": None, "class": None, "timeout": None,
    "strip_prefix": None, "rate_limit": {
        "per_second", "burst", "dry_run", "key", "scope", "max_keys",
    }, "breaker": BREAKER,
    "fallback": {"status", "content_type", "body"},
}
CHECK = {
    "name", "type", "url", "address", "critical", "interval", "timeout", "healthy_threshold",
    "unhealthy_threshold", "degraded_over", "query", "expect_status", "body_contains",
}
UPSTREAM = {
    "url": None, "connect_timeout": None, "timeout": None, "max_in_flight": None, "http2": None,
    "ca_file": None, "client_cert": None, "client_key": None, "preserve_host": None,
    "breaker": BREAKER, "retry": RETRY,
    "adaptive_concurrency": {"min_limit", "max_limit", "initial_limit", "dry_run"},
}
# table -> {key: None (a value) | set (an inline/sub table's keys) | dict (nested schema)}
SCHEMA = {
    "proxy": {
        "listen": None, "upstream": None, "tls": {"cert", "key"}, "max_header_bytes": None,
        "header_read_timeout": None, "shutdown_delay": None, "drain_timeout": None,
        "trusted_proxies": None, "encoded_slashes": None, "access_log": None,
    },
    "admin": {"listen": None, "token": None},
    "upstreams": "UPSTREAMS",
    "routes": ("LIST", ROUTE),
    "egress": {"listen": None, "routes": ("LIST", ROUTE)},
    "maintenance": {
        "enabled": None, "env": None, "flag_file": None, "mode": None, "exempt_prefixes": None,
        "allow_ips": None, "bypass_token": None, "retry_after": None, "status": None,
        "content_type": None, "body": None, "page": None, "fail_readiness": None,
        "windows": ("LIST", {"start": None, "end": None}),
    },
    "circuit": {"force_open_env": None},
    "health": {
        "prefix": None, "interval": None, "timeout": None, "details": None,
        "wait_for_critical": None, "checks": ("LIST", {k: None for k in CHECK}),
    },
    "metrics": {
        "path": None, "on_proxy_port": None, "buckets": None,
        "classes": ("LIST", {"prefix": None, "class": None}),
    },
    "control": {"redis_url": None, "key": None, "poll_interval": None, "key_prefix": None},
}
ENUMS = {
    ("proxy", "encoded_slashes"): {"keep", "reject"},
    ("maintenance", "mode"): {"writes", "all"},
    ("health", "details"): {"always", "on_failure", "never"},
}
CHECK_TYPES = {"postgres": "url", "redis": "url", "http": "url", "tcp": "address"}
NAME_RE = re.compile(r"^[a-z0-9_-]+$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
DURATION_RE = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)$")


def walk(value, schema, path, errors):
    """Check `value` (a dict) against `schema`."""
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a table")
        return
    for key, sub in value.items():
        where = f"{path}.{key}" if path else key
        if key not in schema:
            errors.append(f"{where}: unknown key")
            continue
        spec = schema[key]
        if spec is None:
            if isinstance(sub, dict):
                errors.append(f"{where}: expected a value, found a table")
        elif spec == "UPSTREAMS":
            if not isinstance(sub, dict):
                errors.append(f"{where}: expected a table of upstreams")
                continue
            for name, up in sub.items():
                walk(up, UPSTREAM, f"{where}.{name}", errors)
        elif isinstance(spec, tuple):
            if not isinstance(sub, list):
                errors.append(f"{where}: expected an array of tables")
                continue
            for i, item in enumerate(sub):
                walk(item, spec[1], f"{where}[{i}]", errors)
        elif isinstance(spec, set):
            if not isinstance(sub, dict):
                errors.append(f"{where}: expected a table")
                continue
            for k in sub:
                if k not in spec:
                    errors.append(f"{where}.{k}: unknown key")
        else:
            walk(sub, spec, where, errors)


def strings(value, path=""):
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from strings(v, f"{path}[{i}]")


def expand(value):
    """${VAR:-default} -> default, ${VAR} -> the variable (unset here)."""
    if isinstance(value, str):
        return VAR_RE.sub(lambda m: (m.group(2) or ":-")[2:], value)
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def semantic(cfg, errors):
    for (table, key), allowed in ENUMS.items():
        v = cfg.get(table, {}).get(key)
        if v is not None and v not in allowed:
            errors.append(f"{table}.{key}: {v!r} is not one of {sorted(allowed)}")

    upstreams = set(cfg.get("upstreams", {}))
    if "upstream" in cfg.get("proxy", {}):
        if "app" in upstreams:
            errors.append("proxy.upstream: the shorthand defines upstream \"app\", which [upstreams.app] defines too")
        upstreams.add("app")
    for name, up in cfg.get("upstreams", {}).items():
        if "url" not in up:
            errors.append(f"upstreams.{name}: missing url")
        elif not re.match(r"^https?://", up["url"]):
            errors.append(f"upstreams.{name}.url: must be http:// or https://")

    checks = [c.get("name") for c in cfg.get("health", {}).get("checks", [])]
    for i, c in enumerate(cfg.get("health", {}).get("checks", [])):
        where = f"health.checks[{i}]"
        t = c.get("type")
        if t not in CHECK_TYPES:
            errors.append(f"{where}.type: {t!r} is not one of {sorted(CHECK_TYPES)}")
        elif CHECK_TYPES[t] not in c:
            errors.append(f"{where}: a {t} check needs `{CHECK_TYPES[t]}`")
        if not c.get("name"):
            errors.append(f"{where}: missing name")
    dup = {n for n in checks if checks.count(n) > 1}
    if dup:
        errors.append(f"health.checks: duplicate names {sorted(dup)}")

    route_lists = [("routes", cfg.get("routes", []))]
    if "egress" in cfg:
        route_lists.append(("egress.routes", cfg["egress"].get("routes", [])))
    for table, routes in route_lists:
        names = [r.get("name") for r in routes]
        for i, r in enumerate(routes):
            where = f"{table}[{i}]"
            if not NAME_RE.match(str(r.get("name", ""))):
                errors.append(f"{where}.name: {r.get('name')!r} must match [a-z0-9_-]+")
            if not str(r.get("prefix", "")).startswith("/"):
                errors.append(f"{where}.prefix: must start with /")
            if r.get("upstream") not in upstreams:
                errors.append(f"{where}.upstream: {r.get('upstream')!r} is not a defined upstream")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            errors.append(f"{table}: duplicate names {sorted(dup)}")

    breakers = [(f"upstreams.{n}.breaker", u.get("breaker")) for n, u in cfg.get("upstreams", {}).items()]
    breakers += [(f"routes[{i}].breaker", r.get("breaker")) for i, r in enumerate(cfg.get("routes", []))]
    for where, b in breakers:
        if b and "recover_on_check" in b and b["recover_on_check"] not in checks:
            errors.append(f"{where}.recover_on_check: no health check named {b['recover_on_check']!r}")

    for path, s in strings(cfg):
        key = path.rsplit(".", 1)[-1]
        if key in {"shutdown_delay", "drain_timeout", "header_read_timeout", "connect_timeout", "timeout",
                   "recovery_timeout", "max_half_open_wait", "max_recovery_timeout", "base_delay", "max_delay",
                   "per_try_timeout", "retry_after", "interval", "wait_for_critical", "degraded_over",
                   "poll_interval", "window", "slow_call_duration"} and not DURATION_RE.match(s):
            errors.append(f"{path}: {s!r} is not a duration like \"250ms\" or \"30s\"")


def configmap_toml(text, path):
    """The `opsgate.toml: |` block of a ConfigMap, dedented."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)opsgate\.toml:\s*\|[-+]?\s*$", line)
        if not m:
            continue
        indent = len(m.group(1))
        block = []
        for l in lines[i + 1:]:
            if l.strip() and len(l) - len(l.lstrip()) <= indent:
                break
            block.append(l)
        body_indent = min((len(l) - len(l.lstrip()) for l in block if l.strip()), default=0)
        return "\n".join(l[body_indent:] for l in block) + "\n"
    raise ValueError(f"{path}: no `opsgate.toml: |` key in the ConfigMap")


def check(path, text, opsgate):
    errors = []
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"TOML: {e}"]
    for where, s in strings(cfg):
        for m in VAR_RE.finditer(s):
            if m.group(2) is None:
                errors.append(f"{where}: ${{{m.group(1)}}} has no default: the file fails to load when it is unset")
    walk(cfg, SCHEMA, "", errors)
    semantic(expand(cfg), errors)
    if opsgate:
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "opsgate.toml")
            with open(f, "w", encoding="utf-8") as fh:
                fh.write(text)
            try:
                r = subprocess.run([opsgate, "check-config", "--config", f], capture_output=True, text=True,
                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"opsgate check-config: {e}")
                return errors
            if r.returncode != 0:
                errors.append(f"opsgate check-config exited {r.returncode}: {(r.stdout + r.stderr).strip()}")
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--opsgate", help="opsgate binary: also run `opsgate check-config` on each file")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    failed = 0
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yml", ".yaml")):
            try:
                text = configmap_toml(text, path)
            except ValueError as e:
                print(f"FAIL {path}: {e}")
                failed += 1
                continue
        errors = check(path, text, args.opsgate)
        if errors:
            failed += 1
            print(f"FAIL {path}")
            for e in errors:
                print(f"  {e}")
        else:
            print(f"ok   {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
