#!/usr/bin/env python3
"""A small HTTP authorization service for the `auth.external` tests.

    authz.py --listen HOST:PORT

Prints "READY <port>" once listening. For every request (any method, any
path):
- `Authorization: Bearer letmein` -> 200, with `X-User-Id: 42` and
  `X-Seen-Path` (the path it was asked about) for the gateway to pass on;
- `Authorization: Bearer slow` -> the same, 2 s later;
- anything else -> 403, `X-Reason: nope`, `WWW-Authenticate: Bearer`, body
  "denied by authz".
"""
import argparse, http.server, time


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one(self):
        auth = self.headers.get("Authorization", "")
        if auth == "Bearer slow":
            time.sleep(2)
            auth = "Bearer letmein"
        if auth == "Bearer letmein":
            self.send_response(200)
            self.send_header("X-User-Id", "42")
            self.send_header("X-Seen-Path", self.path)
            self.send_header("X-Seen-Forwarded-For", self.headers.get("X-Forwarded-For", ""))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            body = b"denied by authz\n"
            self.send_response(403)
            self.send_header("X-Reason", "nope")
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_one

    def log_message(self, *args):
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    srv = http.server.ThreadingHTTPServer((host, int(port)), H)
    print(f"READY {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
