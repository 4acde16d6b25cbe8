#!/usr/bin/env python3
"""gRPC endpoint and client for the sockmesh routing tests (grpcio, no generated code).

    grpc_peer.py serve --name v1 --port 50051
    grpc_peer.py call --target HOST:PORT --requests N --concurrency C
                      [--metadata k=v]... [--seconds-limit S]

`serve` registers a generic handler for `/sockmesh.test.Who/Name` that answers its name as raw
bytes, listens on 0.0.0.0:PORT (run it in a test netns), prints `listening 0.0.0.0:PORT`, and
counts calls and metadata `x-canary` values (written as a JSON line to stdout on exit).

`serve` also answers `/sockmesh.test.Who/Count` (server streaming): `<n>,<interval_ms>` in,
n messages `0`..`n-1` out, interval_ms apart.

    grpc_peer.py stream --target HOST:PORT --messages N --interval-ms I [--seconds-limit S]

makes one such call, prints `first` when the first message arrived and then
`{"received","in_order","status","elapsed_ms"}`; exits 0 only when all N arrived in order.

`call` makes N unary calls over ONE channel (one HTTP/2 connection) with at most C in flight,
each with the given metadata, and prints one JSON line:
`{"answered","errors","by_server":{"v1":..,"v2":..},"first_error","elapsed_ms"}`. It exits 0 only
when every call was answered within the time limit (default 60 s).
"""
import argparse
import json
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "sockmesh.test.Who"
METHOD = "Name"
PATH = f"/{SERVICE}/{METHOD}"
STREAM_METHOD = "Count"
STREAM_PATH = f"/{SERVICE}/{STREAM_METHOD}"


def serve(a):
    lock = threading.Lock()
    stats = {"name": a.name, "requests": 0, "by_header": {}}

    def name(request, context):
        canary = dict(context.invocation_metadata()).get("x-canary")
        with lock:
            stats["requests"] += 1
            if canary is not None:
                stats["by_header"][canary] = stats["by_header"].get(canary, 0) + 1
        return a.name.encode()

    def count(request, context):
        # Server streaming: request b"<n>,<interval_ms>" -> messages b"0", b"1", ... b"<n-1>".
        n, interval = (int(x) for x in request.decode().split(","))
        for i in range(n):
            if i:
                time.sleep(interval / 1000.0)
            yield str(i).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(name),
            STREAM_METHOD: grpc.unary_stream_rpc_method_handler(count),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1000)],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"0.0.0.0:{a.port}")
    if port == 0:
        print(f"cannot listen on 0.0.0.0:{a.port}", file=sys.stderr)
        return 1
    server.start()
    print(f"listening 0.0.0.0:{port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1)
    with lock:
        print(json.dumps(stats), flush=True)
    return 0


def call(a):
    metadata = []
    for kv in a.metadata:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            print(f"--metadata k=v, not {kv}", file=sys.stderr)
            return 64
        metadata.append((key.lower(), value))
    start = time.monotonic()
    deadline = start + a.seconds_limit
    result = {"answered": 0, "errors": 0, "by_server": {}, "first_error": None, "elapsed_ms": 0}
    lock = threading.Lock()
    window = threading.Semaphore(a.concurrency)
    all_done = threading.Event()
    finished = [0]

    def on_done(fut):
        with lock:
            try:
                name = fut.result().decode()
                result["answered"] += 1
                result["by_server"][name] = result["by_server"].get(name, 0) + 1
            except grpc.RpcError as e:
                result["errors"] += 1
                if result["first_error"] is None:
                    result["first_error"] = f"{e.code()}: {e.details()}"
            finished[0] += 1
            if finished[0] == a.requests:
                all_done.set()
        window.release()

    with grpc.insecure_channel(a.target) as channel:
        stub = channel.unary_unary(PATH)
        timed_out = False
        for _ in range(a.requests):
            if not window.acquire(timeout=max(0.0, deadline - time.monotonic())):
                timed_out = True
                break
            fut = stub.future(b"who", timeout=10, metadata=metadata or None)
            fut.add_done_callback(on_done)
        if not timed_out:
            timed_out = not all_done.wait(timeout=max(0.0, deadline - time.monotonic()))
        with lock:
            if timed_out and result["first_error"] is None:
                result["first_error"] = f"time limit of {a.seconds_limit} s reached"
            result["elapsed_ms"] = int((time.monotonic() - start) * 1000)
            print(json.dumps(result), flush=True)
            ok = not timed_out and result["errors"] == 0 and result["answered"] == a.requests
    return 0 if ok else 1


def stream(a):
    """One server-streaming call of `messages` messages `interval_ms` apart; prints `first`
    once the first message arrived, then {"received","in_order","status","elapsed_ms"}."""
    start = time.monotonic()
    out = {"received": 0, "in_order": True, "status": None, "elapsed_ms": 0}
    with grpc.insecure_channel(a.target) as channel:
        call = channel.unary_stream(STREAM_PATH)(
            f"{a.messages},{a.interval_ms}".encode(), timeout=a.seconds_limit
        )
        try:
            for i, m in enumerate(call):
                if m != str(i).encode():
                    out["in_order"] = False
                out["received"] += 1
                if i == 0:
                    print("first", flush=True)
            out["status"] = str(call.code())
        except grpc.RpcError as e:
            out["status"] = f"{e.code()}: {e.details()}"
    out["elapsed_ms"] = int((time.monotonic() - start) * 1000)
    print(json.dumps(out), flush=True)
    return 0 if out["received"] == a.messages and out["in_order"] else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=50051)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--requests", type=int, default=1)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--metadata", action="append", default=[])
    c.add_argument("--seconds-limit", type=float, default=60.0)
    t = sub.add_parser("stream")
    t.add_argument("--target", required=True)
    t.add_argument("--messages", type=int, default=40)
    t.add_argument("--interval-ms", type=int, default=100)
    t.add_argument("--seconds-limit", type=float, default=60.0)
    a = ap.parse_args()
    if a.cmd == "stream":
        return stream(a)
    return serve(a) if a.cmd == "serve" else call(a)


if __name__ == "__main__":
    sys.exit(main())
