#!/usr/bin/env python3
"""A colour-unaware thread-per-request app and its downstream, for kernel colour propagation tests.

`mid --port P --downstream IP:PORT --pool N [--bind ADDR]`
    ThreadingHTTPServer (HTTP/1.1 keep-alive, one thread per inbound connection). For every
    `GET /req?id=X` it calls the downstream over a pool of N persistent connections shared by all
    its threads (checked out for one request/response, then returned), and answers with JSON:
    {"id", "down_local": "ip:port" of the pooled socket, "offset": the stream offset at which its
    downstream request started on that socket (bytes it had sent on it before), "down_at": the
    offset the downstream saw, "tid": native thread id}. It forwards nothing of the inbound
    request but the id in the path: it knows nothing about colours. `--bind ::` listens
    dual-stack (IPv4 clients then arrive on AF_INET6 sockets with IPv4-mapped addresses).

`down --port P`
    Keep-alive HTTP/1.1 server over raw sockets that answers each request with `at=<offset>`,
    the offset in its connection's byte stream at which that request started.

Both print `listening <ip>:<port>` when ready. Every socket operation has a timeout.
"""
import argparse
import http.server
import json
import queue
import socket
import sys
import threading
import urllib.parse

IO_TIMEOUT_S = 10


def read_head(sock, buf):
    """Read until a full head is buffered; returns (head, rest) or (None, buf) at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def serve_down(port):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    print(f"listening 0.0.0.0:{port}", flush=True)

    def conn(s):
        s.settimeout(60)
        consumed = 0
        buf = b""
        with s:
            while True:
                start = consumed
                head, buf = read_head(s, buf)
                if head is None:
                    return
                consumed += len(head) + 4  # no request bodies
                body = f"at={start}".encode()
                s.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )

    while True:
        s, _ = ls.accept()
        threading.Thread(target=conn, args=(s,), daemon=True).start()


class PooledConn:
    def __init__(self, target):
        self.sock = socket.create_connection(target, timeout=IO_TIMEOUT_S)
        self.sent = 0
        self.buf = b""

    def call(self, path):
        req = f"GET {path} HTTP/1.1\r\nHost: down\r\n\r\n".encode()
        offset = self.sent
        self.sock.sendall(req)
        self.sent += len(req)
        head, self.buf = read_head(self.sock, self.buf)
        if head is None:
            raise ConnectionError("downstream closed")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(self.buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("downstream closed mid-body")
            self.buf += chunk
        body, self.buf = self.buf[:length], self.buf[length:]
        return offset, body.decode()


def serve_mid(port, downstream, pool_size, bind):
    host, dport = downstream.rsplit(":", 1)
    target = (host, int(dport))
    pool = queue.Queue()
    for _ in range(pool_size):
        pool.put(None)  # connections are opened on first use, by the thread that needs one

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
            rid = q.get("id", ["?"])[0]
            c = pool.get(timeout=IO_TIMEOUT_S)
            try:
                if c is None:
                    c = PooledConn(target)
                offset, body = c.call(f"/down?id={rid}")
                local = c.sock.getsockname()
                out = {
                    "id": rid,
                    "down_local": f"{local[0]}:{local[1]}",
                    "offset": offset,
                    "down_at": int(body.split("=", 1)[1]),
                    "tid": threading.get_native_id(),
                }
                status = 200
            except Exception as e:  # report, and drop the broken connection
                c = None
                out = {"id": rid, "error": repr(e)}
                status = 502
            finally:
                pool.put(c)
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

        def server_bind(self):
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    srv = Server((bind, port), Handler)
    srv.timeout = IO_TIMEOUT_S
    print(f"listening {bind}:{port}", flush=True)
    srv.serve_forever()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("down")
    d.add_argument("--port", type=int, required=True)
    m = sub.add_parser("mid")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--downstream", required=True)
    m.add_argument("--pool", type=int, default=2)
    m.add_argument("--bind", default="0.0.0.0")
    a = ap.parse_args()
    if a.mode == "down":
        serve_down(a.port)
    else:
        serve_mid(a.port, a.downstream, a.pool, a.bind)


if __name__ == "__main__":
    sys.exit(main())
