"""Shared fixtures of the interop suite: the real opsgate binary and third-party peers
(servers, databases, Prometheus) run as child processes on 127.0.0.1.

Ports: peers that accept a listening socket (gunicorn, hypercorn) get one bound to port 0
here and passed by file descriptor; the others get a port the OS just handed out, and are
restarted on another one if it was taken in between. Every wait polls a condition against a
deadline. Every child runs in its own process group, and that group is killed at teardown.
"""

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
ROOT = HERE.parent.parent
PYTHON = sys.executable

# Variables of the caller's environment that would change opsgate's config.
OPSGATE_ENV = (
    "OPSGATE_CONFIG",
    "OPSGATE_LISTEN",
    "OPSGATE_UPSTREAM",
    "OPSGATE_ADMIN_LISTEN",
    "OPSGATE_ADMIN_TOKEN",
    "OPSGATE_LOG",
    "MAINTENANCE_MODE",
    "CIRCUIT_OPEN",
)

START_LIMIT = 15.0


def free_port():
    """A port the OS just handed out (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_socket():
    """A socket bound to a port the OS picks, listening, inheritable by a child."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    s.set_inheritable(True)
    return s


def wait_until(cond, what, limit=10.0, every=0.02):
    """Polls `cond` until it returns something truthy (returned) or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    last_error = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # a condition that raises has simply not held yet
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {limit}s waiting for {what}{detail}")
        time.sleep(every)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http(method, url, body=None, headers=None, timeout=10.0):
    """One HTTP/1.1 exchange (urllib): (status, headers, body bytes); never raises on status."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def http_json(method, url, body=None, headers=None, timeout=10.0):
    status, _, raw = http(method, url, body, headers, timeout)
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class Proc:
    """A child process in its own process group, output in a log file."""

    def __init__(self, name, argv, log_dir, env=None, pass_fds=(), user=None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
            start_new_session=True,
            user=user,
        )

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log(self):
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig):
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        """SIGKILL to the whole group: a crash, no goodbye to clients."""
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, grace=5.0):
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self):
        self.stop()
        # The group may hold children that outlived the leader (workers): end them too.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


class Procs:
    """Every process a test started; all stopped at teardown, logs shown on failure."""

    def __init__(self, log_dir):
        self.log_dir = Path(log_dir)
        self.all = []

    def start(self, name, argv, **kw):
        p = Proc(name, argv, self.log_dir, **kw)
        self.all.append(p)
        return p

    def close(self):
        for p in reversed(self.all):
            p.close()

    def dump(self):
        out = []
        for p in self.all:
            text = p.log()
            out.append(f"----- {p.name} (pid {p.pid}) log, last 4000 chars -----\n{text[-4000:]}")
        return "\n".join(out)


@pytest.fixture
def procs(tmp_path, request):
    ps = Procs(tmp_path)
    yield ps
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(ps.dump())
    ps.close()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory, request):
    """Like `procs`, for peers shared by the tests of one module (they must not change them)."""
    ps = Procs(tmp_path_factory.mktemp(request.module.__name__))
    failed_before = request.session.testsfailed
    yield ps
    if request.session.testsfailed > failed_before:
        print(ps.dump())
    ps.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in OPSGATE_ENV}
    env.update(extra or {})
    return env


class Opsgate:
    """The real opsgate binary, `run` with a config file on fresh loopback ports."""

    def __init__(self, procs, tmp_path, config, env=None, name="opsgate"):
        self.bin = os.environ.get("OPSGATE_BIN")
        if not self.bin or not os.access(self.bin, os.X_OK):
            pytest.fail("OPSGATE_BIN must name the opsgate binary (ci/interop.sh sets it)")
        self.dir = Path(tmp_path) / name
        self.dir.mkdir(exist_ok=True)
        self.config_path = self.dir / "opsgate.toml"
        self.config_path.write_text(config)
        self.env = clean_env({"OPSGATE_LOG": "info", **(env or {})})
        for attempt in range(4):
            self.port, self.admin_port = free_port(), free_port()
            self.proc = procs.start(
                f"{name}-{attempt}",
                [
                    self.bin,
                    "--log-format",
                    "json",
                    "run",
                    "--config",
                    self.config_path,
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--admin",
                    f"127.0.0.1:{self.admin_port}",
                ],
                env=self.env,
                cwd=self.dir,
            )
            if self._await_live():
                return
            if "in use" not in self.proc.log():
                break
        pytest.fail(f"opsgate did not start:\n{self.proc.log()}")

    def _await_live(self):
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            if not self.proc.alive():
                return False
            try:
                status, _, _ = http("GET", self.url("/_health/live"), timeout=1)
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path):
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def admin(self, method, path, body=None):
        data = json.dumps(body) if body is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        return http_json(method, self.admin_url(path), data, headers)

    def breaker(self, name):
        status, body = self.admin("GET", "/_ops/breakers")
        assert status == 200, body
        for b in body["breakers"]:
            if b["name"] == name:
                return b
        raise AssertionError(f"no breaker {name!r} in {body}")

    def log(self):
        return self.proc.log()


@pytest.fixture
def opsgate(procs, tmp_path):
    """Factory: opsgate(config_text, env=None, name=...) -> a started Opsgate."""

    def start(config, env=None, name="opsgate"):
        return Opsgate(procs, tmp_path, config, env=env, name=name)

    return start


def start_asgi(procs, name="hypercorn", extra_env=None):
    """The ASGI app of peers/asgi_app.py under hypercorn (HTTP/1.1 and h2c on one port)."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    env = clean_env(extra_env)
    p = procs.start(
        name,
        [
            PYTHON,
            "-m",
            "hypercorn",
            "--bind",
            f"fd://{sock.fileno()}",
            "--workers",
            "1",
            "--graceful-timeout",
            "1",
            "asgi_app:app",
        ],
        pass_fds=(sock.fileno(),),
        env=env,
        cwd=PEERS,
    )
    sock.close()
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/info", timeout=1)[0] == 200,
               f"hypercorn on {port} (log: {p.log_path})", limit=START_LIMIT)
    return p, port


@pytest.fixture
def asgi(procs):
    """(process, port) of a running hypercorn serving peers/asgi_app.py."""
    return start_asgi(procs)


class PgServer:
    """A throwaway PostgreSQL cluster (trust auth, user `postgres`) in a temp dir under /tmp,
    run as the `postgres` OS user when we are root (PostgreSQL refuses to run as root)."""

    def __init__(self, procs):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            pytest.fail("no PostgreSQL server binaries under /usr/lib/postgresql (ci/interop.sh installs them)")
        self.bin = Path(bins[-1]).parent
        self.procs = procs
        self.dir = Path(tempfile.mkdtemp(prefix="opsgate-interop-pg-", dir="/tmp"))
        self.user = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user = "postgres"
        self.data = self.dir / "data"
        out = subprocess.run(
            [self.bin / "initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8",
             "--locale", "C", "-D", self.data],
            env=clean_env({"LC_ALL": "C"}), user=self.user, capture_output=True, text=True,
        )
        assert out.returncode == 0, f"initdb failed: {out.stdout}{out.stderr}"
        self.port = None
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def start(self):
        """Starts (again) on the same port, or on a fresh one the first time; waits until it
        accepts connections."""
        fixed = self.port is not None
        for attempt in range(4):
            port = self.port if fixed else free_port()
            self.proc = self.procs.start(
                f"postgres-{port}-{attempt}",
                [self.bin / "postgres", "-D", self.data, "-p", port, "-k", self.dir,
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                env=clean_env({"LC_ALL": "C"}), user=self.user,
            )
            deadline = time.monotonic() + START_LIMIT
            while self.proc.alive() and not port_open(port) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.alive() and port_open(port):
                self.port = port
                wait_until(self.answers, "PostgreSQL to accept queries", limit=START_LIMIT)
                return
            self.proc.kill()
            if fixed or "already in use" not in self.proc.log():
                break
        pytest.fail(f"PostgreSQL did not start:\n{self.proc.log()}")

    def answers(self):
        import psycopg2

        try:
            conn = psycopg2.connect(self.url, connect_timeout=2)
        except psycopg2.OperationalError:
            return False
        conn.close()
        return True

    def kill(self):
        """Immediate shutdown (SIGQUIT): clients are dropped at once, like a crash."""
        self.proc.signal(signal.SIGQUIT)
        self.proc.popen.wait(timeout=10)
        wait_until(lambda: not port_open(self.port), "PostgreSQL's port to close")

    def close(self):
        if self.proc is not None:
            # Immediate shutdown: a throwaway cluster needs no checkpoint.
            self.proc.signal(signal.SIGQUIT)
            self.proc.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres(procs):
    pg = PgServer(procs)
    yield pg
    pg.close()


def curl(*args, data=None, timeout=20):
    """Runs curl with `args` (and `data` on stdin); (exit code, stdout bytes, stderr text)."""
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "15", *map(str, args)],
        input=data,
        capture_output=True,
        timeout=timeout,
    )
    return out.returncode, out.stdout, out.stderr.decode(errors="replace")


def curl_status(*args, data=None):
    """curl with `-w <newline>%{http_code} %{http_version}`: (status, version, body bytes).
    Fails the test when curl itself fails."""
    rc, out, err = curl(*args, "-w", "\n%{http_code} %{http_version}", data=data)
    assert rc == 0, f"curl {' '.join(map(str, args))}: exit {rc}: {err}"
    body, tail = out.rsplit(b"\n", 1)
    status, version = tail.decode().split()
    return int(status), version, body
