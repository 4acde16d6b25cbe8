#!/usr/bin/env python3
"""HTTP test server for sockmesh: answers every GET with the body `client=<ip>:<port>`.

A `ms=<n>` query parameter (at most 10000) delays the answer, so a connection stays open long
enough to be seen in `sockmesh status`.

Prints `listening <ip>:<port>` once bound and `accepted peer=<ip>:<port> path=<path>` for every
request (stdout, flushed), so a test can count what reached the server and from where.
"""
import argparse
import http.server
import socket
import sys
import time
import urllib.parse

MAX_DELAY_MS = 10000


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "sockmesh-test-http/1"

    def do_GET(self):  # noqa: N802 (http.server naming)
        ip, port = self.client_address[0], self.client_address[1]
        print(f"accepted peer={ip}:{port} path={self.path}", flush=True)
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        try:
            delay_ms = min(int(query.get("ms", ["0"])[0]), MAX_DELAY_MS)
        except ValueError:
            delay_ms = 0
        if delay_ms > 0:
            time.sleep(delay_ms / 1000.0)
        body = f"client={ip}:{port}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args()
    cls = Server6 if ":" in a.bind else Server
    srv = cls((a.bind, a.port), Handler)
    host, port = srv.server_address[0], srv.server_address[1]
    print(f"listening {host}:{port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
