#!/usr/bin/env python3
"""Check that every metric the dashboard and the alert rules use is exported.

Usage:
  check-dashboard-metrics.py --metrics EXPOSITION.txt FILE...

FILE is a Grafana dashboard (.json), a Prometheus rules file (.yml/.yaml) or
a Markdown document whose ```promql blocks hold examples (.md).
EXPOSITION is the text of a live `/metrics` (Prometheus text format 0.0.4 or
OpenMetrics 1.0), e.g. `curl -s http://127.0.0.1:9901/metrics > metrics.txt`.

Every metric name in every PromQL expression is looked up in the exposition.
A name counts as exported when a sample of that name is present, or when a
`# TYPE` line declares a family it belongs to: for a histogram F, F_bucket,
F_count and F_sum; for a summary F, F, F_count and F_sum; for a counter F,
F and F_total (OpenMetrics names counter families without `_total`) and
F_created; for an info F, F_info. So a labelled family that has no series yet
(no breaker configured, say) still counts when it is declared.

Names produced by recording rules in the given rules files count as exported.
Exit status: 0 all found, 1 something missing, 2 usage or input error.
Python 3 standard library only.
"""
import argparse
import json
import re
import sys

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan", "start", "end",
}
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z0-9_]+\]\]")
TOKEN = re.compile(
    r"(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<other>.)",
    re.S,
)


def metric_names(expr):
    """The metric names a PromQL expression selects."""
    expr = STRING.sub('""', expr)          # label values, regexes
    expr = GRAFANA_VAR.sub("", expr)       # $job, ${__rate_interval}
    expr = re.sub(r"\{[^{}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", "", expr)  # ranges and subqueries
    expr = LABEL_LIST.sub("", expr)        # by (...), on (...), group_left(...)
    names = set()
    tokens = [m for m in TOKEN.finditer(expr) if not (m.group("other") or "").isspace()]
    for i, m in enumerate(tokens):
        ident = m.group("ident")
        if not ident or ident.lower() in KEYWORDS:
            continue
        nxt = tokens[i + 1].group("other") if i + 1 < len(tokens) else None
        if nxt == "(":                     # a function or aggregation
            continue
        names.add(ident)
    return names


def dashboard_exprs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for value in node:
            yield from dashboard_exprs(value)


def markdown_exprs(text):
    return [m.group(1) for m in re.finditer(r"^```promql[ \t]*\n(.*?)^```", text, re.S | re.M)]


def rules_exprs(text):
    """(exprs, recorded names) of a Prometheus rules YAML file.

    A small reader for the subset rule files use: `expr:` as a plain or quoted
    scalar on one line, or as a `|` / `>` block scalar.
    """
    exprs, records = [], set()
    lines = text.splitlines()
    i = 0
    key_re = re.compile(r"^(?P<indent>\s*)(?:-\s+)?(?P<key>expr|record):\s*(?P<rest>.*)$")
    while i < len(lines):
        m = key_re.match(lines[i])
        i += 1
        if not m:
            continue
        rest = m.group("rest").strip()
        if rest.startswith(("|", ">")):
            indent = len(lines[i - 1]) - len(lines[i - 1].lstrip())
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            value = "\n".join(block)
        else:
            value = re.sub(r"\s+#.*$", "", rest)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
        if m.group("key") == "expr":
            exprs.append(value)
        else:
            records.add(value)
    return exprs, records


def exported_names(text):
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                family, kind = parts[2], parts[3]
                names.add(family)
                if kind in ("histogram", "gaugehistogram"):
                    names.update(family + s for s in ("_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"))
                elif kind == "summary":
                    names.update(family + s for s in ("_count", "_sum", "_created"))
                elif kind == "counter":
                    base = family[:-len("_total")] if family.endswith("_total") else family
                    names.update((base + "_total", base + "_created"))
                elif kind == "info":
                    names.add(family + "_info")
            continue
        m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
        if m:
            names.add(m.group(0))
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", required=True, help="exposition text from a live /metrics")
    ap.add_argument("files", nargs="+", help="dashboard .json and rules .yml files")
    args = ap.parse_args()

    try:
        with open(args.metrics, encoding="utf-8") as f:
            exported = exported_names(f.read())
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not exported:
        print(f"error: {args.metrics}: no metrics found", file=sys.stderr)
        return 2

    used = {}  # name -> set of files
    recorded = set()
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if path.endswith(".md"):
            exprs = markdown_exprs(text)
        elif path.endswith(".json"):
            try:
                exprs = list(dashboard_exprs(json.loads(text)))
            except json.JSONDecodeError as e:
                print(f"error: {path}: {e}", file=sys.stderr)
                return 2
        else:
            exprs, records = rules_exprs(text)
            recorded |= records
        if not exprs:
            print(f"error: {path}: no PromQL expressions found", file=sys.stderr)
            return 2
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(path)

    missing = {n: files for n, files in used.items() if n not in exported and n not in recorded}
    for name in sorted(used):
        print(f"{'MISSING' if name in missing else 'ok':8} {name}")
    if missing:
        print(f"\n{len(missing)} of {len(used)} metric names are not exported:", file=sys.stderr)
        for name, files in sorted(missing.items()):
            print(f"  {name} (used in {', '.join(sorted(files))})", file=sys.stderr)
        return 1
    print(f"\nall {len(used)} metric names used are exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
