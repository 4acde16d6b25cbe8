#!/usr/bin/env python3
"""A stand-in for a third-party transparent proxy (Envoy, MOSN) behind sockmesh's capture.

Listens on 127.0.0.1:15001 (inside a pod's netns), accepts connections (one by default) and asks
the kernel for each one's original destination with getsockopt(SOL_IP, SO_ORIGINAL_DST), which
sockmesh's cgroup/getsockopt hook answers for captured connections. It also records
getsockopt(IPPROTO_TCP, TCP_INFO, 232) and getsockopt(SOL_SOCKET, SO_TYPE) to show options the hook
does not own are untouched. One JSON line per connection goes to stdout and back to the client,
then the connection closes.

Prints `listening 127.0.0.1:15001` once bound.
"""
import argparse
import errno
import json
import socket
import struct
import sys

SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)
TCP_INFO_LEN = 232


def outcome(fn):
    try:
        return {"ok": fn()}
    except OSError as e:
        return {"errno": errno.errorcode.get(e.errno, str(e.errno))}


def decode_sockaddr_in(raw):
    # struct sockaddr_in: sa_family (host order u16), sin_port (network order), sin_addr, zero[8]
    family = struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    ip = socket.inet_ntoa(raw[4:8])
    return family, f"{ip}:{port}"


def describe(conn):
    res = {}
    try:
        raw = conn.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
        family, addr = decode_sockaddr_in(raw)
        res["original_dst"] = addr
        res["original_dst_family"] = family
    except OSError as e:
        res["original_dst"] = None
        res["original_dst_errno"] = errno.errorcode.get(e.errno, str(e.errno))
    ti = outcome(lambda: len(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)))
    res["tcp_info_len"] = ti.get("ok")
    if "errno" in ti:
        res["tcp_info_errno"] = ti["errno"]
    st = outcome(lambda: conn.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
    res["so_type"] = st.get("ok")
    if "errno" in st:
        res["so_type_errno"] = st["errno"]
    res["peer"] = "%s:%d" % conn.getpeername()[:2]
    res["local"] = "%s:%d" % conn.getsockname()[:2]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=15001)
    ap.add_argument("--count", type=int, default=1, help="connections to accept before exiting")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each")
    a = ap.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.listen, a.port))
    srv.listen(64)
    srv.settimeout(a.timeout)
    print(f"listening {a.listen}:{a.port}", flush=True)
    for _ in range(a.count):
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            print(json.dumps({"error": "no connection within timeout"}), flush=True)
            return 2
        with conn:
            res = describe(conn)
            line = json.dumps(res, sort_keys=True)
            print(line, flush=True)
            try:
                conn.sendall(line.encode() + b"\n")
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
