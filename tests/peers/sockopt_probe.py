#!/usr/bin/env python3
"""Records how getsockopt behaves on an ordinary connected TCP socket.

A test runs this once with no sockmesh hook attached and once with the hooks attached, and
compares: a cgroup/getsockopt hook must leave every option it does not own untouched, including
buffers larger than a page (the kernel only shows the first page to the program).

Probes (each records {"len": n} or {"errno": "E..."}):
  tcp_info_104          getsockopt(IPPROTO_TCP, TCP_INFO, 104)
  tcp_info_8192         getsockopt(IPPROTO_TCP, TCP_INFO, 8192)   (> PAGE_SIZE)
  tcp_congestion_5000   getsockopt(IPPROTO_TCP, TCP_CONGESTION, 5000), plus the name
  so_type               getsockopt(SOL_SOCKET, SO_TYPE)
  so_original_dst       getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)    (expect an errno when not captured)

Usage: sockopt_probe.py --connect IP:PORT   (prints one JSON object)
"""
import argparse
import ctypes
import errno
import json
import socket
import struct
import sys

SO_ORIGINAL_DST = 80
SOL_IP = getattr(socket, "SOL_IP", 0)

# Python's socket.getsockopt refuses buflen > 1024, so call libc directly: the point is to hand
# the kernel (and the hook) exactly the buffer length under test.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_libc.getsockopt.restype = ctypes.c_int


def raw_getsockopt(sock, level, name, buflen):
    """Returns the bytes the kernel wrote (optlen after the call), or raises OSError."""
    buf = ctypes.create_string_buffer(buflen)
    optlen = ctypes.c_uint32(buflen)
    rc = _libc.getsockopt(sock.fileno(), level, name, buf, ctypes.byref(optlen))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, errno.errorcode.get(e, str(e)))
    return buf.raw[: optlen.value]


def probe(fn):
    try:
        v = fn()
    except OSError as e:
        return {"errno": errno.errorcode.get(e.errno, str(e.errno))}
    if isinstance(v, bytes):
        return {"len": len(v)}
    return {"value": v}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connect", required=True)
    ap.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args()
    host, port = a.connect.rsplit(":", 1)
    s = socket.create_connection((host.strip("[]"), int(port)), timeout=a.timeout)
    tcp = socket.IPPROTO_TCP
    opts = {
        "tcp_info_104": probe(lambda: raw_getsockopt(s, tcp, socket.TCP_INFO, 104)),
        "tcp_info_8192": probe(lambda: raw_getsockopt(s, tcp, socket.TCP_INFO, 8192)),
        "so_type": probe(lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)),
        "so_original_dst": probe(lambda: raw_getsockopt(s, SOL_IP, SO_ORIGINAL_DST, 16)),
    }
    cong = probe(lambda: raw_getsockopt(s, tcp, socket.TCP_CONGESTION, 5000))
    if "len" in cong:
        raw = raw_getsockopt(s, tcp, socket.TCP_CONGESTION, 5000)
        cong["name"] = raw.split(b"\0", 1)[0].decode(errors="replace")
    opts["tcp_congestion_5000"] = cong
    if "len" in opts["so_original_dst"]:
        raw = raw_getsockopt(s, SOL_IP, SO_ORIGINAL_DST, 16)
        port_ = struct.unpack_from("!H", raw, 2)[0]
        opts["so_original_dst"]["addr"] = f"{socket.inet_ntoa(raw[4:8])}:{port_}"
    out = {
        "options": opts,
        "peer": "%s:%d" % s.getpeername()[:2],
        "local": "%s:%d" % s.getsockname()[:2],
    }
    s.close()
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
