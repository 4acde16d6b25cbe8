#!/usr/bin/env python3
"""An app of one link (chain) for the dual-link tests, behaving like a real service where it
matters for a warm switch:

- a cache that is cold after start: the first request for a key costs --cold-ms (a miss), later
  ones are hits;
- a pool of connections to a backend that costs --connect-ms to open (the backend is a TCP
  server in this process on 127.0.0.1:--backend-port that delays its greeting on every new
  connection, as a TLS/auth handshake would); each request does one round trip on a pooled
  connection; connections are kept and reused, --pool-min of them opened before serving.

    link_app.py serve --port P --name trade@app [--cold-ms 20] [--connect-ms 40] [--pool-min 8]
                      [--backend-port B]
    link_app.py load --target A [--target B ...] --rate R --seconds S --keys K [--concurrency C]
                     [--health-every N] [--live-ms M]

serve: HTTP/1.1 keep-alive, thread per connection. `GET /k/<key>` answers `<name>` (200);
`GET /health` answers `<name> ok` without touching cache or backend; `GET /__stats` answers
JSON {"name","served","health","misses","pool_opened","pool_size","accepted","accept_ms",
"peers","slow","miss_ms"}: `accepted` connections (`accept_ms`: when, epoch ms, the last 2,000; `peers`:
how many from each address), `slow`: the last
500 requests that took the app more than 5 ms to answer ([epoch ms, ms]), so a test can tell
the app's own time from the path's; `miss_ms`: when the last 2,000 cache misses happened. Prints `listening 0.0.0.0:P`.

load: open-loop constant rate R per target for S seconds; C threads per target, each with its
own keep-alive connection (reconnects when the server closes it; a connect refused is retried,
as it carries no request, and counted in `connect_retries`). Every `--health-every`-th request
is a `GET /health`. Prints one JSON line {"targets":[...], "names":[...], "events":[[target,
sent_ms_epoch, latency_ms, name index (-1: error), health 0/1, ms sent after its slot], ...], "errors":n,
"connect_retries":n, "late":n} (`late`: requests sent more than 50 ms after their slot).
With --live-ms, also a line every M ms while it runs: {"live": seconds, "targets": [{"served_by":
{name: n}, "p50", "p99", "max"}, ...]} for the requests answered in that interval (the demo).
"""

import argparse
import gc
import http.client
import json
import queue
import random
import socket
import sys
import threading
import time


def backend_server(port, connect_ms, ready):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(128)
    ready.set()

    def conn(s):
        with s:
            time.sleep(connect_ms / 1000.0)  # the costly handshake
            s.sendall(b"hello\n")
            f = s.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    return
                s.sendall(b"ok " + line)

    while True:
        s, _ = ls.accept()
        threading.Thread(target=conn, args=(s,), daemon=True).start()


class Pool:
    def __init__(self, port):
        self.port = port
        self.idle = queue.LifoQueue()
        self.lock = threading.Lock()
        self.opened = 0

    def get(self):
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            f = s.makefile("rb")
            if f.readline() != b"hello\n":
                raise OSError("backend greeting")
            with self.lock:
                self.opened += 1
            return (s, f)

    def put(self, c):
        self.idle.put(c)

    def call(self, what):
        c = self.get()
        try:
            c[0].sendall(what.encode() + b"\n")
            if not c[1].readline():
                raise OSError("backend closed")
        except OSError:
            c[0].close()
            raise
        self.put(c)


def serve(args):
    ready = threading.Event()
    bport = args.backend_port or (args.port + 1000)
    threading.Thread(target=backend_server, args=(bport, args.connect_ms, ready), daemon=True).start()
    ready.wait(10)
    pool = Pool(bport)
    # Like a JDBC/RPC pool's minimum idle size: opened (at a cost) before serving.
    for c in [pool.get() for _ in range(args.pool_min)]:
        pool.put(c)
    cache = set()
    stats = {"served": 0, "health": 0, "misses": 0, "accepted": 0}
    accept_ms = []
    miss_ms = []
    peers = {}
    slow = []
    lock = threading.Lock()

    def handle(s):
        f = s.makefile("rb")
        with s:
            while True:
                line = f.readline(4096)
                if not line:
                    return
                t_req = time.time()
                parts = line.split()
                if len(parts) < 2:
                    return
                path = parts[1].decode("latin-1")
                length = 0
                while True:
                    h = f.readline(8192)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip() or 0)
                if length:
                    f.read(length)
                if path == "/__stats":
                    with lock:
                        body = json.dumps(dict(stats, name=args.name, pool_opened=pool.opened,
                                               pool_size=pool.idle.qsize(), accept_ms=accept_ms,
                                               slow=slow, peers=peers, miss_ms=miss_ms)).encode()
                elif path.startswith("/health"):
                    with lock:
                        stats["health"] += 1
                    body = (args.name + " ok").encode()
                else:
                    key = path.rsplit("/", 1)[-1]
                    with lock:
                        miss = key not in cache
                        cache.add(key)
                        stats["served"] += 1
                        if miss:
                            stats["misses"] += 1
                            miss_ms.append(int(t_req * 1000))
                            del miss_ms[:-2000]
                    if miss:
                        time.sleep(args.cold_ms / 1000.0)
                    pool.call(key)
                    body = args.name.encode()
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s"
                          % (len(body), body))
                took = (time.time() - t_req) * 1000
                if took > 5:
                    with lock:
                        slow.append([int(t_req * 1000), round(took, 2)])
                        del slow[:-500]

    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", args.port))
    ls.listen(256)
    print("listening 0.0.0.0:%d" % args.port, flush=True)
    while True:
        s, peer = ls.accept()
        with lock:
            stats["accepted"] += 1
            peers[peer[0]] = peers.get(peer[0], 0) + 1
            accept_ms.append(int(time.time() * 1000))
            del accept_ms[:-2000]
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(s,), daemon=True).start()


def load(args):
    # The events list grows by thousands of lists: the cyclic collector's pauses would grow
    # with it and make later windows look slower than earlier ones. Nothing here makes cycles.
    gc.disable()
    names = []
    names_lock = threading.Lock()
    events = []
    ev_lock = threading.Lock()
    counters = {"errors": 0, "connect_retries": 0, "late": 0}
    start = time.time() + 0.2
    end = start + args.seconds
    period = 1.0 / args.rate  # per target

    def name_index(n):
        with names_lock:
            if n not in names:
                names.append(n)
            return names.index(n)

    def worker(ti, target, k):
        host, port = target.rsplit(":", 1)
        conn = None
        i = k
        local = []
        while True:
            slot = start + i * period
            if slot >= end:
                break
            now = time.time()
            if slot > now:
                time.sleep(slot - now)
            elif now - slot > 0.05:
                counters["late"] += 1
            health = args.health_every > 0 and i % args.health_every == 0
            # A key drawn per slot (the same sequence every run): no aliasing with a trickle
            # that takes every n-th request.
            path = "/health" if health else "/k/%d" % random.Random(i).randrange(args.keys)
            sent = time.time()
            result = -1
            for attempt in range(50):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(host, int(port), timeout=10)
                        conn.connect()
                        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    conn = None
                    counters["connect_retries"] += 1
                    time.sleep(0.02)
                    continue
                try:
                    conn.request("GET", path)
                    r = conn.getresponse()
                    body = r.read().decode()
                    if r.status == 200:
                        result = name_index(body[:-3] if health and body.endswith(" ok") else body)
                    else:
                        sys.stderr.write("status %d: %s\n" % (r.status, body))
                except (OSError, http.client.HTTPException) as e:
                    sys.stderr.write("request %s to %s failed: %r\n" % (path, target, e))
                    conn.close()
                    conn = None
                break
            if result < 0:
                counters["errors"] += 1
            latency = round((time.time() - sent) * 1000, 2)
            local.append([ti, int(sent * 1000), latency, result, int(health), max(0, int((sent - slot) * 1000))])
            if args.live_ms > 0:
                with live_lock:
                    live.append((ti, latency, names[result] if result >= 0 else None))
            i += args.concurrency
        with ev_lock:
            events.extend(local)

    live = []  # (target, latency ms, name or None) since the last live line
    live_lock = threading.Lock()

    def reporter():
        t_next = start + args.live_ms / 1000.0
        while t_next < end + args.live_ms / 1000.0:
            time.sleep(max(0.0, t_next - time.time()))
            with live_lock:
                batch = live[:]
                del live[:]
            per = []
            for ti in range(len(args.target)):
                lat = sorted(e[1] for e in batch if e[0] == ti)
                by = {}
                for e in batch:
                    if e[0] == ti:
                        k = e[2] if e[2] is not None else "error"
                        by[k] = by.get(k, 0) + 1
                q = lambda f: lat[min(len(lat) - 1, int(len(lat) * f))] if lat else 0.0
                per.append({"served_by": by, "p50": q(0.5), "p99": q(0.99), "max": lat[-1] if lat else 0.0})
            print(json.dumps({"live": round(t_next - start, 2), "targets": per}), flush=True)
            t_next += args.live_ms / 1000.0

    threads = []
    if args.live_ms > 0:
        rt = threading.Thread(target=reporter, daemon=True)
        rt.start()
    for ti, t in enumerate(args.target):
        for k in range(args.concurrency):
            th = threading.Thread(target=worker, args=(ti, t, k))
            th.start()
            threads.append(th)
    for th in threads:
        th.join()
    events.sort(key=lambda e: e[1])
    print(json.dumps(dict(counters, targets=args.target, names=names, events=events)), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--cold-ms", type=float, default=20)
    s.add_argument("--connect-ms", type=float, default=40)
    s.add_argument("--backend-port", type=int, default=0)
    s.add_argument("--pool-min", type=int, default=8)
    l = sub.add_parser("load")
    l.add_argument("--target", action="append", required=True)
    l.add_argument("--rate", type=float, required=True)
    l.add_argument("--seconds", type=float, required=True)
    l.add_argument("--keys", type=int, default=100)
    l.add_argument("--concurrency", type=int, default=4)
    l.add_argument("--health-every", type=int, default=0)
    l.add_argument("--live-ms", type=int, default=0)
    a = p.parse_args()
    serve(a) if a.cmd == "serve" else load(a)


if __name__ == "__main__":
    main()
