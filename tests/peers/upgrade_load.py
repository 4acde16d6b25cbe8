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

  upgrade_load.py slow --url 10.96.0.10:8080
      A slow client on one connection: sends a whole request and reads its answer, then the
      first half of a second request's head and prints `partial <local port>`; on a `go` line
      from stdin sends the rest, reads the answer, sends a third request, and prints
      {"ok": bool, "answers": [...], "port_before", "port_after"} (the same connection
      throughout, unless it failed).
"""
import argparse
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
        body = ("id=" + q.get("id", [""])[0]).encode()
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
    lat = []  # (finish unix time, latency ms, ok)
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
                lat.append((t, ms, ok))
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
        all_ms = sorted(ms for _, ms, _ in lat)
        secs = {}
        for t, ms, ok in lat:
            s = secs.setdefault(int(t), [[], 0])
            s[0].append(ms)
            if not ok:
                s[1] += 1

    def pct(v, p):
        return round(v[min(len(v) - 1, int(len(v) * p))], 3) if v else 0.0

    out = {
        "requests": len(lat),
        "ok": sum(1 for _, _, ok in lat if ok),
        "failed": sum(1 for _, _, ok in lat if not ok),
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
    w = sub.add_parser("slow")
    w.add_argument("--url", required=True)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a)
    elif a.cmd == "slow":
        return slow(a)
    else:
        load(a)


if __name__ == "__main__":
    sys.exit(main())
