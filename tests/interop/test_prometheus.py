"""The real Prometheus server scraping opsgate's admin port every second, with the shipped
rules of deploy/prometheus loaded (a copy whose `for:` and group intervals are shortened).
A scripted scenario: traffic to a healthy app and to an upstream nobody listens on (its
breaker opens), a dependency check failing, a refused config reload, then maintenance on.
The alerts must fire (and HighErrorRate stop during maintenance), every rule must evaluate
cleanly, and the Grafana dashboard's queries must return data."""

import json
import re
import subprocess
import threading
import time
import urllib.parse

import pytest

from conftest import ROOT, Opsgate, free_port, http, http_json, port_open, start_asgi, wait_until

RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "opsgate.json"
JOB = "opsgate"
ALERT_LIMIT = 45.0

CONFIG = """
[upstreams.app]
url = "http://127.0.0.1:{app_port}"
connect_timeout = "1s"
timeout = "5s"

[upstreams.payments]
url = "http://127.0.0.1:{dead_port}"
connect_timeout = "500ms"
timeout = "2s"

[upstreams.payments.breaker]
failure_threshold = 2
recovery_timeout = "300s"

[[routes]]
name = "payments"
prefix = "/payments"
upstream = "payments"

[[routes]]
name = "app"
prefix = "/"
upstream = "app"

[health]
interval = "500ms"
timeout = "1s"

[[health.checks]]
name = "app-port"
type = "tcp"
address = "127.0.0.1:{app_port}"

[[health.checks]]
name = "queue"
type = "tcp"
address = "127.0.0.1:{dead_port}"
critical = false
"""

PROMETHEUS = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - alerts.yml
  - recording.yml
scrape_configs:
  - job_name: {job}
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:{admin_port}"]
"""

# Dashboard variables as Grafana would fill them for "All" on a 1 s scrape.
GRAFANA_VARS = {
    "$__rate_interval": "10s",
    "$__interval": "2s",
    "$__range": "5m",
    "$job": JOB,
    "$route": ".*",
}

# Panels fed by features this scenario does not configure (bulkheads, rate limits,
# retries, adaptive concurrency, fleet rate limits): their queries must evaluate, but may
# be empty.
OPTIONAL_PANELS = {
    "Shed, limited and retried",
    "Adaptive concurrency limit vs in flight",
    "Fleet rate limits enforced locally",
}


def shortened_rules(dst):
    """Copies of alerts.yml and recording.yml with every `for:` at 2s and group intervals at
    1s, so that the alerts fire within seconds."""
    text = (RULES / "alerts.yml").read_text()
    text, n = re.subn(r"^(\s+for:\s*)\S+", r"\g<1>2s", text, flags=re.M)
    assert n >= 4, f"expected the alerts' `for:` clauses in alerts.yml, found {n}"
    (dst / "alerts.yml").write_text(text)
    text = (RULES / "recording.yml").read_text()
    text, n = re.subn(r"^(\s+interval:\s*)\S+", r"\g<1>1s", text, flags=re.M)
    (dst / "recording.yml").write_text(text)
    # Control: the copies are still valid rule files.
    out = subprocess.run(["promtool", "check", "rules", dst / "alerts.yml", dst / "recording.yml"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


class Prometheus:
    def __init__(self, procs, workdir, admin_port):
        self.dir = workdir
        shortened_rules(workdir)
        (workdir / "prometheus.yml").write_text(PROMETHEUS.format(job=JOB, admin_port=admin_port))
        for attempt in range(4):
            self.port = free_port()
            self.proc = procs.start(
                f"prometheus-{attempt}",
                ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                cwd=workdir,
            )
            deadline = time.monotonic() + 20
            while self.proc.alive() and time.monotonic() < deadline:
                if port_open(self.port) and http("GET", self.url("/-/ready"), timeout=2)[0] == 200:
                    return
                time.sleep(0.05)
            self.proc.kill()
            if "address already in use" not in self.proc.log():
                break
        pytest.fail(f"prometheus did not start:\n{self.proc.log()}")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def api(self, path, **params):
        status, body = http_json("GET", self.url(f"/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert status == 200 and body["status"] == "success", (path, params, status, body)
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def alerts(self, state="firing"):
        return [a for a in self.api("alerts")["alerts"] if a["state"] == state]

    def firing(self, name, **labels):
        return [a for a in self.alerts() if a["labels"]["alertname"] == name
                and all(a["labels"].get(k) == v for k, v in labels.items())]


class Traffic(threading.Thread):
    """Steady client traffic (a few requests a second to each route) until stopped, so
    that counters grow between scrapes as they do in production."""

    def __init__(self, og):
        super().__init__(daemon=True)
        self.og = og
        self.stopping = threading.Event()
        self.sent = 0

    def run(self):
        deadline = time.monotonic() + 150
        while not self.stopping.is_set() and time.monotonic() < deadline:
            http("GET", self.og.url("/info"), timeout=5)
            http("GET", self.og.url("/payments/charge"), timeout=5)
            self.sent += 2
            self.stopping.wait(0.05)

    def stop(self):
        self.stopping.set()
        self.join(10)


def dashboard_queries():
    """(panel title, expression with the variables filled in) for every panel target."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                expr = t.get("expr")
                if not expr:
                    continue
                for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
                    expr = expr.replace(var, value)
                assert "$" not in expr, f"unfilled variable in {p.get('title')}: {expr}"
                out.append((p.get("title"), expr))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


@pytest.fixture
def stack(procs, tmp_path):
    _, app_port = start_asgi(procs)
    og = Opsgate(procs, tmp_path, CONFIG.format(app_port=app_port, dead_port=free_port()))
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = Prometheus(procs, prom_dir, og.admin_port)
    traffic = Traffic(og)
    traffic.start()
    yield og, prom, traffic
    traffic.stop()


def test_alerts_fire_and_dashboard_has_data(stack):
    og, prom, traffic = stack

    # The scrape works: OpenMetrics or text, Prometheus must parse what opsgate serves.
    def target_up():
        targets = prom.api("targets")["activeTargets"]
        return targets and targets[0]["health"] == "up" and targets[0]
    target = wait_until(target_up, "the opsgate target to be up", limit=20)
    assert target["lastError"] == "", target

    # A refused reload (ConfigReloadFailed has no `for:`).
    good = og.config_path.read_text()
    og.config_path.write_text(good + "\n[proxy]\nlisten = 42\n")
    status, body = og.admin("POST", "/_ops/reload")
    assert status == 422, (status, body)
    og.config_path.write_text(good)

    wait_until(lambda: og.breaker("payments")["state"] == "open", "breaker payments to open")

    expected = [
        ("CircuitBreakerOpen", {"breaker": "payments", "severity": "critical"}),
        ("DependencyUnhealthy", {"check": "queue", "critical": "false", "severity": "warning"}),
        ("HighErrorRate", {"route": "payments", "severity": "critical"}),
        ("ConfigReloadFailed", {"severity": "warning"}),
    ]
    for name, labels in expected:
        wait_until(lambda: prom.firing(name, **labels), f"alert {name} {labels} to fire "
                   f"(firing: {[a['labels'] for a in prom.alerts()]})", limit=ALERT_LIMIT, every=0.25)
    # The annotations' templates render with real labels and values.
    for alert in prom.alerts():
        for key, text in alert["annotations"].items():
            assert "error expanding template" not in text, (alert["labels"], key, text)
            assert "<no value>" not in text, (alert["labels"], key, text)
    assert not prom.firing("DependencyUnhealthy", check="app-port")
    assert not prom.firing("HighErrorRate", route="app")
    assert not prom.firing("MaintenanceModeOn")

    # Every shipped rule evaluates without error against real series.
    groups = prom.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"opsgate", "opsgate.recording"}, groups
    for g in groups:
        for r in g["rules"]:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
    assert prom.query("job_route_class:http_requests:rate5m"), "recording rule has no data"

    # The dashboard: its job variable lists our job, and its queries return data.
    jobs = prom.api("label/job/values", **{"match[]": "http_requests_total"})
    assert JOB in jobs, jobs
    empty = []
    for title, expr in dashboard_queries():
        if not prom.query(expr) and title not in OPTIONAL_PANELS:
            empty.append((title, expr))
    assert not empty, f"dashboard queries without data: {empty}"

    # Maintenance on: its alert fires, and the intended 503s silence HighErrorRate.
    status, body = og.admin("PUT", "/_ops/maintenance", {"enabled": True, "reason": "interop"})
    assert status == 200 and body["enabled"], body
    wait_until(lambda: prom.firing("MaintenanceModeOn", job=JOB, severity="info"),
               "alert MaintenanceModeOn to fire", limit=ALERT_LIMIT, every=0.25)
    wait_until(lambda: not prom.firing("HighErrorRate"), "HighErrorRate to stop in maintenance",
               limit=ALERT_LIMIT, every=0.25)
    assert prom.query(f'max(maintenance_mode{{job="{JOB}"}})')[0]["value"][1] == "1"
    assert traffic.is_alive() and traffic.sent > 0
