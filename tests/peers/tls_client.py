#!/usr/bin/env python3
"""A Python `ssl` client (asyncio) for the gateway's TLS tests.

    tls_client.py HOST PORT --ca CA.pem [--sni NAME] [--size N] [--alpn P]
                  [--cert C.pem --key K.pem] [--wait-close SECONDS]

Connects, verifies the server against CA.pem for NAME, sends N random bytes
while reading the echo, checks the echo by hash, then closes with
close_notify. Prints one JSON line: the certificate's names, the TLS
version, the ALPN protocol, the bytes echoed, or "error". --wait-close:
sends nothing, reads until the server closes (at most SECONDS), and says
whether it did ("server_closed").
"""
import argparse
import asyncio
import hashlib
import json
import os
import ssl
import sys


async def run(a):
    ctx = ssl.create_default_context(cafile=a.ca)
    if a.cert:
        ctx.load_cert_chain(a.cert, a.key)
    if a.alpn:
        ctx.set_alpn_protocols([a.alpn])
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.sni or a.host), 30)
    obj = writer.get_extra_info("ssl_object")
    cert = writer.get_extra_info("peercert")
    out = {
        "names": [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"],
        "version": obj.version(),
        "alpn": obj.selected_alpn_protocol(),
    }
    if a.hold:
        # Connected: say so, and wait for the test to let us go on.
        print("OPEN", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if a.wait_close is not None:
        async def until_eof():
            while await reader.read(65536):
                pass
        try:
            await asyncio.wait_for(until_eof(), a.wait_close)
            out["server_closed"] = True
        except asyncio.TimeoutError:
            out["server_closed"] = False
        except (ssl.SSLError, ConnectionError):
            out["server_closed"] = True
        writer.close()
        return out
    data = os.urandom(a.size)

    async def send():
        for i in range(0, len(data), 65536):
            writer.write(data[i:i + 65536])
            await writer.drain()

    async def receive():
        h = hashlib.sha256()
        got = 0
        while got < a.size:
            chunk = await reader.read(262144)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        return got, h.digest()

    _, (got, digest) = await asyncio.wait_for(asyncio.gather(send(), receive()), 90)
    out["echoed"] = got
    out["intact"] = got == a.size and digest == hashlib.sha256(data).digest()
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 10)
    except (ssl.SSLError, ConnectionError):
        pass
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--ca", required=True)
    p.add_argument("--sni")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--alpn")
    p.add_argument("--wait-close", type=float)
    p.add_argument("--cert", help="client certificate (mTLS)")
    p.add_argument("--key")
    p.add_argument("--hold", action="store_true", help='print "OPEN" after the handshake, wait for a line on stdin')
    a = p.parse_args()
    try:
        out = asyncio.run(run(a))
    except Exception as e:  # the test reads the JSON
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        sys.exit(1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
