#!/usr/bin/env python3
"""A link of an application chain for the colouring tests: a thread-per-request HTTP/1.1 server
(keep-alive) that, for each request, calls the next service over a shared pool of persistent
keep-alive connections and answers with the path the request took.

    chain_app.py serve --port P --name entry --colour gray [--next HOST:PORT] [--forward]
    chain_app.py load --target HOST:PORT --requests N --concurrency C --mix MIX --seconds-limit S

serve: each request is answered `<name>/<colour>` (a leaf) or `<name>/<colour> <next answer>`.
With --forward the request's `x-mesh-colour` header is copied onto the downstream call (an app
that forwards the header); without it the downstream call carries no header at all (an app
that does not, whose colour only the kernel can carry). `GET /__stats` answers JSON
{"name","colour","served":{received colour or "none": n},"downstream_errors":n}. Prints
`listening 0.0.0.0:P` when ready.

load: N requests from C threads, each over its own keep-alive connection; MIX is a
comma-separated list of kinds drawn in turn: `base` (no header), `gray`/`stress`/... (that
`x-mesh-colour`), `user` (an `x-user` key, for hashed ingress rules), `beta` (`x-group: beta`).
Prints one JSON line {"by_kind":{kind:{"<status> <body>": n}}, "errors": n, "elapsed_ms"}.
"""

import argparse
import http.client
import http.server
import json
import queue
import sys
import threading
import time

COLOUR = "x-mesh-colour"


class Pool:
    """Persistent keep-alive connections to one address, shared by every request thread."""

    def __init__(self, target, size):
        host, port = target.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.idle = queue.LifoQueue()
        for _ in range(size):
            self.idle.put(None)

    def get(self, path, headers):
        conn = self.idle.get(timeout=30)
        try:
            for attempt in range(2):
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                try:
                    conn.request("GET", path, headers=headers)
                    resp = conn.getresponse()
                    body = resp.read().decode("utf-8", "replace")
                    if resp.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    return resp.status, body, resp.getheader("sockmesh-error")
                except (http.client.HTTPException, OSError):
                    conn.close()
                    conn = None
                    if attempt == 1:
                        raise
        finally:
            self.idle.put(conn)


def serve(args):
    served = {}
    lock = threading.Lock()
    errors = [0]
    pool = Pool(args.next, args.pool) if args.next else None

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, status, body, extra=None):
            data = body.encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/__stats":
                with lock:
                    body = json.dumps({"name": args.name, "colour": args.colour,
                                       "served": dict(served), "downstream_errors": errors[0]})
                return self.reply(200, body)
            got = self.headers.get(COLOUR) or "none"
            with lock:
                served[got] = served.get(got, 0) + 1
            me = f"{args.name}/{args.colour}"
            if pool is None:
                return self.reply(200, me)
            headers = {}
            if args.forward and self.headers.get(COLOUR):
                headers[COLOUR] = self.headers.get(COLOUR)
            try:
                status, body, why = pool.get("/", headers)
            except Exception as e:  # noqa: BLE001 - any failure is the chain's answer
                with lock:
                    errors[0] += 1
                return self.reply(502, f"{me} downstream failed: {e}")
            if status != 200:
                with lock:
                    errors[0] += 1
                return self.reply(status, f"{me} {body.strip()}", {"sockmesh-error": why or ""})
            self.reply(200, f"{me} {body}")

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    srv = Server(("0.0.0.0", args.port), Handler)
    print(f"listening 0.0.0.0:{args.port}", flush=True)
    srv.serve_forever()


def load(args):
    kinds = args.mix.split(",")
    results = {}
    errors = [0]
    lock = threading.Lock()
    counter = [0]
    deadline = time.monotonic() + args.seconds_limit
    host, port = args.target.rsplit(":", 1)

    def worker():
        conn = None
        while time.monotonic() < deadline:
            with lock:
                i = counter[0]
                if i >= args.requests:
                    break
                counter[0] += 1
            kind = kinds[i % len(kinds)]
            headers = {}
            if kind == "user":
                headers["x-user"] = f"user-{i}"
            elif kind == "beta":
                headers["x-group"] = "beta"
            elif kind != "base":
                headers[COLOUR] = kind
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace").strip()
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                key = f"{resp.status} {body}"
            except (http.client.HTTPException, OSError) as e:
                if conn is not None:
                    conn.close()
                conn = None
                key = f"error {type(e).__name__}"
                with lock:
                    errors[0] += 1
            with lock:
                by = results.setdefault(kind, {})
                by[key] = by.get(key, 0) + 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"by_kind": results, "errors": errors[0], "sent": counter[0],
                      "elapsed_ms": int((time.monotonic() - start) * 1000)}), flush=True)
    return 0 if counter[0] >= args.requests and errors[0] == 0 else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--colour", default="base")
    s.add_argument("--next")
    s.add_argument("--forward", action="store_true")
    s.add_argument("--pool", type=int, default=4)
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True)
    ld.add_argument("--requests", type=int, required=True)
    ld.add_argument("--concurrency", type=int, default=8)
    ld.add_argument("--mix", default="base")
    ld.add_argument("--seconds-limit", type=float, default=120)
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
        return 0
    return load(args)


if __name__ == "__main__":
    sys.exit(main())
