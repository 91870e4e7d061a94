#!/usr/bin/env python3
"""A Python `ssl` client for the gateway's TLS tests.

    tls_client.py HOST PORT --ca CA.pem [--sni NAME] [--size N] [--alpn P]

Connects, verifies the server against CA.pem for NAME, sends N random bytes
(while reading), half-closes with close_notify, and checks that the bytes
echoed back hash the same. Prints one JSON line: the certificate's names,
the TLS version, the ALPN protocol, the bytes echoed, or "error".
"""
import argparse
import hashlib
import json
import os
import socket
import ssl
import sys
import threading


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--ca", required=True)
    p.add_argument("--sni")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--alpn")
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.ca)
    if a.alpn:
        ctx.set_alpn_protocols([a.alpn])
    out = {}
    try:
        raw = socket.create_connection((a.host, a.port), timeout=30)
        s = ctx.wrap_socket(raw, server_hostname=a.sni or a.host)
        cert = s.getpeercert()
        out["names"] = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
        out["version"] = s.version()
        out["alpn"] = s.selected_alpn_protocol()
        data = os.urandom(a.size)

        def send():
            view = memoryview(data)
            for i in range(0, len(view), 65536):
                s.sendall(view[i:i + 65536])

        t = threading.Thread(target=send)
        t.start()
        h = hashlib.sha256()
        got = 0
        while got < a.size:
            chunk = s.recv(262144)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        t.join()
        out["echoed"] = got
        out["intact"] = got == a.size and h.digest() == hashlib.sha256(data).digest()
        # close_notify, then the server's own once the backend has closed.
        plain = s.unwrap()
        plain.close()
    except Exception as e:  # the test reads the JSON
        out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out), flush=True)
        sys.exit(1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
