#!/usr/bin/env python3
"""Fault-injecting TCP relay between opsgate and its upstream (what `tc netem` and
Toxiproxy would do; neither is available here). Control: one command per line on the
control port, answered `ok <mode>`:
  pass           forward as is
  delay MS       hold every chunk MS ms before forwarding it (both directions)
  stall          stop forwarding on every connection, old and new (loss-like); data
                 waits in the socket buffers and flows again on `pass`
  reset          RST every open connection, and every new one while the mode lasts
  blackhole      read and discard everything, old and new connections; on leaving the
                 mode those connections are closed
  stats          counters, as `ok conns=N accepted=N resets=N`
"""
import argparse
import asyncio
import socket
import struct


class Relay:
    def __init__(self, target):
        self.target = target
        self.mode = "pass"
        self.delay = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.conns = set()  # (client_writer, upstream_writer or None)
        self.blackholed = set()
        self.accepted = 0
        self.resets = 0

    def rst(self, writer):
        if writer is None:
            return
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        writer.transport.abort()

    def set_mode(self, mode, arg=0.0):
        old = self.mode
        self.mode = mode
        self.delay = arg / 1000 if mode == "delay" else 0.0
        if mode in ("stall", "blackhole"):
            self.flowing.clear()
        else:
            self.flowing.set()
        if mode == "reset":
            for c, u in list(self.conns):
                self.resets += 1
                self.rst(c)
                self.rst(u)
        if old == "blackhole" and mode != "blackhole":
            for c, u in list(self.blackholed):
                c.close()
                if u is not None:
                    u.close()
            self.blackholed.clear()

    async def pump(self, reader, writer, pair):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.mode == "blackhole":
                    self.blackholed.add(pair)
                    continue
                if not self.flowing.is_set():
                    await self.flowing.wait()
                    if pair in self.blackholed:
                        return
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            self.rst(writer)

    async def handle(self, creader, cwriter):
        self.accepted += 1
        if self.mode == "reset":
            self.resets += 1
            self.rst(cwriter)
            return
        pair = (cwriter, None)
        self.conns.add(pair)
        try:
            if self.mode == "blackhole":
                # Swallow until the mode ends, as a dropped SYN-ACK path would.
                self.blackholed.add(pair)
                while self.mode == "blackhole" and await creader.read(65536):
                    pass
                if self.mode == "blackhole" or pair not in self.blackholed:
                    return
                self.blackholed.discard(pair)
            try:
                ureader, uwriter = await asyncio.open_connection(*self.target)
            except OSError:
                self.rst(cwriter)
                return
            self.conns.discard(pair)
            pair = (cwriter, uwriter)
            self.conns.add(pair)
            await asyncio.gather(self.pump(creader, uwriter, pair), self.pump(ureader, cwriter, pair))
            uwriter.close()
        finally:
            self.conns.discard(pair)
            cwriter.close()

    async def control(self, reader, writer):
        try:
            while line := await reader.readline():
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "stats":
                    reply = f"ok conns={len(self.conns)} accepted={self.accepted} resets={self.resets}"
                elif words[0] in ("pass", "stall", "reset", "blackhole", "delay"):
                    self.set_mode(words[0], float(words[1]) if len(words) > 1 else 0.0)
                    reply = f"ok {self.mode}"
                else:
                    reply = f"error unknown command {words[0]!r}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, help="host:port the relay accepts on")
    ap.add_argument("--control", required=True, help="host:port of the control channel")
    ap.add_argument("--target", required=True, help="host:port of the upstream")
    args = ap.parse_args()
    th, tp = args.target.rsplit(":", 1)
    relay = Relay((th, int(tp)))
    lh, lp = args.listen.rsplit(":", 1)
    ch, cp = args.control.rsplit(":", 1)
    s1 = await asyncio.start_server(relay.handle, lh, int(lp), reuse_address=True, backlog=1024)
    s2 = await asyncio.start_server(relay.control, ch, int(cp), reuse_address=True)
    async with s1, s2:
        await asyncio.gather(s1.serve_forever(), s2.serve_forever())


if __name__ == "__main__":
    asyncio.run(main())
