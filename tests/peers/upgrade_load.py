#!/usr/bin/env python3
"""Constant-rate HTTP/1.1 keep-alive load for the sockmesh upgrade tests, and its server.

  upgrade_load.py serve --port 8080
      HTTP/1.1 keep-alive server: `GET /?id=<id>` answers `id=<id>` (so a response that belongs
      to another request is caught). Prints `listening <port>`.

  upgrade_load.py load --url 10.96.0.10:8080 --conns 8 --rate 50 --duration 30 --stop-file F
      `conns` keep-alive connections (http.client), each sending `rate` requests per second on a
      fixed schedule (a stall delays the schedule's later requests, and their latency is counted
      from when they were due, so a stall is not hidden). A request fails on any transport
      error, a non-200 status, a body that is not its own id, or no answer within --timeout.
      A failed connection is closed and the next request opens a new one (counted in
      `connects`). Stops at --duration or when the stop file exists. Prints one JSON line:
      {"requests","ok","failed","errors":{reason:n},"connects","p50_ms","p99_ms","max_ms",
       "seconds":[{"t":unix_s,"n":..,"p99_ms":..,"failed":..}]}
      --samples FILE also writes one line per request: `<due unix ms> <latency ms> <1|0> <connection>`.

  upgrade_load.py slow --url 10.96.0.10:8080
      A slow client on one connection: sends a whole request and reads its answer, then the
      first half of a second request's head and prints `partial <local port>`; on a `go` line
      from stdin sends the rest, reads the answer, sends a third request, and prints
      {"ok": bool, "answers": [...], "port_before", "port_after"} (the same connection
      throughout, unless it failed).

  `serve` also answers `GET /?id=<id>&delay=<s>` after <s> seconds, and `POST /?id=<id>` with
  `id=<id> sha256=<hex of the body> len=<bytes>`.

  upgrade_load.py pipeline --url U --depth 8 --delay 0.02 --seconds 8 --stop-file F
      ONE connection; writes `depth` requests back to back in one write (pipelined: the server
      sees the next ones before answering the first; each answered after `delay` s), reads the
      `depth` answers, checks each is its own request's, in order, and repeats until the stop
      file exists (bounded by --seconds). Prints "running <local port>" after the first batch
      and then {"batches","requests","ok","failed","first_error","port_before","port_after"}.
      Stops at the first error (no reconnect).

  upgrade_load.py post --url U --mib 4 --mibps 1.5
      ONE connection; a POST of `mib` MiB of deterministic bytes, paced at `mibps`, then a GET
      on the same connection. Prints "sending <local port>" once the head and the first chunk
      are out, then {"ok","sha_match","len","server","elapsed_ms","follow_up","port_before",
      "port_after"}.

  upgrade_load.py delayed --url U --delay 2
      ONE connection; `GET /?id=d1&delay=<delay>`, prints "sent <local port>", reads its answer,
      then `GET /?id=d2` on the same connection. Prints {"ok","answers","elapsed_ms",
      "port_before","port_after"}.

  upgrade_load.py get --url U --count N
      N requests, each on a new connection (1 s time-out). Prints {"ok","failed","errors"}.
"""
import argparse
import hashlib
import http.client
import http.server
import json
import os
import socket
import sys
import threading
import time
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle and delayed ACKs add 40 ms.
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        delay = float(q.get("delay", ["0"])[0])
        if delay > 0:
            time.sleep(delay)
        body = ("id=" + q.get("id", [""])[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        left = int(self.headers.get("Content-Length", "0"))
        h, n = hashlib.sha256(), 0
        while left > 0:
            b = self.rfile.read(min(left, 65536))
            if not b:
                break
            h.update(b)
            n += len(b)
            left -= len(b)
        body = ("id=%s sha256=%s len=%d" % (q.get("id", [""])[0], h.hexdigest(), n)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def serve(a):
    srv = Server(("0.0.0.0", a.port), Handler)
    print(f"listening {a.port}", flush=True)
    srv.serve_forever()


class Counting(http.client.HTTPConnection):
    connects = 0
    lock = threading.Lock()

    def connect(self):
        with Counting.lock:
            Counting.connects += 1
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def load(a):
    host, port = a.url.rsplit(":", 1)
    lock = threading.Lock()
    lat = []  # (finish unix time, latency ms, ok, connection index)
    errors = {}
    end = time.time() + a.duration
    stop = threading.Event()

    def worker(w):
        conn = Counting(host, int(port), timeout=a.timeout)
        period = 1.0 / a.rate
        start = time.monotonic() + w * period / a.conns
        k = 0
        while not stop.is_set():
            due = start + k * period
            k += 1
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            rid = f"{w}-{k}"
            ok, why = False, None
            try:
                conn.request("GET", f"/?id={rid}")
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    why = f"status_{r.status}"
                elif body != f"id={rid}".encode():
                    why = "wrong_body"
                else:
                    ok = True
                if r.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                why = type(e).__name__
            if not ok:
                conn.close()
            t = time.time()
            ms = (time.monotonic() - due) * 1000.0
            with lock:
                lat.append((t, ms, ok, w))
                if why:
                    errors[why] = errors.get(why, 0) + 1

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(a.conns)]
    for t in threads:
        t.start()
    while time.time() < end and not (a.stop_file and os.path.exists(a.stop_file)):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(a.timeout + 2)
    with lock:
        all_ms = sorted(ms for _, ms, _, _ in lat)
        secs = {}
        for t, ms, ok, _ in lat:
            s = secs.setdefault(int(t), [[], 0])
            s[0].append(ms)
            if not ok:
                s[1] += 1

    def pct(v, p):
        return round(v[min(len(v) - 1, int(len(v) * p))], 3) if v else 0.0

    out = {
        "requests": len(lat),
        "ok": sum(1 for _, _, ok, _ in lat if ok),
        "failed": sum(1 for _, _, ok, _ in lat if not ok),
        "errors": errors,
        "connects": Counting.connects,
        "p50_ms": pct(all_ms, 0.50),
        "p99_ms": pct(all_ms, 0.99),
        "max_ms": round(all_ms[-1], 3) if all_ms else 0.0,
        "seconds": [
            {"t": t, "n": len(v), "p99_ms": pct(sorted(v), 0.99), "failed": f}
            for t, (v, f) in sorted(secs.items())
        ],
    }
    if a.samples:
        # One line per request: the unix ms it was due, its latency (ms from due), 1/0 and the
        # index of the connection it went on.
        with open(a.samples, "w") as f:
            for t, ms, ok, w in lat:
                f.write(f"{(t - ms / 1000.0) * 1000.0:.3f} {ms:.3f} {int(ok)} {w}\n")
    print(json.dumps(out), flush=True)


def read_response(f):
    status = f.readline()
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode().partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    return status.decode().strip(), f.read(length).decode()


def slow(a):
    host, port = a.url.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    f = s.makefile("rb")
    answers = []
    before = s.getsockname()[1]
    try:
        s.sendall(b"GET /?id=slow-1 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers.append(read_response(f))
        s.sendall(b"GET /?id=slow-2 HTTP/1.1\r\nHo")
        print(f"partial {before}", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        s.sendall(b"st: x\r\n\r\n")
        answers.append(read_response(f))
        s.sendall(b"GET /?id=slow-3 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers.append(read_response(f))
        ok = [b for _, b in answers] == ["id=slow-1", "id=slow-2", "id=slow-3"]
    except OSError as e:
        answers.append(("error", str(e)))
        ok = False
    print(json.dumps({"ok": ok, "answers": answers, "port_before": before, "port_after": s.getsockname()[1]}), flush=True)
    return 0


def one_conn(a, timeout=10):
    host, port = a.url.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, s.makefile("rb"), s.getsockname()[1]


def pipeline(a):
    s, f, before = one_conn(a)
    out = {"batches": 0, "requests": 0, "ok": 0, "failed": 0, "first_error": None, "port_before": before}
    end = time.time() + a.seconds
    k = 0
    while time.time() < end and not (a.stop_file and os.path.exists(a.stop_file)):
        ids = []
        reqs = b""
        for _ in range(a.depth):
            k += 1
            ids.append(f"p-{k}")
            reqs += f"GET /?id=p-{k}&delay={a.delay} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        try:
            s.sendall(reqs)
            out["requests"] += len(ids)
            for rid in ids:
                status, body = read_response(f)
                if not status.startswith("HTTP/1.1 200") or body != f"id={rid}":
                    raise ValueError(f"{rid}: got {status!r} {body!r}")
                out["ok"] += 1
        except (OSError, ValueError) as e:
            out["failed"] = out["requests"] - out["ok"]
            out["first_error"] = f"{type(e).__name__}: {e}"
            break
        out["batches"] += 1
        if out["batches"] == 1:
            print(f"running {before}", flush=True)
    try:
        out["port_after"] = s.getsockname()[1]
    except OSError:
        out["port_after"] = None
    print(json.dumps(out), flush=True)


def post(a):
    s, f, before = one_conn(a, timeout=30)
    size = int(a.mib * 1024 * 1024)
    chunk = 64 * 1024
    h = hashlib.sha256()
    out = {"ok": False, "port_before": before}
    t0 = time.monotonic()
    try:
        s.sendall(f"POST /?id=big HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        sent, i = 0, 0
        while sent < size:
            n = min(chunk, size - sent)
            block = hashlib.sha256(str(i).encode()).digest() * (n // 32 + 1)
            block = block[:n]
            h.update(block)
            s.sendall(block)
            sent += n
            i += 1
            if i == 1:
                print(f"sending {before}", flush=True)
            due = t0 + sent / (a.mibps * 1024 * 1024)
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
        status, body = read_response(f)
        out["server"] = body
        out["sha_match"] = f"sha256={h.hexdigest()} len={size}" in body
        out["len"] = size
        out["elapsed_ms"] = round((time.monotonic() - t0) * 1000)
        s.sendall(b"GET /?id=after HTTP/1.1\r\nHost: x\r\n\r\n")
        out["follow_up"] = read_response(f)
        out["ok"] = status.startswith("HTTP/1.1 200") and out["sha_match"] and out["follow_up"][1] == "id=after"
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    try:
        out["port_after"] = s.getsockname()[1]
    except OSError:
        out["port_after"] = None
    print(json.dumps(out), flush=True)


def delayed(a):
    s, f, before = one_conn(a, timeout=30)
    out = {"ok": False, "answers": [], "port_before": before}
    t0 = time.monotonic()
    try:
        s.sendall(f"GET /?id=d1&delay={a.delay} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        print(f"sent {before}", flush=True)
        out["answers"].append(read_response(f))
        out["elapsed_ms"] = round((time.monotonic() - t0) * 1000)
        s.sendall(b"GET /?id=d2 HTTP/1.1\r\nHost: x\r\n\r\n")
        out["answers"].append(read_response(f))
        out["ok"] = [b for _, b in out["answers"]] == ["id=d1", "id=d2"]
    except OSError as e:
        out["answers"].append(("error", f"{type(e).__name__}: {e}"))
    try:
        out["port_after"] = s.getsockname()[1]
    except OSError:
        out["port_after"] = None
    print(json.dumps(out), flush=True)


def get(a):
    host, port = a.url.rsplit(":", 1)
    out = {"ok": 0, "failed": 0, "errors": {}}
    for i in range(a.count):
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=1)
            conn.request("GET", f"/?id=g{i}")
            r = conn.getresponse()
            if r.status == 200 and r.read() == f"id=g{i}".encode():
                out["ok"] += 1
            else:
                raise http.client.HTTPException(f"status_{r.status}")
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            out["failed"] += 1
            why = type(e).__name__
            out["errors"][why] = out["errors"].get(why, 0) + 1
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=8080)
    l = sub.add_parser("load")
    l.add_argument("--url", required=True)
    l.add_argument("--conns", type=int, default=8)
    l.add_argument("--rate", type=float, default=50.0)
    l.add_argument("--duration", type=float, default=30.0)
    l.add_argument("--timeout", type=float, default=1.0)
    l.add_argument("--stop-file", default="")
    l.add_argument("--samples", default="", help="write every request's due time, latency and outcome here")
    w = sub.add_parser("slow")
    w.add_argument("--url", required=True)
    p = sub.add_parser("pipeline")
    p.add_argument("--url", required=True)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.02)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--stop-file", default="")
    b = sub.add_parser("post")
    b.add_argument("--url", required=True)
    b.add_argument("--mib", type=float, default=4.0)
    b.add_argument("--mibps", type=float, default=1.5)
    d = sub.add_parser("delayed")
    d.add_argument("--url", required=True)
    d.add_argument("--delay", type=float, default=2.0)
    g = sub.add_parser("get")
    g.add_argument("--url", required=True)
    g.add_argument("--count", type=int, default=10)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a)
    elif a.cmd == "slow":
        return slow(a)
    elif a.cmd == "pipeline":
        pipeline(a)
    elif a.cmd == "post":
        post(a)
    elif a.cmd == "delayed":
        delayed(a)
    elif a.cmd == "get":
        get(a)
    else:
        load(a)


if __name__ == "__main__":
    sys.exit(main())
