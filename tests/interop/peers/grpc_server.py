"""A grpcio server for service `interop.Echo`, with raw bytes as messages (no codegen).
Binds 127.0.0.1 on a port the OS picks and prints `PORT <n>` on stdout once serving.

  Unary      (bytes) -> b"echo:" + request; initial metadata x-initial, trailers x-trailer
                        and x-checksum-bin (sha256 of the request)
  Fail       (bytes) -> NOT_FOUND with a non-ASCII message, text and binary trailers
                        (grpc-status-details-bin among them)
  Stream     b"ID:N" -> N messages; message 0 at once, the rest only after Release(ID) (or
                        10 s): each says "released" or "timeout"
  Release    b"ID"   -> lets Stream(ID) go on
  Chat       stream  -> echoes each message as it arrives (bidirectional)
"""

import hashlib
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "interop.Echo"
FAIL_MESSAGE = "widget 42 not found – ünïcödé"
DETAILS_BIN = bytes(range(256))

_lock = threading.Lock()
_events = {}


def _event(key):
    with _lock:
        return _events.setdefault(key, threading.Event())


def unary(request, context):
    context.send_initial_metadata((("x-initial", "hello"),))
    context.set_trailing_metadata(
        (("x-trailer", "done"), ("x-checksum-bin", hashlib.sha256(request).digest()))
    )
    return b"echo:" + request


def fail(request, context):
    context.set_trailing_metadata(
        (("x-trailer", "failing"), ("grpc-status-details-bin", DETAILS_BIN))
    )
    context.abort(grpc.StatusCode.NOT_FOUND, FAIL_MESSAGE)


def stream(request, context):
    key, n = request.decode().split(":")
    yield b"0"
    how = "released" if _event(key).wait(10) else "timeout"
    for i in range(1, int(n)):
        yield f"{i}:{how}".encode()


def release(request, context):
    _event(request.decode()).set()
    return b"ok"


def chat(request_iterator, context):
    for msg in request_iterator:
        yield b"re:" + msg


def main():
    ident = None
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, ident, ident),
        "Release": grpc.unary_unary_rpc_method_handler(release, ident, ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
