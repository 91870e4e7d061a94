#!/usr/bin/env python3
"""A Python `websockets` echo server for the gateway's end-to-end tests.

    ws_echo_server.py --listen HOST:PORT [--name NAME]

Echoes every message, selects the first subprotocol offered, negotiates
permessage-deflate when asked. Prints "READY <port>" once listening.
"""
import argparse
import asyncio

from websockets.asyncio.server import serve


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--name", default="python")
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    def pick(conn, offered):
        return offered[0] if offered else None

    async with serve(echo, host.strip("[]"), int(port), max_size=64 * 1024 * 1024,
                     select_subprotocol=pick, ping_interval=None) as server:
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
