#!/usr/bin/env python3
"""Chaos soak: steady wrk load through opsgate while a schedule reloads its config,
kills its upstream and dependencies, injects network faults and finally stops it with
SIGTERM. Accounts for every request (from bench/soak/load.lua's logs), samples RSS and
fds, times readiness against its bound, and exits 0 only when every criterion holds.
Run through bench/soak.sh; docs/soak.md explains the schedule and the figures."""
import argparse
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PG_BIN = None
for v in ("17", "16", "15", "14", "13"):
    if os.path.exists(f"/usr/lib/postgresql/{v}/bin/postgres"):
        PG_BIN = f"/usr/lib/postgresql/{v}/bin"
        break

# Health timing: the bound a check must follow an outage (and a recovery) within.
CHECK_INTERVAL = 1.0
CHECK_TIMEOUT = 0.5
UNHEALTHY_THRESHOLD = 2
HEALTHY_THRESHOLD = 2
BOUND_DOWN = CHECK_INTERVAL * UNHEALTHY_THRESHOLD + CHECK_TIMEOUT
BOUND_UP = CHECK_INTERVAL * HEALTHY_THRESHOLD + CHECK_TIMEOUT
POLL = 0.025  # readiness poll period; measurements carry this granularity
# Proxy timing: how long after a fault ends its answers may still be fault answers
# (breaker recovery_timeout + two attempts' timeout + a margin).
ROUTE_TIMEOUT = 1.0
RECOVERY_TIMEOUT = 2.0
GRACE = RECOVERY_TIMEOUT + 2 * ROUTE_TIMEOUT + 1.0
SHUTDOWN_DELAY = 1.0
DRAIN_TIMEOUT = 10.0
EXPECTED = {502: "unavailable", 503: "circuit", 504: "timeout"}


def now():
    return time.time()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=0.2):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(cond, timeout, step=0.02):
    end = now() + timeout
    while now() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def redis_cmd(port, *args):
    """One RESP command on a fresh connection; returns the raw first reply line."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(payload.encode())
        return s.recv(256).split(b"\r\n")[0].decode()


class Procs:
    """Every child runs in its own session, so it is killed (with its children) by id."""

    def __init__(self):
        self.live = {}

    def start(self, name, argv, log_path, **kw):
        f = open(log_path, "ab")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.live[name] = p
        return p

    def kill(self, name, sig=signal.SIGKILL):
        p = self.live.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def kill_all(self):
        for name in list(self.live):
            self.kill(name)


class Netns:
    """A namespace with one veth pair and a /30 that exists only between the two ends."""

    def __init__(self, tag):
        self.name = f"opsgate-soak-{tag}"
        self.host_if = f"sk{tag}a"[:15]
        self.ns_if = f"sk{tag}b"[:15]
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        for third in range(77, 250):
            net = ipaddress.ip_network(f"10.254.{third}.0/30")
            if f"10.254.{third}." not in used:
                break
        hosts = list(net.hosts())
        self.host_ip, self.ns_ip = str(hosts[0]), str(hosts[1])
        self.created = False

    def sh(self, *argv, ns=False):
        cmd = (["ip", "netns", "exec", self.name] if ns else []) + list(argv)
        subprocess.run(cmd, check=True, capture_output=True)

    def up(self):
        self.sh("ip", "netns", "add", self.name)
        self.created = True
        self.sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.sh("ip", "link", "set", self.ns_if, "netns", self.name)
        self.sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self.sh("ip", "link", "set", self.host_if, "up")
        self.sh("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, ns=True)
        self.sh("ip", "link", "set", self.ns_if, "up", ns=True)
        self.sh("ip", "link", "set", "lo", "up", ns=True)

    def link(self, up):
        self.sh("ip", "link", "set", self.ns_if, "up" if up else "down", ns=True)

    def down(self):
        if not self.created:
            return
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        self.created = False


class Poller(threading.Thread):
    """Polls readiness and the dependency checks on the admin port; keeps transitions."""

    def __init__(self, admin_port, names):
        super().__init__(daemon=True)
        self.port = admin_port
        self.paths = {"ready": "/_health/ready", **{n: f"/_health/checks/{n}" for n in names}}
        self.state = {k: None for k in self.paths}
        self.transitions = {k: [] for k in self.paths}
        self.stop = threading.Event()

    def run(self):
        conn = None
        while not self.stop.is_set():
            for key, path in self.paths.items():
                code = 0
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                    conn.request("GET", path)
                    r = conn.getresponse()
                    r.read()
                    code = r.status
                except (OSError, http.client.HTTPException):
                    conn = None
                t = now()
                if code != self.state[key]:
                    self.state[key] = code
                    self.transitions[key].append((t, code))
            self.stop.wait(POLL)

    def first(self, key, code, after):
        """Seconds from `after` until `key` was first seen answering `code`."""
        state = None
        for t, c in self.transitions[key]:
            if t <= after:
                state = c
                continue
            if state == code:
                return 0.0
            if c == code:
                return t - after
        return 0.0 if state == code else None


class Sampler(threading.Thread):
    def __init__(self, pid, period):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples = []  # (t, rss KiB, fds)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
                self.samples.append((now(), rss, fds))
            except (OSError, StopIteration):
                pass
            self.stop.wait(self.period)


def slope(points):
    """Least-squares slope of (t, y) points, per second."""
    n = len(points)
    if n < 3:
        return 0.0
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0


class Soak:
    def __init__(self, args):
        self.a = args
        self.out = args.out
        self.procs = Procs()
        self.netns = Netns(args.tag or str(os.getpid()))
        self.windows = []  # (target, start, end, kind)
        self.outages = []  # (dependency, down_at, back_at)
        self.events = []  # (t, text) for the report
        self.reload_results = {"valid_ok": 0, "invalid_rejected": 0, "unexpected": []}
        self.reload_n = 0
        self.active = {}
        self.t_term = self.t_closed = self.t_exit = None
        self.exit_code = None
        self.probes = []

    # ---------- setup ----------
    def ports(self):
        self.proxy_port, self.admin_port = free_port(), free_port()
        self.up_port, self.relay_port, self.ctl_port = free_port(), free_port(), free_port()
        self.redis_port, self.pg_port, self.ns_port = free_port(), free_port(), free_port()

    def start_upstream(self):
        self.procs.start("upstream", [sys.executable, f"{HERE}/upstream.py", "--listen", f"127.0.0.1:{self.up_port}"],
                         f"{self.out}/upstream.log")
        return wait_for(lambda: port_open("127.0.0.1", self.up_port), 5)

    def start_redis(self):
        self.procs.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port),
                                   "--save", "", "--appendonly", "no"], f"{self.out}/redis.log")

        def pong():
            try:
                return redis_cmd(self.redis_port, "PING") == "+PONG"
            except OSError:
                return False
        ok = wait_for(pong, 5)
        # The fleet key is absent after a restart (no persistence): publish it off again.
        redis_cmd(self.redis_port, "SET", "opsgate:soak:maintenance", "off")
        redis_cmd(self.redis_port, "PUBLISH", "opsgate:soak:maintenance", "off")
        return ok

    def pg_ready(self):
        r = subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)],
                           capture_output=True)
        return r.returncode == 0

    def start_pg(self):
        kw = {}
        if os.getuid() == 0:
            kw = {"user": "postgres", "group": "postgres", "cwd": "/tmp"}
        self.procs.start("postgres", [f"{PG_BIN}/postgres", "-D", self.pgdata, "-p", str(self.pg_port),
                                      "-k", self.pgdata, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                      "-c", "max_connections=30", "-c", "shared_buffers=16MB"],
                         f"{self.out}/postgres.log", **kw)
        return wait_for(self.pg_ready, 15, step=0.02)

    def init_pg(self):
        self.pgdata = tempfile.mkdtemp(prefix="opsgate-soak-pg-", dir="/tmp")
        kw = {}
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.pgdata, pw.pw_uid, pw.pw_gid)
            kw = {"user": "postgres", "group": "postgres"}
        subprocess.run([f"{PG_BIN}/initdb", "-D", self.pgdata, "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, cwd="/tmp", **kw)

    def config(self, variant):
        """The config text; valid variants differ in harmless settings, invalid ones are
        broken the ways an operator breaks a file."""
        connect = ["500ms", "400ms", "600ms"][variant % 3]
        base = ["20ms", "30ms"][variant % 2]
        extra = '\n[[routes]]\nname = "extra"\nprefix = "/extra"\nupstream = "app"\n' if variant % 4 == 1 else ""
        text = f"""# Generated by bench/soak/soak.py (variant {variant})
[proxy]
listen = "127.0.0.1:{self.proxy_port}"
header_read_timeout = "5s"
shutdown_delay = "{int(SHUTDOWN_DELAY * 1000)}ms"
drain_timeout = "{int(DRAIN_TIMEOUT)}s"
access_log = false

[admin]
listen = "127.0.0.1:{self.admin_port}"

[upstreams.app]
url = "http://127.0.0.1:{self.relay_port}"
connect_timeout = "{connect}"
timeout = "{int(ROUTE_TIMEOUT * 1000)}ms"

[upstreams.app.breaker]
failure_threshold = 5
recovery_timeout = "{int(RECOVERY_TIMEOUT)}s"
half_open_max_calls = 3
success_threshold = 2

[upstreams.app.retry]
attempts = 2
base_delay = "{base}"
max_delay = "100ms"
methods = ["GET"]

[upstreams.ns]
url = "http://{self.netns.ns_ip}:{self.ns_port}"
connect_timeout = "{connect}"
timeout = "{int(ROUTE_TIMEOUT * 1000)}ms"

[upstreams.ns.breaker]
failure_threshold = 5
recovery_timeout = "{int(RECOVERY_TIMEOUT)}s"

[[routes]]
name = "api"
prefix = "/api"
upstream = "app"

[[routes]]
name = "ns"
prefix = "/ns"
upstream = "ns"
{extra}
[health]
interval = "{int(CHECK_INTERVAL * 1000)}ms"
timeout = "{int(CHECK_TIMEOUT * 1000)}ms"

[[health.checks]]
name = "db"
type = "postgres"
url = "postgres://postgres@127.0.0.1:{self.pg_port}/postgres"
unhealthy_threshold = {UNHEALTHY_THRESHOLD}
healthy_threshold = {HEALTHY_THRESHOLD}

[[health.checks]]
name = "cache"
type = "redis"
url = "redis://127.0.0.1:{self.redis_port}"
unhealthy_threshold = {UNHEALTHY_THRESHOLD}
healthy_threshold = {HEALTHY_THRESHOLD}

[control]
redis_url = "redis://127.0.0.1:{self.redis_port}"
key = "opsgate:soak:maintenance"
poll_interval = "1s"
"""
        return text

    INVALID = [
        ("syntax", lambda t: t.replace("[[routes]]", "[[routes]", 1)),
        ("unknown key", lambda t: t.replace('upstream = "app"', 'upstream = "app"\ntimeoutt = "1s"', 1)),
        ("bad duration", lambda t: t.replace('base_delay = "', 'base_delay = "soon', 1)),
        ("unset variable", lambda t: t.replace('key = "opsgate:soak:', 'key = "${SOAK_UNSET_VARIABLE}:', 1)),
    ]

    def write_config(self, text):
        tmp = self.cfg_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.cfg_path)  # atomic, as a ConfigMap update is

    def admin(self, method, path, timeout=3):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def setup(self):
        self.ports()
        log(f"output in {self.out}")
        self.netns.up()
        self.init_pg()
        if not (self.start_upstream() and self.start_redis() and self.start_pg()):
            raise RuntimeError("a dependency did not start")
        self.procs.start("ns-upstream", ["ip", "netns", "exec", self.netns.name, sys.executable,
                                         f"{HERE}/upstream.py", "--listen", f"{self.netns.ns_ip}:{self.ns_port}"],
                         f"{self.out}/ns-upstream.log")
        self.procs.start("relay", [sys.executable, f"{HERE}/relay.py", "--listen", f"127.0.0.1:{self.relay_port}",
                                   "--control", f"127.0.0.1:{self.ctl_port}",
                                   "--target", f"127.0.0.1:{self.up_port}"], f"{self.out}/relay.log")
        if not wait_for(lambda: port_open("127.0.0.1", self.ctl_port), 5):
            raise RuntimeError("relay did not start")
        self.cfg_path = f"{self.out}/opsgate.toml"
        self.valid_text = self.config(0)
        self.write_config(self.valid_text)
        env = dict(os.environ, OPSGATE_LOG=os.environ.get("OPSGATE_LOG", "info"))
        env.pop("SOAK_UNSET_VARIABLE", None)
        self.opsgate = self.procs.start("opsgate", [self.a.bin, "run", "--config", self.cfg_path],
                                        f"{self.out}/opsgate.log", env=env)
        if not wait_for(lambda: port_open("127.0.0.1", self.proxy_port), 10):
            raise RuntimeError("opsgate did not start; see opsgate.log")

        def ready():
            try:
                return self.admin("GET", "/_health/ready", 1)[0] == 200
            except OSError:
                return False
        if not wait_for(ready, 20, step=0.1):
            raise RuntimeError("opsgate never became ready; see opsgate.log")
        log(f"opsgate pid {self.opsgate.pid} on :{self.proxy_port} (admin :{self.admin_port}), "
            f"upstream via relay :{self.relay_port}, ns upstream {self.netns.ns_ip}:{self.ns_port}")

    # ---------- actions ----------
    def event(self, text):
        self.events.append((now(), text))

    def relay_ctl(self, cmd):
        with socket.create_connection(("127.0.0.1", self.ctl_port), timeout=2) as s:
            s.sendall(cmd.encode() + b"\n")
            return s.recv(128).decode().strip()

    def fault_start(self, target, kind, fn):
        fn()
        self.active[(target, kind)] = now()
        self.event(f"fault {kind} on {target} starts")

    def fault_end(self, target, kind, fn):
        fn()
        t = now()
        self.windows.append((target, self.active.pop((target, kind)), t, kind))
        self.event(f"fault {kind} on {target} ends")

    def reload(self):
        i = self.reload_n
        self.reload_n += 1
        invalid = i % 3 == 2
        if invalid:
            name, breaker = self.INVALID[(i // 3) % len(self.INVALID)]
            text = breaker(self.valid_text)
        else:
            name = f"valid variant {i % 5}"
            text = self.valid_text = self.config(i % 5)
        want_sha = hashlib.sha256(self.valid_text.encode()).hexdigest()
        self.write_config(text)
        via = "POST /_ops/reload" if i % 2 else "SIGHUP"
        if via == "SIGHUP":
            os.kill(self.opsgate.pid, signal.SIGHUP)
        else:
            try:
                status, body = self.admin("POST", "/_ops/reload")
            except OSError as e:
                status, body = 0, str(e).encode()
            if status != (422 if invalid else 200):
                self.reload_results["unexpected"].append(f"reload {i} ({name}) via POST answered {status}: {body[:200]!r}")

        def settled():
            try:
                st = json.loads(self.admin("GET", "/_ops/status", 1)[1])
                cfg = st["config"]
                res = (cfg.get("last_reload") or {}).get("result")
                return cfg.get("sha256") == want_sha and res == ("failure" if invalid else "success")
            except (OSError, ValueError, KeyError, TypeError):
                return False
        if wait_for(settled, 3, step=0.05):
            self.reload_results["invalid_rejected" if invalid else "valid_ok"] += 1
        else:
            self.reload_results["unexpected"].append(f"reload {i} ({name}) via {via}: status did not show the "
                                                     f"expected config sha and result within 3s")

    def sighup_burst(self):
        for _ in range(20):
            os.kill(self.opsgate.pid, signal.SIGHUP)
            time.sleep(0.005)
        self.event("SIGHUP burst x20")

    def outage(self, dep):
        self.procs.kill({"redis": "redis", "db": "postgres"}[dep])
        t_down = now()
        self.active[("dep", dep)] = t_down
        self.event(f"{dep} killed")

    def restore(self, dep):
        ok = self.start_redis() if dep == "redis" else self.start_pg()
        t_back = now()
        self.outages.append((dep, self.active.pop(("dep", dep)), t_back))
        self.event(f"{dep} back (serving: {ok})")

    def schedule(self, d):
        """(offset s, action) pairs for a run of d seconds; faults never overlap the final
        SIGTERM, dependency outages never overlap each other."""
        s = []
        relay_faults = [
            ("delay", lambda: self.relay_ctl("delay 300"), 5),
            ("stall", lambda: self.relay_ctl("stall"), 4),
            ("reset", lambda: self.relay_ctl("reset"), 3),
            ("blackhole", lambda: self.relay_ctl("blackhole"), 4),
        ]
        up_kill = ("upstream-kill", lambda: self.procs.kill("upstream"), 1.5)
        partition = ("partition", lambda: self.netns.link(False), 5)
        # Network/upstream faults: one every `slot` s, cycling through the kinds.
        kinds = [up_kill, relay_faults[0], partition, relay_faults[1], relay_faults[2], up_kill,
                 relay_faults[3]]
        slot = 20.0 if d >= 300 else 7.0
        t, k = 6.0, 0
        while t + 6 + GRACE < d - 8:
            name, start, length = kinds[k % len(kinds)]
            target = "ns" if name == "partition" else "api"
            if name == "upstream-kill":
                end = self.start_upstream
            elif name == "partition":
                end = lambda: self.netns.link(True)  # noqa: E731
            else:
                end = lambda: self.relay_ctl("pass")  # noqa: E731
            s.append((t, lambda tg=target, n=name, f=start: self.fault_start(tg, n, f)))
            s.append((t + length, lambda tg=target, n=name, f=end: self.fault_end(tg, n, f)))
            t += slot
            k += 1
        # Dependency outages, alternating, each 6 s, spaced so readiness settles between.
        dep_slot = 50.0 if d >= 300 else 14.0
        t, k = 4.0, 0
        while t + 6 + BOUND_UP + 2 < d - 8:
            dep = ["redis", "db"][k % 2]
            s.append((t, lambda x=dep: self.outage(x)))
            s.append((t + 6, lambda x=dep: self.restore(x)))
            t += dep_slot
            k += 1
        # Reloads spread evenly: 100 in a full run.
        n = 100 if d >= 300 else max(10, int(d / 4))
        for i in range(n):
            s.append((2.0 + i * (d - 10) / n, self.reload))
        # SIGHUP bursts.
        for t in range(int(d / 8) if d < 300 else 45, int(d) - 8, 60 if d >= 300 else int(d / 2)):
            s.append((float(t) + 0.5, self.sighup_burst))
        return sorted(s, key=lambda x: x[0])

    # ---------- run ----------
    def shutdown_probe(self, path, delay):
        time.sleep(delay)
        rec = {"path": path, "sent": now()}
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port, timeout=DRAIN_TIMEOUT + 5)
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            rec["status"] = r.status
        except (OSError, http.client.HTTPException) as e:
            rec["status"] = 0
            rec["error"] = repr(e)
        rec["done"] = now()
        self.probes.append(rec)

    def run(self):
        d = self.a.seconds
        self.setup()
        self.poller = Poller(self.admin_port, ["db", "cache"])
        self.poller.start()
        self.sampler = Sampler(self.opsgate.pid, 1.0 if d < 300 else 2.0)
        self.sampler.start()
        wrk = self.procs.start("wrk", ["wrk", "-t", str(self.a.conns), "-c", str(self.a.conns),
                                       "-d", f"{int(d) + 60}s", "--timeout", "30s", "-s", f"{HERE}/load.lua",
                                       f"http://127.0.0.1:{self.proxy_port}", "--", self.out,
                                       str(self.a.delay_ms), "5"], f"{self.out}/wrk.out",
                               env=dict(os.environ, SOAK_WRK_OUT=self.out))
        self.t0 = t0 = now()
        log(f"load: wrk, {self.a.conns} connections, {self.a.delay_ms} ms between requests on each; "
            f"soak for {d:.0f} s")
        plan = self.schedule(d)
        for off, action in plan:
            delay = t0 + off - now()
            if delay > 0:
                time.sleep(delay)
            try:
                action()
            except Exception as e:  # noqa: BLE001 - a failed action is reported, the soak goes on
                self.event(f"action failed: {e!r}")
                log(f"action failed: {e!r}")
            if self.opsgate.poll() is not None:
                log(f"opsgate exited early with {self.opsgate.returncode}")
                break
        time.sleep(max(0.0, t0 + d - now()))
        # SIGTERM under load, with slow requests in flight (answered after the signal) and
        # more arriving during shutdown_delay (answered after the listener closed).
        slow = f"/api/slow?ms={int(ROUTE_TIMEOUT * 900)}"
        probes = [threading.Thread(target=self.shutdown_probe, args=(slow, 0.0)) for _ in range(5)]
        probes += [threading.Thread(target=self.shutdown_probe, args=(slow, SHUTDOWN_DELAY * 0.6))
                   for _ in range(5)]
        for p in probes[:5]:
            p.start()
        time.sleep(0.3)
        self.t_term = now()
        os.kill(self.opsgate.pid, signal.SIGTERM)
        self.event("SIGTERM")
        for p in probes[5:]:
            p.start()
        # When did the listener stop accepting?
        while self.opsgate.poll() is None and now() - self.t_term < DRAIN_TIMEOUT + 5:
            if self.t_closed is None and not port_open("127.0.0.1", self.proxy_port, 0.05):
                self.t_closed = now()
            time.sleep(0.01)
        try:
            self.exit_code = self.opsgate.wait(timeout=DRAIN_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            self.exit_code = None
        self.t_exit = now()
        if self.t_closed is None:
            self.t_closed = self.t_exit
        # The poll above sees the close up to one poll late, more on a busy machine; opsgate
        # logs the moment its listeners closed, so requests wrk wrote after it are not
        # counted as sent to a live listener.
        logged = self.logged_close()
        if logged is not None and self.t_term <= logged < self.t_closed:
            self.t_closed = logged
        wrk.send_signal(signal.SIGINT)
        try:
            wrk.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.procs.live.pop("wrk", None)
        for p in probes:
            p.join(timeout=DRAIN_TIMEOUT + 5)
        self.poller.stop.set()
        self.sampler.stop.set()

    def logged_close(self):
        """When opsgate logged that its listeners closed (epoch seconds), if it did."""
        try:
            with open(f"{self.out}/opsgate.log") as f:
                for line in f:
                    if "listeners closed" not in line:
                        continue
                    ts = json.loads(line)["timestamp"]
                    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except (OSError, ValueError, KeyError):
            pass
        return None

    # ---------- accounting ----------
    def in_window(self, target, t_start, t_end):
        for tg, a, b, _ in self.windows:
            if tg == target and t_start <= b + GRACE and t_end >= a - 0.05:
                return True
        return False

    def coverage(self, target):
        """Share of the load's time that lay inside `target`'s fault windows (with grace)."""
        spans = sorted((a - 0.05, b + GRACE) for tg, a, b, _ in self.windows if tg == target)
        covered, end = 0.0, self.t0
        for a, b in spans:
            a, b = max(a, end), min(b, self.t_term)
            if b > a:
                covered += b - a
                end = b
        return covered / max(1e-9, self.t_term - self.t0)

    def account(self):
        acc = {"sent": 0, "2xx": 0, "fault_answers": 0, "fault_by_status": {}, "lost_outside": 0,
               "lost_in_fault": 0, "cut_at_shutdown": 0, "after_listener_closed": 0, "after_exit": 0}
        lost_samples = []
        for fn in sorted(os.listdir(self.out)):
            if not (fn.startswith("wrk-") and fn.endswith(".log")):
                continue
            pending = None

            def unanswered(s):
                t, kind = s
                if t >= self.t_exit:
                    acc["after_exit"] += 1
                    return
                if t >= self.t_closed - 0.02:
                    acc["after_listener_closed"] += 1
                    return
                acc["sent"] += 1
                if t >= self.t_term - 2 * ROUTE_TIMEOUT:
                    acc["cut_at_shutdown"] += 1
                    lost_samples.append(f"cut at shutdown: {kind} sent {t - self.t0:.3f}s")
                elif self.in_window("ns" if kind == "n" else "api", t, t + 2 * ROUTE_TIMEOUT):
                    acc["lost_in_fault"] += 1
                    lost_samples.append(f"no answer in a fault window: {kind} sent {t - self.t0:.3f}s")
                else:
                    acc["lost_outside"] += 1
                    lost_samples.append(f"no answer: {kind} sent {t - self.t0:.3f}s")

            with open(f"{self.out}/{fn}") as f:
                for line in f:
                    p = line.split()
                    if not p:
                        continue
                    if p[0] == "S":
                        if pending:
                            unanswered(pending)
                        pending = (float(p[1]), p[2])
                    elif p[0] == "R" and pending:
                        t_s, kind = pending
                        pending = None
                        acc["sent"] += 1
                        status, tag, t_r = int(p[2]), p[3], float(p[1])
                        target = "ns" if kind == "n" else "api"
                        if 200 <= status < 300:
                            acc["2xx"] += 1
                        elif EXPECTED.get(status) == tag and self.in_window(target, t_s, t_r):
                            acc["fault_answers"] += 1
                            acc["fault_by_status"][status] = acc["fault_by_status"].get(status, 0) + 1
                        elif self.in_window(target, t_s, t_r):
                            acc["lost_in_fault"] += 1
                            lost_samples.append(f"{status} {tag} in a fault window: {kind} sent {t_s - self.t0:.3f}s")
                        else:
                            acc["lost_outside"] += 1
                            lost_samples.append(f"{status} {tag}: {kind} sent {t_s - self.t0:.3f}s "
                                                f"answered after {t_r - t_s:.3f}s")
            if pending:
                unanswered(pending)  # wrk stops only after opsgate exited
        probes_cut = [p for p in self.probes if p.get("status") != 200]
        acc["cut_at_shutdown"] += len(probes_cut)
        acc["samples"] = lost_samples[:40]
        acc["probes"] = self.probes
        return acc

    def resources(self):
        s = [x for x in self.sampler.samples if x[0] < self.t_term]
        if len(s) < 4:
            return {"ok": False, "why": "too few samples"}
        # Skip the first tenth: allocator pools and connection pools fill up then.
        steady = [x for x in s if x[0] >= s[0][0] + (s[-1][0] - s[0][0]) * 0.1]
        span = steady[-1][0] - steady[0][0]
        rss_slope = slope([(t, r) for t, r, _ in steady])  # KiB/s
        fd_slope = slope([(t, f) for t, _, f in steady])
        q = max(1, len(steady) // 4)
        r = {
            "samples": len(s),
            "rss_kib_first": s[0][1], "rss_kib_max": max(x[1] for x in s), "rss_kib_last": s[-1][1],
            "rss_median_first_quarter": median([x[1] for x in steady[:q]]),
            "rss_median_last_quarter": median([x[1] for x in steady[-q:]]),
            "rss_slope_kib_per_min": rss_slope * 60,
            "fd_first": s[0][2], "fd_max": max(x[2] for x in s), "fd_last": s[-1][2],
            "fd_median_first_quarter": median([x[2] for x in steady[:q]]),
            "fd_median_last_quarter": median([x[2] for x in steady[-q:]]),
            "fd_slope_per_min": fd_slope * 60,
        }
        rss_growth = rss_slope * span  # KiB over the steady part
        rss_limit = max(4096, 0.10 * r["rss_median_first_quarter"])
        fd_growth = fd_slope * span
        r["rss_growth_kib"] = rss_growth
        r["rss_limit_kib"] = rss_limit
        r["fd_growth"] = fd_growth
        r["ok"] = rss_growth <= rss_limit and fd_growth <= 10 and \
            r["fd_median_last_quarter"] - r["fd_median_first_quarter"] <= 10
        return r

    def readiness(self):
        rows = []
        for dep, down, back in self.outages:
            name = "cache" if dep == "redis" else "db"
            row = {"dependency": dep, "check": name,
                   "check_down_s": self.poller.first(name, 503, down),
                   "ready_down_s": self.poller.first("ready", 503, down),
                   "check_up_s": self.poller.first(name, 200, back),
                   "ready_up_s": self.poller.first("ready", 200, back)}
            ok = True
            for k in ("check_down_s", "ready_down_s"):
                ok &= row[k] is not None and row[k] <= BOUND_DOWN + POLL * 2
            for k in ("check_up_s", "ready_up_s"):
                ok &= row[k] is not None and row[k] <= BOUND_UP + POLL * 2
            row["ok"] = ok
            rows.append(row)
        return rows

    def report(self):
        acc = self.account()
        res = self.resources()
        ready = self.readiness()
        wrk_summary = {}
        try:
            with open(f"{self.out}/wrk-summary.txt") as f:
                wrk_summary = {k: int(v) for k, v in (line.split() for line in f)}
        except OSError:
            pass
        reloads_ok = not self.reload_results["unexpected"] and self.reload_n > 0
        crit = {
            "0 lost outside injected faults": acc["lost_outside"] == 0,
            "0 cut at drain": acc["cut_at_shutdown"] == 0,
            "clean exit (0) after SIGTERM": self.exit_code == 0,
            "readiness within interval x threshold + timeout": all(r["ok"] for r in ready) and bool(ready),
            "RSS and fds flat": res.get("ok", False),
            "every reload as expected": reloads_ok,
            "traffic flowed": acc["2xx"] > 0,
        }
        d = now() - self.t0
        print()
        print("=" * 72)
        print(f"opsgate chaos soak: {self.t_term - self.t0:.0f} s of load, {self.a.conns} wrk connections")
        print("=" * 72)
        print(f"requests sent (to a live listener)   {acc['sent']}")
        print(f"  answered 2xx                       {acc['2xx']}")
        print(f"  expected fault answers             {acc['fault_answers']}  "
              f"{dict(sorted(acc['fault_by_status'].items()))} (502/503/504 with the right body, in a fault window)")
        print(f"  LOST outside injected faults       {acc['lost_outside']}")
        print(f"  lost inside fault windows          {acc['lost_in_fault']} (reset/no answer/wrong status or body)")
        print(f"  cut at shutdown                    {acc['cut_at_shutdown']} "
              f"(wrk + {len(acc['probes'])} slow probes: "
              f"{sum(1 for p in acc['probes'] if p.get('status') == 200)} answered 200)")
        print(f"  refused after the listener closed  {acc['after_listener_closed']} (not counted as sent)")
        print(f"  wrk error counters (whole run)     {wrk_summary}")
        print(f"fault windows                        {len(self.windows)}: "
              + ", ".join(f"{k}x{sum(1 for w in self.windows if w[3] == k)}"
                          for k in sorted({w[3] for w in self.windows})))
        print(f"time inside fault windows (+{GRACE:.0f} s grace)  /api {self.coverage('api'):.0%}, "
              f"/ns {self.coverage('ns'):.0%} (outside them only 2xx is right)")
        print(f"reloads                              {self.reload_n}: {self.reload_results['valid_ok']} valid applied, "
              f"{self.reload_results['invalid_rejected']} invalid rejected, "
              f"{len(self.reload_results['unexpected'])} unexpected")
        for u in self.reload_results["unexpected"][:10]:
            print(f"    ! {u}")
        if res.get("samples"):
            print(f"RSS KiB  first {res['rss_kib_first']}  max {res['rss_kib_max']}  last {res['rss_kib_last']}  "
                  f"slope {res['rss_slope_kib_per_min']:+.1f} KiB/min "
                  f"(growth {res['rss_growth_kib']:+.0f} KiB, limit {res['rss_limit_kib']:.0f})")
            print(f"fds      first {res['fd_first']}  max {res['fd_max']}  last {res['fd_last']}  "
                  f"slope {res['fd_slope_per_min']:+.2f}/min  quarter medians "
                  f"{res['fd_median_first_quarter']} -> {res['fd_median_last_quarter']}")
        print(f"readiness (bound down {BOUND_DOWN:.1f} s, up {BOUND_UP:.1f} s = interval x threshold + timeout; "
              f"polled every {POLL * 1000:.0f} ms)")
        for r in ready:
            fmt = lambda v: "never" if v is None else f"{v:.2f}s"  # noqa: E731
            print(f"  {r['dependency']:<6} check {fmt(r['check_down_s'])} ready {fmt(r['ready_down_s'])} down; "
                  f"check {fmt(r['check_up_s'])} ready {fmt(r['ready_up_s'])} up  {'ok' if r['ok'] else 'OVER'}")
        print(f"shutdown: SIGTERM -> listener closed {self.t_closed - self.t_term:.2f}s, "
              f"exit {self.exit_code} after {self.t_exit - self.t_term:.2f}s")
        for s in acc["samples"][:15]:
            print(f"    ! {s}")
        print("-" * 72)
        for k, v in crit.items():
            print(f"{'PASS' if v else 'FAIL'}  {k}")
        passed = all(crit.values())
        print(f"RESULT: {'PASS' if passed else 'FAIL'} ({d:.0f} s wall)")
        with open(f"{self.out}/report.json", "w") as f:
            json.dump({"accounting": acc, "resources": res, "readiness": ready, "criteria": crit,
                       "reloads": {"n": self.reload_n, **self.reload_results}, "wrk": wrk_summary,
                       "windows": self.windows, "outages": self.outages,
                       "events": [(t - self.t0, e) for t, e in self.events], "exit_code": self.exit_code,
                       "resource_samples": self.sampler.samples}, f, indent=1, default=str)
        return passed

    def cleanup(self):
        self.procs.kill_all()
        self.netns.down()
        if getattr(self, "pgdata", None):
            subprocess.run(["rm", "-rf", self.pgdata])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", required=True, help="opsgate binary")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--conns", type=int, default=4, help="wrk connections (one per thread)")
    ap.add_argument("--delay-ms", type=int, default=10, help="pause between a connection's requests")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="", help="names the namespace opsgate-soak-TAG and its veth skTAGa/skTAGb")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the soak needs root (network namespace, postgres user)")
    if PG_BIN is None:
        sys.exit("PostgreSQL binaries not found under /usr/lib/postgresql")
    os.makedirs(args.out, exist_ok=True)
    soak = Soak(args)

    def on_signal(sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        soak.run()
        passed = soak.report()
    except KeyboardInterrupt:
        log("interrupted")
        passed = False
    finally:
        soak.cleanup()
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
