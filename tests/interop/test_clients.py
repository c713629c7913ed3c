"""Third-party clients through opsgate in front of an HTTP/1.1 app (the ASGI app under
hypercorn): curl over h2c prior knowledge and over HTTP/1.0, a `websockets` client through
a WebSocket upgrade, chunked uploads; then a body cut short by a dying app, and a tunnel
and a body idle past the route timeout. Each check runs against hypercorn directly first
where the app alone can show the behaviour."""

import hashlib
import json
import socket
import subprocess
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from conftest import Opsgate, curl_status, start_asgi, wait_until

CONFIG = """
[upstreams.app]
url = "http://127.0.0.1:{port}"
connect_timeout = "1s"
timeout = "10s"

[[routes]]
name = "app"
prefix = "/"
upstream = "app"
"""


@pytest.fixture(scope="module")
def bases(module_procs):
    """[("direct", base URL), ("opsgate", base URL)]: one hypercorn, one opsgate in front,
    shared by this module's tests (none changes their state)."""
    _, port = start_asgi(module_procs)
    og = Opsgate(module_procs, module_procs.log_dir, CONFIG.format(port=port))
    return [("direct", f"127.0.0.1:{port}"), ("opsgate", og.addr)]


def header(info, name):
    return [v for k, v in info["headers"] if k == name]


def test_curl_h2c_prior_knowledge(bases):
    for label, base in bases:
        status, version, body = curl_status("--http2-prior-knowledge", f"http://{base}/info?q=1")
        assert (status, version) == (200, "2"), (label, body)
        info = json.loads(body)
        assert info["query"] == "q=1", label
        if label == "opsgate":
            # HTTP/2 from the client, HTTP/1.1 to the app, the client's authority as Host.
            assert info["http_version"] == "1.1"
            assert header(info, "host") == [base]


def test_curl_h2c_upload(bases):
    payload = bytes(range(256)) * 8192
    for label, base in bases:
        status, _, body = curl_status(
            "--http2-prior-knowledge", "--data-binary", "@-", f"http://{base}/upload", data=payload
        )
        assert status == 200, (label, body)
        up = json.loads(body)
        assert (up["length"], up["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest()), label


def test_curl_http10(bases):
    for label, base in bases:
        status, _, body = curl_status("--http1.0", f"http://{base}/info")
        assert status == 200, (label, body)
        info = json.loads(body)
        assert info["path"] == "/info", label


def raw_http10(base, request):
    """Sends `request` bytes on a new connection and reads until the server closes it."""
    host, port = base.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return lines[0], headers, body


def test_http10_client_gets_no_chunked_body(bases):
    """The app streams a body without Content-Length (chunked on its HTTP/1.1 hop); an
    HTTP/1.0 client knows no chunked coding, so the body must come delimited by close."""
    for label, base in bases:
        key = uuid.uuid4().hex
        status_line, _, _ = raw_http10(base, f"GET /release?id={key} HTTP/1.0\r\nHost: t\r\n\r\n".encode())
        assert " 200 " in status_line, (label, status_line)
        status_line, headers, body = raw_http10(
            base, f"GET /stream?n=3&id={key} HTTP/1.0\r\nHost: t\r\n\r\n".encode()
        )
        assert " 200 " in status_line, (label, status_line)
        assert "transfer-encoding" not in headers, (label, headers)
        assert body == b"chunk 0\nchunk 1 released\nchunk 2 released\n", (label, body)


def test_http10_request_without_host(bases):
    """Host is optional in HTTP/1.0 (RFC 9112 requires it of HTTP/1.1 only)."""
    for label, base in bases:
        status_line, _, body = raw_http10(base, b"GET /info HTTP/1.0\r\n\r\n")
        assert " 200 " in status_line, (label, status_line, body)
        assert json.loads(body)["path"] == "/info", label


@pytest.mark.parametrize("size", [64 * 1024, 4 * 1024 * 1024], ids=["64KiB", "4MiB"])
def test_chunked_upload(bases, size):
    """curl sends `Transfer-Encoding: chunked` (and, for the large body, `Expect:
    100-continue`); the app must get every byte."""
    payload = hashlib.sha256(b"seed").digest() * (size // 32)
    for label, base in bases:
        status, _, body = curl_status(
            "--http1.1", "-H", "Transfer-Encoding: chunked", "-H", "content-type: application/octet-stream",
            "--data-binary", "@-", f"http://{base}/upload", data=payload,
        )
        assert status == 200, (label, body)
        up = json.loads(body)
        assert up["length"] == size, (label, up["length"])
        assert up["sha256"] == hashlib.sha256(payload).hexdigest(), label


def test_websocket_echo_and_close(bases):
    big = bytes(range(256)) * 4096
    for label, base in bases:
        with ws_connect(f"ws://{base}/ws", open_timeout=10, close_timeout=5, max_size=None,
                        subprotocols=["chat.v1", "chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2", label
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello", label
            ws.send(big)
            assert ws.recv(timeout=10) == big, label
            ws.ping(b"p").wait(timeout=10)
            ws.send("close")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None, label
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye"), label


@pytest.mark.parametrize("client", ["--http1.1", "--http2-prior-knowledge"])
def test_upstream_dying_mid_body_is_not_a_clean_end(procs, opsgate, tmp_path, client):
    """The app sends part of a streamed body and dies. The client must see a broken
    transfer (as it does talking to the app directly), never a short body that looks
    complete."""
    proc, port = start_asgi(procs)
    og = opsgate(CONFIG.format(port=port))
    key = uuid.uuid4().hex
    runs = {}
    for label, base, flag in (("direct", f"127.0.0.1:{port}", "--http1.1"), ("opsgate", og.addr, client)):
        out = tmp_path / f"{label}.body"
        with out.open("wb") as sink:
            runs[label] = (out, subprocess.Popen(
                ["curl", "--silent", "--show-error", "--no-buffer", "--max-time", "20", flag,
                 f"http://{base}/stream?n=3&id={key}"],
                stdout=sink, stderr=subprocess.PIPE))
    for label, (out, _) in runs.items():
        wait_until(lambda: out.read_bytes() == b"chunk 0\n", f"the first chunk ({label})")
    proc.kill()
    for label, (out, curl_proc) in runs.items():
        rc = curl_proc.wait(timeout=30)
        err = curl_proc.stderr.read().decode()
        assert rc != 0, f"{label}: a truncated body ended cleanly: {out.read_bytes()!r}"
        assert out.read_bytes() == b"chunk 0\n", (label, rc, err)


def test_idle_tunnel_and_slow_body_outlive_the_route_timeout(procs, opsgate, tmp_path):
    """`timeout` bounds the wait for response headers only: a WebSocket idle for longer,
    and a streamed body whose next chunk comes later, go on."""
    _, port = start_asgi(procs)
    og = opsgate(CONFIG.format(port=port).replace('timeout = "10s"', 'timeout = "1s"'))
    key = uuid.uuid4().hex
    out = tmp_path / "stream.body"
    with out.open("wb") as sink:
        stream = subprocess.Popen(
            ["curl", "--silent", "--show-error", "--no-buffer", "--max-time", "20",
             og.url(f"/stream?n=2&id={key}")], stdout=sink, stderr=subprocess.PIPE)
    with ws_connect(f"ws://{og.addr}/ws", open_timeout=10, close_timeout=5) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        wait_until(lambda: out.read_bytes() == b"chunk 0\n", "the first chunk")
        # The scenario itself: both stay idle past the 1 s route timeout.
        time.sleep(1.5)
        ws.send("after")
        assert ws.recv(timeout=10) == "after"
    assert curl_status(og.url(f"/release?id={key}"))[0] == 200
    assert stream.wait(timeout=20) == 0, stream.stderr.read()
    assert out.read_bytes() == b"chunk 0\nchunk 1 released\n"
