#!/usr/bin/env python3
"""The soak's app: a small HTTP/1.1 keep-alive server. Every path answers 200 with a
short JSON body; `?ms=N` delays the answer N ms (in-flight requests at shutdown).
Request bodies (Content-Length or chunked) are read in full before answering."""
import argparse
import asyncio
import signal
import urllib.parse


async def read_body(reader, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            await reader.readexactly(size + 2)
    n = int(headers.get("content-length", "0") or 0)
    if n:
        await reader.readexactly(n)


async def handle(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            parts = line.decode("latin-1").split()
            if len(parts) < 3:
                return
            method, target = parts[0], parts[1]
            headers = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            await read_body(reader, headers)
            query = urllib.parse.urlsplit(target).query
            ms = urllib.parse.parse_qs(query).get("ms")
            if ms:
                await asyncio.sleep(int(ms[0]) / 1000)
            body = b"" if method == "HEAD" else b'{"ok":true}'
            close = headers.get("connection", "").lower() == "close"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(b'{"ok":true}'), b"Connection: close\r\n" if close else b"", body)
            )
            await writer.drain()
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, help="host:port")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
