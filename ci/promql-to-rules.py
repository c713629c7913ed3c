#!/usr/bin/env python3
"""Turn every PromQL expression of Grafana dashboards (.json) and of the
```promql blocks of Markdown docs (.md) into one Prometheus rules file, so
that `promtool check rules` can parse-check them.

Grafana variables are replaced by values of the right type first:
$__rate_interval, $__interval and $__range by "5m", any other $var or ${var}
by ".*" (they only appear inside regex label matchers in our dashboards).

For dashboards, it also refuses one that would not import anywhere: every
datasource must be the `${DS_PROMETHEUS}` input (declared in `__inputs`) or
Grafana's built-in one, and panel ids and the dashboard uid must be set.

Usage: promql-to-rules.py FILE.json|FILE.md... > rules.json
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


def datasources(node, where="$"):
    """Yield (json path, uid) for every datasource reference."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                uid = value.get("uid") if isinstance(value, dict) else value
                yield f"{where}.{key}", uid
            else:
                yield from datasources(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from datasources(value, f"{where}[{i}]")


def portability_errors(dashboard):
    errors = []
    inputs = {i.get("name") for i in dashboard.get("__inputs", [])}
    if "DS_PROMETHEUS" not in inputs:
        errors.append("__inputs: no DS_PROMETHEUS datasource input")
    for where, uid in datasources(dashboard):
        if uid not in ("${DS_PROMETHEUS}", "-- Grafana --"):
            errors.append(f"{where}: datasource {uid!r} is not the ${{DS_PROMETHEUS}} input")
    if not dashboard.get("uid"):
        errors.append("uid: missing")
    ids = []
    def collect(panels):
        for p in panels:
            ids.append(p.get("id"))
            collect(p.get("panels", []))
    collect(dashboard.get("panels", []))
    if None in ids or len(ids) != len(set(ids)):
        errors.append("panels: every panel needs a unique id")
    return errors


def substitute(expr):
    expr = DURATION_VARS.sub("5m", expr)
    return OTHER_VARS.sub(".*", expr)


def markdown_exprs(text):
    """Yield (line, expr) for every expression of the ```promql fenced blocks."""
    for m in re.finditer(r"^```promql[ \t]*\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        # A blank line separates two expressions in one block.
        for part in re.split(r"\n\s*\n", m.group(1)):
            if part.strip():
                yield f"line {line}", part.strip()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rules, errors = [], []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".md"):
            found = list(markdown_exprs(text))
        else:
            dashboard = json.loads(text)
            errors += [f"{path}: {e}" for e in portability_errors(dashboard)]
            found = list(exprs(dashboard))
        if not found:
            errors.append(f"{path}: no PromQL expressions found")
        for where, expr in found:
            rules.append({"record": f"check:expr_{len(rules)}", "expr": substitute(expr),
                          "labels": {"source": f"{path} {where}"}})
    if errors:
        sys.exit("\n".join(errors))
    json.dump({"groups": [{"name": "promql", "rules": rules}]}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
