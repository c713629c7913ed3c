#!/usr/bin/env python3
"""Start an opsgate binary on loopback, send it a little traffic and save the
text of its /metrics, for check-dashboard-metrics.py and promtool.

Usage: live-metrics.py OPSGATE_BIN OUT.txt

The config enables every feature that registers metrics: a breaker, retries,
a rate-limited route, a fleet rate limit (on a Redis port nothing listens
on), adaptive concurrency, a maintenance flag file and a health check. The
upstream is a port nothing listens on, so requests fail, retry and open the
breaker. Only 127.0.0.1 is used; the process is stopped with SIGTERM (then
SIGKILL) however the script ends. Python 3 standard library only.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CONFIG = """
[proxy]
listen = "127.0.0.1:{proxy}"
drain_timeout = "1s"

[admin]
listen = "127.0.0.1:{admin}"

[upstreams.app]
url = "http://127.0.0.1:{dead}"
connect_timeout = "200ms"
timeout = "1s"
max_in_flight = 10

[upstreams.app.breaker]
failure_threshold = 3
recovery_timeout = "30s"

[upstreams.app.adaptive_concurrency]
min_limit = 2
max_limit = 100
initial_limit = 10

[upstreams.app.retry]
attempts = 2
base_delay = "10ms"
max_delay = "20ms"

[[routes]]
name = "api"
prefix = "/api"
upstream = "app"
rate_limit = {{ per_second = 1000, burst = 1000 }}

[[routes]]
name = "quota"
prefix = "/quota"
upstream = "app"
rate_limit = {{ per_second = 100, burst = 100, scope = "fleet", key = "client_ip" }}

[[routes]]
name = "default"
prefix = "/"
upstream = "app"

[control]
redis_url = "redis://127.0.0.1:{dead}"

[maintenance]
flag_file = "{flag}"

[health]
interval = "1s"
timeout = "500ms"

[[health.checks]]
name = "app"
type = "tcp"
address = "127.0.0.1:{dead}"
critical = false
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    binary, out = sys.argv[1], sys.argv[2]
    ports = {"proxy": free_port(), "admin": free_port(), "dead": free_port()}
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "opsgate.toml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(CONFIG.format(flag=os.path.join(d, "maintenance"), **ports))
        log = open(os.path.join(d, "opsgate.log"), "w+", encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPSGATE_LOG": "warn"}
        proc = subprocess.Popen([binary, "run", "--config", cfg], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            admin = f"http://127.0.0.1:{ports['admin']}"
            proxy = f"http://127.0.0.1:{ports['proxy']}"
            deadline = time.monotonic() + 15
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"opsgate exited with {proc.returncode}")
                try:
                    if get(f"{admin}/_health/live", 0.5)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("opsgate did not answer /_health/live within 15s")
                time.sleep(0.1)
            for path in ("/", "/api/x", "/api/y", "/", "/api/z", "/_health/ready", "/_health/nope"):
                get(proxy + path)
            time.sleep(1.5)  # one health check round
            status, body = get(f"{admin}/metrics")
            if status != 200:
                raise RuntimeError(f"GET /metrics answered {status}")
            with open(out, "wb") as f:
                f.write(body)
            print(f"saved {len(body)} bytes of /metrics to {out}")
        except Exception as e:  # report with the daemon's log
            log.seek(0)
            tail = log.read()[-3000:]
            print(f"error: {e}\n--- opsgate log (tail) ---\n{tail}", file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
