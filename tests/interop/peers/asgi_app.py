"""An ASGI app for hypercorn: what the request looked like on arrival, uploads, a slow
stream and a WebSocket echo. No framework: the raw ASGI protocol.

  GET  /info         -> JSON: http_version, method, path, query, headers (list of pairs)
  POST /upload       -> JSON: length and sha256 of the body, and the request's headers
  GET  /stream?n=N   -> N chunks; chunk i>0 is sent only after GET /release?id=ID arrived
                        (or 10 s passed): its text says which
  GET  /release?id=  -> lets /stream?id= go on
  WS   /ws           -> echoes text and bytes; the text "close" closes with 4001 "bye";
                        picks the subprotocol "chat.v2" when offered
"""

import asyncio
import hashlib
import json
from urllib.parse import parse_qs

_released = {}


def _event(key):
    if key not in _released:
        _released[key] = asyncio.Event()
    return _released[key]


def _headers(scope):
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]


async def _send_json(send, status, obj):
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive):
    h, length, chunks = hashlib.sha256(), 0, 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        body = msg.get("body", b"")
        if body:
            h.update(body)
            length += len(body)
            chunks += 1
        if not msg.get("more_body"):
            break
    return length, h.hexdigest(), chunks


async def _http(scope, receive, send):
    path = scope["path"]
    query = parse_qs(scope["query_string"].decode())
    if path == "/info":
        await _read_body(receive)
        await _send_json(
            send,
            200,
            {
                "http_version": scope["http_version"],
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "headers": _headers(scope),
            },
        )
    elif path == "/upload":
        length, digest, chunks = await _read_body(receive)
        await _send_json(
            send,
            200,
            {"length": length, "sha256": digest, "receives": chunks, "headers": _headers(scope),
             "http_version": scope["http_version"]},
        )
    elif path == "/stream":
        await _read_body(receive)
        n = int(query.get("n", ["3"])[0])
        key = query.get("id", [""])[0]
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"chunk 0\n", "more_body": True})
        try:
            await asyncio.wait_for(_event(key).wait(), 10)
            how = "released"
        except asyncio.TimeoutError:
            how = "timeout"
        for i in range(1, n):
            await send({"type": "http.response.body", "body": f"chunk {i} {how}\n".encode(),
                        "more_body": i < n - 1})
    elif path == "/release":
        await _read_body(receive)
        _event(query.get("id", [""])[0]).set()
        await _send_json(send, 200, {"released": True})
    else:
        await _read_body(receive)
        await _send_json(send, 404, {"detail": "not found"})


async def _websocket(scope, receive, send):
    msg = await receive()
    assert msg["type"] == "websocket.connect"
    accept = {"type": "websocket.accept"}
    if "chat.v2" in scope.get("subprotocols", []):
        accept["subprotocol"] = "chat.v2"
    await send(accept)
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") == "close":
            await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
            return
        if msg.get("text") is not None:
            await send({"type": "websocket.send", "text": msg["text"]})
        else:
            await send({"type": "websocket.send", "bytes": msg["bytes"]})


async def app(scope, receive, send):
    if scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    elif scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
