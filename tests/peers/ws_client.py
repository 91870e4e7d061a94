#!/usr/bin/env python3
"""A Python `websockets` client for the gateway's end-to-end tests.

    ws_client.py echo URL [--sizes 0,1,...] [--fragments N] [--protocol P]
                          [--deflate] [--origin O] [--close CODE:REASON]
        Pings, echoes a text and a binary message of each size (and, with
        --fragments, the same again sent in N fragments), checks every reply
        byte for byte, then closes. Prints one JSON line.
    ws_client.py big URL --size N
        Sends one binary message of N bytes; prints how the connection closed.
    ws_client.py hold URL --count N [--again] [--binary]
        Opens N connections, echoes one message on each, prints "OPEN N", waits
        for a line on stdin, (with --again, echoes one more message on each,)
        closes them all, prints "CLOSED N".
    ws_client.py expect-first URL
        Prints the first message the server sends, then closes.
    ws_client.py wait-close URL
        Echoes one message, prints "OPEN 1", then waits (up to 60 s) for the
        server to close and prints its close code and reason.
    ws_client.py bridge URL [--sizes ...]
        For a bridge_tcp route in front of a TCP echo server: sends binary
        messages of the given sizes and checks that the bytes that come back,
        however they are split into messages, are the bytes sent.

Every mode takes wss:// URLs too, with --ca FILE (the CA to verify the
gateway's certificate with) and --sni NAME (the name to verify and send).

Exit status 0 means every check passed; otherwise the JSON has "error".
"""
import argparse
import asyncio
import json
import os
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

MAX = 64 * 1024 * 1024


def opts(a):
    kw = dict(max_size=MAX, proxy=None, ping_interval=None, open_timeout=20, close_timeout=10,
              compression="deflate" if getattr(a, "deflate", False) else None)
    if getattr(a, "protocol", None):
        kw["subprotocols"] = [p.strip() for p in a.protocol.split(",")]
    if getattr(a, "header", None):
        kw["additional_headers"] = [tuple(h.split(":", 1)) for h in a.header]
    if getattr(a, "origin", None):
        kw["origin"] = a.origin
    if a.url.startswith("wss:"):
        kw["ssl"] = ssl.create_default_context(cafile=a.ca)
        if a.sni:
            kw["server_hostname"] = a.sni
    return kw


def fail(msg):
    print(json.dumps({"error": msg}), flush=True)
    sys.exit(1)


def fragments(data, n):
    step = max(1, -(-len(data) // n))
    return [data[i:i + step] for i in range(0, len(data), step)] or [data[:0]]


async def echo(a):
    out = {"echoed": 0, "bytes": 0}
    async with connect(a.url, **opts(a)) as ws:
        out["protocol"] = ws.subprotocol
        out["extensions"] = ws.response.headers.get("Sec-WebSocket-Extensions")
        pong = await ws.ping(b"py-ping")
        await asyncio.wait_for(pong, 20)
        out["pong"] = True
        for n in [int(s) for s in a.sizes.split(",")]:
            for msg in ("t" * n, os.urandom(n)):
                for frag in ([None] + ([a.fragments] if a.fragments > 1 and n > 1 else [])):
                    await ws.send(msg if frag is None else fragments(msg, frag))
                    got = await asyncio.wait_for(ws.recv(), 60)
                    if got != msg:
                        fail(f"echo mismatch at {n} bytes ({type(msg).__name__})")
                    out["echoed"] += 1
                    out["bytes"] += n
        code, reason = a.close.split(":", 1)
        await ws.close(int(code), reason)
        out["close_code"] = ws.close_code
        out["close_reason"] = ws.close_reason
    print(json.dumps(out), flush=True)


async def big(a):
    async with connect(a.url, **opts(a)) as ws:
        try:
            await ws.send(os.urandom(a.size))
            got = await asyncio.wait_for(ws.recv(), 60)
            out = {"echoed": len(got)}
        except ConnectionClosed as e:
            rcvd = e.rcvd
            out = {"close_code": rcvd.code if rcvd else None, "close_reason": rcvd.reason if rcvd else None}
    print(json.dumps(out), flush=True)


async def hold(a):
    conns = []
    sem = asyncio.Semaphore(100)

    async def echo(ws, text):
        if not a.binary:
            await ws.send(text)
            return await asyncio.wait_for(ws.recv(), 30)
        # A bridge_tcp route returns the bytes as the TCP stream cut them.
        await ws.send(text.encode())
        got = b""
        while len(got) < len(text):
            got += await asyncio.wait_for(ws.recv(), 30)
        return got.decode()

    async def one(i):
        async with sem:
            ws = await connect(a.url, **opts(a))
            if await echo(ws, f"hello {i}") != f"hello {i}":
                fail(f"echo mismatch on connection {i}")
            conns.append(ws)

    await asyncio.gather(*(one(i) for i in range(a.count)))
    print(f"OPEN {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if a.again:
        async def again(i, ws):
            if await echo(ws, f"again {i}") != f"again {i}":
                fail(f"echo mismatch on connection {i} after the wait")
        await asyncio.gather(*(again(i, ws) for i, ws in enumerate(conns)))
    await asyncio.gather(*(ws.close(1000, "done") for ws in conns))
    print(f"CLOSED {len(conns)}", flush=True)


async def expect_first(a):
    async with connect(a.url, **opts(a)) as ws:
        got = await asyncio.wait_for(ws.recv(), 20)
        print(json.dumps({"first": got if isinstance(got, str) else got.hex()}), flush=True)


async def wait_close(a):
    async with connect(a.url, **opts(a)) as ws:
        await ws.send("hello")
        if await asyncio.wait_for(ws.recv(), 20) != "hello":
            fail("echo mismatch")
        print("OPEN 1", flush=True)
        try:
            await asyncio.wait_for(ws.recv(), 60)
            fail("a message instead of a close")
        except ConnectionClosed as e:
            rcvd = e.rcvd
            print(json.dumps({"close_code": rcvd.code if rcvd else None,
                              "close_reason": rcvd.reason if rcvd else None}), flush=True)


async def bridge(a):
    sent = bytearray()
    got = bytearray()
    messages = 0
    async with connect(a.url, **opts(a)) as ws:
        out = {"protocol": ws.subprotocol}
        for n in [int(s) for s in a.sizes.split(",")]:
            data = os.urandom(n)
            sent += data
            await ws.send(data)
            while len(got) < len(sent):
                msg = await asyncio.wait_for(ws.recv(), 60)
                if not isinstance(msg, bytes):
                    fail("a text message from a bridge_tcp route")
                got += msg
                messages += 1
        if got != sent:
            fail(f"bridged bytes differ ({len(got)} received, {len(sent)} sent)")
        await ws.close(1000, "bridge done")
        out.update(bytes=len(sent), messages_received=messages, close_code=ws.close_code)
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["echo", "big", "hold", "expect-first", "wait-close", "bridge"])
    p.add_argument("url")
    p.add_argument("--sizes", default="0,1,125,126,65535,65536")
    p.add_argument("--fragments", type=int, default=0)
    p.add_argument("--protocol", help="subprotocols offered, comma-separated")
    p.add_argument("--header", action="append", help="NAME:VALUE, repeatable")
    p.add_argument("--deflate", action="store_true")
    p.add_argument("--origin")
    p.add_argument("--ca")
    p.add_argument("--sni")
    p.add_argument("--close", default="4000:py done")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--again", action="store_true")
    p.add_argument("--binary", action="store_true")
    a = p.parse_args()
    try:
        modes = {"echo": echo, "big": big, "hold": hold, "expect-first": expect_first,
                 "wait-close": wait_close, "bridge": bridge}
        asyncio.run(modes[a.mode](a))
    except InvalidStatus as e:
        print(json.dumps({"error": f"HTTP {e.response.status_code}", "status": e.response.status_code}), flush=True)
        sys.exit(1)
    except SystemExit:
        raise
    except BaseException as e:  # report, don't hide: the test reads the JSON
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
