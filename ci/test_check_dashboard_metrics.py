#!/usr/bin/env python3
"""Self-tests of check-dashboard-metrics.py (stdlib unittest)."""
import importlib.util
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "check-dashboard-metrics.py")
SAMPLE = os.path.join(HERE, "testdata", "metrics-sample.txt")
FILES = [os.path.join(ROOT, p) for p in (
    "deploy/grafana/opsgate.json", "deploy/prometheus/alerts.yml", "deploy/prometheus/recording.yml")]

spec = importlib.util.spec_from_file_location("cdm", SCRIPT)
cdm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cdm)


def run(metrics_text, files=FILES):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(metrics_text)
    try:
        return subprocess.run([sys.executable, SCRIPT, "--metrics", f.name, *files],
                              capture_output=True, text=True)
    finally:
        os.unlink(f.name)


class MetricNames(unittest.TestCase):
    def test_functions_labels_and_durations_are_not_metrics(self):
        expr = ('histogram_quantile(0.99, sum by (route, le) (rate(http_request_duration_seconds_bucket'
                '{job=~"$job", route!="system"}[$__rate_interval])))')
        self.assertEqual(cdm.metric_names(expr), {"http_request_duration_seconds_bucket"})

    def test_binary_ops_and_modifiers(self):
        expr = ('sum by (job) (rate(a_total{status=~"5.."}[5m])) / ignoring(status) group_left(x) b '
                'unless on (job) max by (job) (c) > 0 and d offset 5m or 1e3 * e')
        self.assertEqual(cdm.metric_names(expr), {"a_total", "b", "c", "d", "e"})

    def test_aggregation_with_trailing_by(self):
        self.assertEqual(cdm.metric_names("sum(rate(x_total[1m])) by (le)"), {"x_total"})

    def test_subquery_and_time(self):
        self.assertEqual(cdm.metric_names("max_over_time(y[1h:5m]) - time()"), {"y"})

    def test_yaml_block_and_plain_exprs(self):
        text = "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: |\n      foo\n        > 1\n    for: 1m\n" \
               "  - record: r:x\n    expr: 'bar{a=\"b\"}'\n"
        exprs, records = cdm.rules_exprs(text)
        self.assertEqual(exprs, ["foo\n> 1", 'bar{a="b"}'])
        self.assertEqual(records, {"r:x"})


class AgainstExposition(unittest.TestCase):
    def setUp(self):
        with open(SAMPLE, encoding="utf-8") as f:
            self.sample = f.read()

    def test_sample_passes(self):
        r = run(self.sample)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_missing_family_fails(self):
        text = "\n".join(l for l in self.sample.splitlines() if "circuit_breaker_state" not in l or "changes" in l)
        r = run(text + "\n")
        self.assertEqual(r.returncode, 1)
        self.assertIn("circuit_breaker_state ", r.stderr)

    def test_declared_family_without_series_counts(self):
        text = "\n".join(l for l in self.sample.splitlines()
                         if not l.startswith("circuit_breaker_state{"))
        r = run(text + "\n")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_openmetrics_counter_and_histogram_families(self):
        lines = []
        for l in self.sample.splitlines():
            if l.startswith(("# TYPE", "# HELP")) and l.split()[2].endswith("_total"):
                parts = l.split(" ", 3)
                parts[2] = parts[2][:-len("_total")]
                l = " ".join(parts)
            lines.append(l)
        text = "\n".join(lines) + "\n# EOF\n"
        self.assertIn("# TYPE http_requests counter", text)
        r = run(text)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        # Samples gone, only the declarations left: still exported.
        decl_only = "\n".join(l for l in lines if l.startswith("#")) + "\n# EOF\n"
        r = run(decl_only)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_histogram_needs_its_family(self):
        text = "\n".join(l for l in self.sample.splitlines() if "http_request_duration_seconds" not in l)
        r = run(text + "\n")
        self.assertEqual(r.returncode, 1)
        self.assertIn("http_request_duration_seconds_bucket", r.stderr)


if __name__ == "__main__":
    unittest.main()
