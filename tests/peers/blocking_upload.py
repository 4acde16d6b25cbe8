#!/usr/bin/env python3
"""Blocking-socket clients (one thread each, no socket time-out, like a plain threaded app): each
uploads --bytes in 64 KiB sendall() calls to a sink, half-closes, then reads the sink's answer with
blocking recv(). Prints one JSON summary: how many flows got the right answer, and how many saw a
blocking recv() fail with EAGAIN (BlockingIOError), which a blocking socket must never do.

usage: blocking_upload.py --host H --port P --flows N --threads T --bytes B --seconds-limit L
"""

import argparse
import json
import socket
import threading
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--flows", type=int, default=40)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--bytes", type=int, default=8 << 20)
    p.add_argument("--seconds-limit", type=float, default=60)
    p.add_argument("--pause-ms", type=float, default=0, help="sleep between the half-close and the read")
    a = p.parse_args()
    chunk = bytes(i % 251 for i in range(65536))
    lock = threading.Lock()
    res = {"ok": 0, "eagain": 0, "other": 0, "skipped": 0, "first_errors": []}
    next_flow = [0]
    end = time.monotonic() + a.seconds_limit

    def note(kind, err=None):
        with lock:
            res[kind] += 1
            if err and len(res["first_errors"]) < 5:
                res["first_errors"].append(err)

    def worker():
        while True:
            with lock:
                if next_flow[0] >= a.flows:
                    return
                next_flow[0] += 1
            if time.monotonic() > end:
                note("skipped")
                continue
            s = socket.create_connection((a.host, a.port))
            # Blocking, no time-out: a stuck flow is ended by the harness's time limit.
            s.settimeout(None)
            phase = "upload"
            try:
                sent = 0
                while sent < a.bytes:
                    n = min(len(chunk), a.bytes - sent)
                    s.sendall(chunk[:n])
                    sent += n
                s.shutdown(socket.SHUT_WR)
                if a.pause_ms:
                    time.sleep(a.pause_ms / 1000)
                phase = "read answer"
                reply = b""
                while True:
                    b = s.recv(4096)
                    if not b:
                        break
                    reply += b
                if reply.decode().startswith("bytes=%d " % a.bytes):
                    note("ok")
                else:
                    note("other", "bad answer %r" % reply[:80])
            except BlockingIOError as e:
                note("eagain", "%s: %r" % (phase, e))
            except OSError as e:
                note("other", "%s: %r" % (phase, e))
            finally:
                s.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.1, end + 5 - time.monotonic()))
    res["flows"] = a.flows
    print(json.dumps(res))


if __name__ == "__main__":
    main()
