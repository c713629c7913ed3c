"""gRPC through opsgate: a grpcio server behind `http2 = true`, a grpcio client on opsgate's
port (h2c prior knowledge). Each check runs first against the server directly (the
control), then through opsgate."""

import hashlib
import queue
import re
import signal
import uuid

import grpc
import pytest

from conftest import PEERS, PYTHON, wait_until

SERVICE = "/interop.Echo/"
FAIL_MESSAGE = "widget 42 not found – ünïcödé"
DETAILS_BIN = bytes(range(256))
CALL_TIMEOUT = 10.0

CONFIG = """
[upstreams.grpc]
url = "http://127.0.0.1:{port}"
http2 = true
connect_timeout = "1s"
timeout = "20s"

[upstreams.grpc.breaker]
failure_threshold = 3
recovery_timeout = "60s"

[[routes]]
name = "grpc"
prefix = "/"
upstream = "grpc"
"""


def start_grpc_server(procs):
    p = procs.start("grpc-server", [PYTHON, PEERS / "grpc_server.py"], cwd=PEERS)
    m = wait_until(lambda: re.search(r"PORT (\d+)", p.log()), "the gRPC server's port", limit=15)
    return p, int(m.group(1))


@pytest.fixture
def grpc_setup(procs, opsgate):
    server, port = start_grpc_server(procs)
    og = opsgate(CONFIG.format(port=port))
    channels = []

    def channel(target):
        ch = grpc.insecure_channel(target)
        channels.append(ch)
        return ch

    yield server, f"127.0.0.1:{port}", og, channel
    for ch in channels:
        ch.close()


def targets(setup):
    _, direct, og, channel = setup
    return [("direct", channel(direct)), ("opsgate", channel(og.addr))]


def stub(ch, method, kind="unary_unary"):
    return getattr(ch, kind)(SERVICE + method)


def test_unary_with_metadata_and_trailers(grpc_setup):
    for label, ch in targets(grpc_setup):
        payload = b"hello " + label.encode()
        reply, call = stub(ch, "Unary").with_call(
            payload, timeout=CALL_TIMEOUT, metadata=(("x-client", "interop"),)
        )
        assert reply == b"echo:" + payload, label
        assert call.code() == grpc.StatusCode.OK, label
        assert ("x-initial", "hello") in call.initial_metadata(), label
        trailers = dict(call.trailing_metadata())
        assert trailers.get("x-trailer") == "done", (label, trailers)
        assert trailers.get("x-checksum-bin") == hashlib.sha256(payload).digest(), label


def test_gzip_compressed_calls(grpc_setup):
    """grpc-encoding / grpc-accept-encoding pass through: gzip both ways."""
    payload = b"compressible " * 10000
    for label, ch in targets(grpc_setup):
        reply = stub(ch, "Unary")(payload, timeout=CALL_TIMEOUT, compression=grpc.Compression.Gzip)
        assert reply == b"echo:" + payload, label


def test_large_unary_message(grpc_setup):
    """A 3 MiB message each way: HTTP/2 flow control across opsgate's two connections."""
    payload = bytes(range(256)) * (3 * 4096)
    for label, ch in targets(grpc_setup):
        reply = stub(ch, "Unary")(payload, timeout=CALL_TIMEOUT)
        assert reply == b"echo:" + payload, label


def test_error_status_details_and_trailers(grpc_setup):
    for label, ch in targets(grpc_setup):
        with pytest.raises(grpc.RpcError) as err:
            stub(ch, "Fail")(b"42", timeout=CALL_TIMEOUT)
        e = err.value
        assert e.code() == grpc.StatusCode.NOT_FOUND, (label, e)
        assert e.details() == FAIL_MESSAGE, (label, e.details())
        trailers = dict(e.trailing_metadata())
        assert trailers.get("x-trailer") == "failing", (label, trailers)
        assert trailers.get("grpc-status-details-bin") == DETAILS_BIN, (label, trailers)


def test_server_streaming_is_not_buffered(grpc_setup):
    """The server sends message 0, then holds the rest until the client calls Release.
    The client calls Release only after message 0 arrived: a proxy that buffered the
    stream would deliver nothing until the server's 10 s hold ran out, and every later
    message would say "timeout" instead of "released"."""
    for label, ch in targets(grpc_setup):
        key = uuid.uuid4().hex
        call = stub(ch, "Stream", "unary_stream")(f"{key}:4".encode(), timeout=CALL_TIMEOUT + 5)
        messages = iter(call)
        assert next(messages) == b"0", label
        stub(ch, "Release")(key.encode(), timeout=CALL_TIMEOUT)
        rest = list(messages)
        assert rest == [b"1:released", b"2:released", b"3:released"], (label, rest)
        assert call.code() == grpc.StatusCode.OK, label


def test_bidirectional_streaming_is_full_duplex(grpc_setup):
    """Each reply is read before the next request is written (ping-pong), so a proxy that
    waited for the end of the request stream would stall."""
    for label, ch in targets(grpc_setup):
        outbox = queue.Queue()

        def requests():
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield item

        replies = stub(ch, "Chat", "stream_stream")(requests(), timeout=CALL_TIMEOUT)
        for i in range(5):
            outbox.put(f"ping {i}".encode())
            assert next(replies) == f"re:ping {i}".encode(), label
        outbox.put(None)
        assert list(replies) == [], label
        assert replies.code() == grpc.StatusCode.OK, label


def test_server_killed_opens_breaker_and_fails_fast(grpc_setup):
    server, direct, og, channel = grpc_setup
    direct_ch, og_ch = channel(direct), channel(og.addr)
    for ch in (direct_ch, og_ch):
        assert stub(ch, "Unary")(b"warm", timeout=CALL_TIMEOUT) == b"echo:warm"

    server.kill()

    # Control: the client sees the dead server as UNAVAILABLE on its own.
    with pytest.raises(grpc.RpcError) as err:
        stub(direct_ch, "Unary")(b"x", timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value

    # Through opsgate: failed calls (502) until the breaker opens, each UNAVAILABLE.
    codes = []

    def breaker_open():
        try:
            stub(og_ch, "Unary")(b"x", timeout=CALL_TIMEOUT)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
        return og.breaker("grpc")["state"] == "open"

    wait_until(breaker_open, "breaker `grpc` to open", limit=15)
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes

    # The open breaker answers itself (503, counted as rejected, the upstream not tried):
    # UNAVAILABLE at once rather than DEADLINE_EXCEEDED.
    rejected_before = og.breaker("grpc")["rejected_calls"]
    with pytest.raises(grpc.RpcError) as err:
        stub(og_ch, "Unary")(b"x", timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "503" in (err.value.details() or ""), err.value
    assert og.breaker("grpc")["rejected_calls"] == rejected_before + 1


def test_server_killed_mid_stream_is_an_error(grpc_setup):
    """The server dies after the first message: the client must get a non-OK status, as it
    does directly, not a stream that ends OK with messages missing."""
    server, direct, og, channel = grpc_setup
    calls = []
    for label, ch in (("direct", channel(direct)), ("opsgate", channel(og.addr))):
        key = uuid.uuid4().hex
        call = stub(ch, "Stream", "unary_stream")(f"{key}:3".encode(), timeout=CALL_TIMEOUT + 5)
        messages = iter(call)
        assert next(messages) == b"0", label
        calls.append((label, call, messages))
    server.kill()
    for label, call, messages in calls:
        with pytest.raises(grpc.RpcError) as err:
            list(messages)
        assert err.value.code() != grpc.StatusCode.OK, label
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED), (label, err.value)


def test_sigterm_drains_an_open_stream(grpc_setup):
    """SIGTERM while a server stream is open: opsgate stops accepting, lets the stream
    finish (grpcio must honour the GOAWAY), then exits 0."""
    server, direct, og, channel = grpc_setup
    og_ch, direct_ch = channel(og.addr), channel(direct)
    key = uuid.uuid4().hex
    call = stub(og_ch, "Stream", "unary_stream")(f"{key}:3".encode(), timeout=CALL_TIMEOUT + 5)
    messages = iter(call)
    assert next(messages) == b"0"
    og.proc.popen.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in og.log(), "opsgate to start draining")
    stub(direct_ch, "Release")(key.encode(), timeout=CALL_TIMEOUT)
    assert list(messages) == [b"1:released", b"2:released"]
    assert call.code() == grpc.StatusCode.OK
    assert og.proc.popen.wait(timeout=15) == 0, og.log()


def test_maintenance_answers_unavailable(grpc_setup):
    """Every gRPC method is a POST, so maintenance (mode "writes") holds every call; the
    client sees UNAVAILABLE, which gRPC clients treat as retryable, and OK once it is off."""
    _, _, og, channel = grpc_setup
    ch = channel(og.addr)
    status, body = og.admin("PUT", "/_ops/maintenance", {"enabled": True, "reason": "interop"})
    assert status == 200 and body["enabled"], body
    with pytest.raises(grpc.RpcError) as err:
        stub(ch, "Unary")(b"x", timeout=CALL_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "503" in (err.value.details() or ""), err.value
    status, body = og.admin("PUT", "/_ops/maintenance", {"enabled": None})
    assert status == 200 and not body["enabled"], body
    assert stub(ch, "Unary")(b"x", timeout=CALL_TIMEOUT) == b"echo:x"
