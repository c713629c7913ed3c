#!/usr/bin/env python3
"""Overload-protection figures (docs/benchmarks.md, "Overload protection").

Two scenarios, everything on 127.0.0.1, stopped on exit:

  fleet     3 opsgate instances on one throwaway Redis, a fleet rate limit of
            RATE/s, offered 3x RATE spread 70/20/10 across the instances at a
            fixed rate; Redis killed for 10 s mid-run, then restarted. Prints
            admitted requests per second (fleet total and per instance).
  adaptive  an app with W workers of S ms each (calls beyond W queue), driven
            at 4x its capacity at a fixed rate, through opsgate with and without
            adaptive_concurrency; the app's workers are halved mid-run. Prints
            goodput and the p99 latency of admitted calls, per second.

  cpu       CPU per request of a route without a limit, with a keyed local
            limit and with a fleet limit (limits high enough never to bind):
            opsgate alone on core 1, nginx and `wrk -c32` on core 0, ROUNDS
            interleaved rounds of 4 s per variant, CPU from /proc/<pid>/stat.

Usage: bench/overload.py fleet|adaptive|cpu  (OPSGATE_BIN=path, default target/release/opsgate)
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("OPSGATE_BIN", os.path.join(REPO, "target/release/opsgate"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=10.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


class Procs:
    def __init__(self):
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="ovl-")

    def start(self, args, name):
        p = subprocess.Popen(args, stdout=open(os.path.join(self.tmp, name + ".out"), "w"),
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def opsgate(self, text, name, prefix=()):
        path = os.path.join(self.tmp, name + ".toml")
        with open(path, "w") as f:
            f.write(text)
        port, admin = free_port(), free_port()
        p = self.start([*prefix, BIN, "run", "--config", path, "--listen", f"127.0.0.1:{port}",
                        "--admin", f"127.0.0.1:{admin}"], name)
        wait_port(port)
        return p, port

    def stop(self):
        # SIGTERM first: an nginx master killed with SIGKILL leaves its worker behind.
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- a minimal HTTP/1.1 keep-alive client, fixed rate -----------------------

class Conn:
    def __init__(self, port):
        self.port = port
        self.r = self.w = None

    async def get(self, path=b"/x"):
        if self.w is None:
            self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        self.w.write(b"GET " + path + b" HTTP/1.1\r\nHost: b\r\n\r\n")
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await self.r.readexactly(length)
        if b"connection: close" in head.lower():
            self.w.close()
            self.w = None
        return status


async def fixed_rate(port, rate, seconds, results, tag, conns=64, t0=None):
    """Open loop: `rate` requests/s for `seconds`; results[(tag, sec)] += (status, latency, sent),
    `sent` in seconds since the shared `t0` (default: this call's start)."""
    pool = [Conn(port) for _ in range(conns)]
    free = asyncio.Queue()
    for c in pool:
        free.put_nowait(c)
    start = time.monotonic() if t0 is None else t0
    n = 0
    tasks = set()

    async def one(sent):
        c = await free.get()
        try:
            status = await asyncio.wait_for(c.get(), 10)
        except Exception:
            status = 0
            c.w = None
        free.put_nowait(c)
        done = time.monotonic()
        results.setdefault((tag, int(sent - start)), []).append((status, done - sent, sent - start))

    while True:
        due = start + n / rate
        now = time.monotonic()
        if due - start >= seconds:
            break
        if due > now:
            await asyncio.sleep(due - now)
        t = asyncio.ensure_future(one(start + n / rate))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        # Calls still queued 5 s after the run are counted as timeouts (status 0).
        _, late = await asyncio.wait(tasks, timeout=5)
        for t in late:
            t.cancel()


def fleet():
    rate = int(os.environ.get("RATE", "300"))
    procs = Procs()
    try:
        rport = free_port()
        redis = procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], "redis")
        wait_port(rport)
        nginx_port = free_port()
        conf = os.path.join(procs.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"daemon off; worker_processes 1; pid {procs.tmp}/nginx.pid; error_log stderr;\n"
                    f"events {{}} http {{ access_log off; server {{ listen 127.0.0.1:{nginx_port};"
                    f" location / {{ return 200 'ok'; }} }} }}\n")
        procs.start(["nginx", "-c", conf, "-p", procs.tmp], "nginx")
        wait_port(nginx_port)
        text = (f"[proxy]\naccess_log = false\n[upstreams.app]\nurl = \"http://127.0.0.1:{nginx_port}\"\n"
                f"[control]\nredis_url = \"redis://127.0.0.1:{rport}\"\nkey_prefix = \"bench\"\n"
                f"[[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n"
                f"rate_limit = {{ per_second = {rate}, burst = {rate}, scope = \"fleet\" }}\n")
        ports = [procs.opsgate(text, f"og{i}")[1] for i in range(3)]
        results = {}
        shares = [0.7, 0.2, 0.1]
        seconds = 30

        async def run():
            t0 = time.monotonic()

            async def chaos():
                await asyncio.sleep(10 - (time.monotonic() - t0))
                stats = subprocess.run(["redis-cli", "-p", str(rport), "info", "commandstats"],
                                       capture_output=True, text=True).stdout
                calls = sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines()
                            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))
                admitted = sum(1 for (_, sec), rows in list(results.items()) if sec < 10
                               for st, _, _ in rows if st == 200)
                print(f"t=10s: {calls} lease calls for {admitted} admitted "
                      f"({admitted / max(calls, 1):.1f} admitted per Redis call)", flush=True)
                redis.send_signal(signal.SIGKILL)
                redis.wait()
                print("t=10s: Redis killed", flush=True)
                await asyncio.sleep(20 - (time.monotonic() - t0))
                procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], "redis2")
                print("t=20s: Redis restarted", flush=True)
            await asyncio.gather(chaos(), *[fixed_rate(p, 3 * rate * s, seconds, results, i, t0=t0)
                                            for i, (p, s) in enumerate(zip(ports, shares))])

        asyncio.run(run())
        print("sec  total  og0  og1  og2   (admitted = 200; offered", 3 * rate, "/s)")
        for sec in range(seconds):
            per = [sum(1 for st, _, _ in results.get((i, sec), []) if st == 200) for i in range(3)]
            other = sum(1 for i in range(3) for st, _, _ in results.get((i, sec), []) if st not in (200, 429))
            print(f"{sec:3d} {sum(per):6d} {per[0]:4d} {per[1]:4d} {per[2]:4d}" + (f"  other={other}" if other else ""))
        # Every 1 s window, not only those starting on a whole second: admitted
        # per 10 ms step, then windows sliding by 10 ms within each phase.
        step = 0.01
        steps = [0] * int(seconds / step)
        for rows in results.values():
            for st, _, sent in rows:
                if st == 200 and 0 <= sent < seconds:
                    steps[int(sent / step)] += 1
        w = int(1 / step)
        print("1 s windows sliding by 10 ms (admitted, fleet total):")
        for name, lo, hi in [("Redis up", 1, 10), ("Redis down", 11, 20), ("Redis back", 20, 30)]:
            sums = [sum(steps[i:i + w]) for i in range(int(lo / step), int(hi / step) - w + 1)]
            print(f"  {name:22s} t={lo}-{hi}s: min {min(sums)} max {max(sums)}")
        if os.environ.get("DETAIL") == "2":
            print("admitted per 100 ms, per instance (og0/og1/og2):")
            for sec in range(seconds):
                cells = []
                for k in range(10):
                    lo, hi = sec + k / 10, sec + (k + 1) / 10
                    cells.append("/".join(str(sum(1 for st, _, sent in results.get((i, sec), [])
                                                  if st == 200 and lo <= sent < hi)) for i in range(3)))
                print(f"{sec:3d} " + " ".join(f"{c:>8s}" for c in cells))
        elif os.environ.get("DETAIL"):
            print("admitted per 100 ms (fleet total):")
            for sec in range(seconds):
                row = [sum(steps[int((sec + k / 10) / step):int((sec + (k + 1) / 10) / step)]) for k in range(10)]
                print(f"{sec:3d} " + " ".join(f"{n:3d}" for n in row))
    finally:
        procs.stop()


# --- an app with a fixed number of workers ---------------------------------

async def worker_app(port, state):
    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                if head.startswith(b"POST /workers/"):
                    n = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
                    state["resize"](n)
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                async with state["sem"]:
                    await asyncio.sleep(state["service"])
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except Exception:
            w.close()
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    return server


class Resizable:
    """A semaphore whose size can shrink while held."""
    def __init__(self, n):
        self.n = n
        self.used = 0
        self.cond = asyncio.Condition()

    async def __aenter__(self):
        async with self.cond:
            await self.cond.wait_for(lambda: self.used < self.n)
            self.used += 1

    async def __aexit__(self, *a):
        async with self.cond:
            self.used -= 1
            self.cond.notify_all()

    def resize(self, n):
        self.n = n
        async def wake():
            async with self.cond:
                self.cond.notify_all()
        asyncio.ensure_future(wake())


def adaptive():
    workers = int(os.environ.get("WORKERS", "20"))
    service = float(os.environ.get("SERVICE_MS", "20")) / 1000
    capacity = workers / service
    seconds = int(os.environ.get("SECONDS", "30"))
    for mode in ["off", "on"]:
        procs = Procs()
        try:
            app_port = free_port()
            limit = ("[upstreams.app.adaptive_concurrency]\nmin_limit = 2\nmax_limit = 1000\n"
                     "initial_limit = 20\n") if mode == "on" else ""
            text = (f"[proxy]\naccess_log = false\n[upstreams.app]\nurl = \"http://127.0.0.1:{app_port}\"\n"
                    f"timeout = \"30s\"\n{limit}"
                    f"[[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n")

            async def run():
                sem = Resizable(workers)
                state = {"sem": sem, "service": service, "resize": sem.resize}
                server = await worker_app(app_port, state)
                _, port = await asyncio.get_running_loop().run_in_executor(
                    None, procs.opsgate, text, "og-" + mode)
                results = {}

                async def halve():
                    await asyncio.sleep(seconds / 2)
                    sem.resize(workers // 2)
                    print(f"t={seconds // 2}s: workers {workers} -> {workers // 2}", flush=True)
                # Unloaded latency first.
                c = Conn(port)
                t0 = time.monotonic()
                for _ in range(20):
                    await c.get()
                unloaded = (time.monotonic() - t0) / 20
                await asyncio.gather(halve(), fixed_rate(port, 4 * capacity, seconds, results, 0,
                                                         conns=int(40 * workers)))
                server.close()
                return results, unloaded

            results, unloaded = asyncio.run(run())
            print(f"adaptive concurrency {mode}: capacity {capacity:.0f}/s then {capacity / 2:.0f}/s, "
                  f"offered {4 * capacity:.0f}/s, unloaded latency {unloaded * 1000:.1f} ms")
            print("sec  goodput  shed(503)  other  p99 admitted ms")
            for sec in range(seconds):
                rows = results.get((0, sec), [])
                ok = sorted(l for st, l, _ in rows if st == 200)
                shed = sum(1 for st, _, _ in rows if st == 503)
                other = len(rows) - len(ok) - shed
                p99 = ok[int(len(ok) * 0.99) - 1] * 1000 if ok else 0
                print(f"{sec:3d} {len(ok):8d} {shed:10d} {other:6d} {p99:12.1f}", flush=True)
        finally:
            procs.stop()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu():
    rounds = int(os.environ.get("ROUNDS", "3"))
    procs = Procs()
    try:
        rport = free_port()
        procs.start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no"], "redis")
        wait_port(rport)
        nginx_port = free_port()
        conf = os.path.join(procs.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"daemon off; worker_processes 1; pid {procs.tmp}/nginx.pid; error_log stderr;\n"
                    f"events {{}} http {{ access_log off; server {{ listen 127.0.0.1:{nginx_port};"
                    f" keepalive_requests 1000000; location / {{ return 200 'ok'; }} }} }}\n")
        procs.start(["taskset", "-c", "0", "nginx", "-c", conf, "-p", procs.tmp], "nginx")
        wait_port(nginx_port)
        limit = "per_second = 1000000, burst = 1000000"
        variants = {
            "plain": "",
            "keyed local": f"rate_limit = {{ {limit}, key = \"client_ip\" }}\n",
            "fleet": f"rate_limit = {{ {limit}, scope = \"fleet\" }}\n",
        }
        runs = {}
        for name, rl in variants.items():
            text = (f"[proxy]\naccess_log = false\n[upstreams.app]\nurl = \"http://127.0.0.1:{nginx_port}\"\n"
                    f"[control]\nredis_url = \"redis://127.0.0.1:{rport}\"\nkey_prefix = \"cpu\"\n"
                    f"[[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n{rl}")
            # env and taskset exec: the pid is opsgate's.
            p, port = procs.opsgate(text, "og-" + name.replace(" ", "-"),
                                    ["env", "TOKIO_WORKER_THREADS=1", "taskset", "-c", "1"])
            runs[name] = (p, port)
        results = {name: [] for name in variants}
        for r in range(rounds):
            for name, (p, port) in runs.items():
                before = cpu_seconds(p.pid)
                out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c32", "-d4s",
                                      f"http://127.0.0.1:{port}/x"],
                                     capture_output=True, text=True, check=True).stdout
                used = cpu_seconds(p.pid) - before
                reqs = int(out.split(" requests in ")[0].split()[-1])
                non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
                results[name].append(used / reqs * 1e6)
                print(f"round {r + 1} {name:12s} {reqs:7d} requests ({non2xx} non-2xx), "
                      f"{used / reqs * 1e6:.2f} us CPU per request", flush=True)
        stats = subprocess.run(["redis-cli", "-p", str(rport), "info", "commandstats"],
                               capture_output=True, text=True).stdout
        calls = sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines()
                    if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))
        base = sorted(results["plain"])[rounds // 2]
        print("variant       CPU us/request (median)  vs plain")
        for name, xs in results.items():
            med = sorted(xs)[rounds // 2]
            print(f"{name:12s} {med:10.2f} {med / base:14.3f}")
        print(f"fleet: {calls} Redis lease calls")
    finally:
        procs.stop()


if __name__ == "__main__":
    {"fleet": fleet, "adaptive": adaptive, "cpu": cpu}[sys.argv[1] if len(sys.argv) > 1 else "fleet"]()
