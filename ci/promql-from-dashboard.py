#!/usr/bin/env python3
"""Turn every PromQL expression of a Grafana dashboard into a Prometheus rules
file, so that `promtool check rules` can parse-check them.

Grafana variables are replaced by values of the right type first:
$__rate_interval, $__interval and $__range by "5m", any other $var or ${var}
by ".*" (they only appear inside regex label matchers in our dashboards).

Usage: promql-from-dashboard.py DASHBOARD.json > rules.json
(JSON is valid YAML, which promtool reads.)
"""
import json
import re
import sys

DURATION_VARS = re.compile(r"\$(?:\{)?(__rate_interval|__interval|__range|__interval_ms|__range_s)(?:\})?")
OTHER_VARS = re.compile(r"\$\{[A-Za-z0-9_]+(?::[a-z]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z0-9_]+\]\]")


def exprs(node, where="$"):
    """Yield (json path, expr) for every "expr" string in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str) and value.strip():
                yield where, value
            else:
                yield from exprs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from exprs(value, f"{where}[{i}]")


def substitute(expr):
    expr = DURATION_VARS.sub("5m", expr)
    return OTHER_VARS.sub(".*", expr)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        dashboard = json.load(f)
    rules = []
    for i, (where, expr) in enumerate(exprs(dashboard)):
        rules.append({"record": f"dashboard:expr_{i}", "expr": substitute(expr),
                      "labels": {"dashboard_path": where}})
    if not rules:
        sys.exit(f"{sys.argv[1]}: no PromQL expressions found")
    json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
