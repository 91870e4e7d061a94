#!/usr/bin/env python3
"""A Python `ssl` echo server (asyncio) for the gateway's TLS passthrough tests.

    tls_echo_server.py --listen HOST:PORT --cert C.pem --key K.pem

Echoes every byte, then closes with close_notify once the client has.
Prints "READY <port>" once listening.
"""
import argparse
import asyncio
import ssl


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)

    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(echo, host.strip("[]"), int(port), ssl=ctx)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
