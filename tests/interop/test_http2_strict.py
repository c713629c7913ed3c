"""A strict HTTP/2 server behind `http2 = true`: an ASGI app under hypercorn, whose HTTP/2
stack (Python `h2`) enforces RFC 9113. §8.3.1 lets a server reset a stream whose `Host`
differs from `:authority`; hypercorn does. The request may reach opsgate over HTTP/1.1
or over h2c, and `preserve_host` decides which authority the app sees."""

import hashlib
import json

import pytest

from conftest import curl_status

CONFIG = """
[upstreams.app]
url = "http://127.0.0.1:{port}"
http2 = true
preserve_host = {preserve_host}
connect_timeout = "1s"
timeout = "10s"

[[routes]]
name = "app"
prefix = "/"
upstream = "app"
"""

CLIENT_HOST = "shop.example.test"
PAYLOAD = bytes(range(256)) * 1024
CLIENT_FLAGS = {"http1.1": "--http1.1", "h2c": "--http2-prior-knowledge"}


def header(info, name):
    values = [v for k, v in info["headers"] if k == name]
    assert len(values) <= 1, f"{name} arrived {len(values)} times: {info['headers']}"
    return values[0] if values else None


def exchange(base, flag, og=None):
    """GET /info and POST /upload with a Host of our own; returns the app's two answers."""
    status, _, body = curl_status(flag, "-H", f"host: {CLIENT_HOST}", f"{base}/info?x=1")
    assert status == 200, (body, og.log()[-1000:] if og else "")
    info = json.loads(body)
    status, _, body = curl_status(
        flag, "-H", f"host: {CLIENT_HOST}", "-H", "content-type: application/octet-stream",
        "--data-binary", "@-", f"{base}/upload", data=PAYLOAD,
    )
    assert status == 200, body
    return info, json.loads(body)


def check(info, upload, host):
    assert info["http_version"] == "2"
    assert info["query"] == "x=1"
    assert header(info, "host") == host
    assert upload["http_version"] == "2"
    assert upload["length"] == len(PAYLOAD)
    assert upload["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_control_h2c_to_hypercorn_directly(asgi):
    _, port = asgi
    info, upload = exchange(f"http://127.0.0.1:{port}", "--http2-prior-knowledge")
    check(info, upload, CLIENT_HOST)


@pytest.mark.parametrize("preserve_host", [True, False], ids=["preserve_host", "upstream_host"])
@pytest.mark.parametrize("client", list(CLIENT_FLAGS))
def test_h2_upstream_through_opsgate(asgi, opsgate, client, preserve_host):
    _, port = asgi
    og = opsgate(CONFIG.format(port=port, preserve_host=str(preserve_host).lower()))
    info, upload = exchange(og.url("").rstrip("/"), CLIENT_FLAGS[client], og)
    check(info, upload, CLIENT_HOST if preserve_host else f"127.0.0.1:{port}")
