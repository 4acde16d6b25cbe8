#!/usr/bin/env python3
"""A successor that fails, for the sockmesh upgrade tests. `sockmesh upgrade --binary` runs it
(through a small shell wrapper that adds `--mode`) with the daemon's own arguments
(`run --config ... --state-file S ... --upgrade`).

  --mode exit           exits 3 at once (a binary that does not start)
  --mode wrong-version  finds the daemon through the lock file `S` with the extension `.lock`,
                        says hello with hand-off protocol 99, prints the answer, exits 1
  --mode vanish         says hello with the right protocol, takes the offered descriptors, then
                        exits without `Ready` (a successor that dies mid hand-off)
  --mode die-after-commit  the same, then says `Ready`, reads the `Commit` and exits without
                        `Started` (a successor that dies at the last step)

The hello is hand-encoded protobuf: Envelope{hello(1): Hello{protocol_version(1), pid(2)}},
behind a 4-byte big-endian length.
"""
import argparse
import json
import os
import socket
import struct
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def hello(version):
    inner = b"\x08" + varint(version) + b"\x10" + varint(os.getpid())
    env = b"\x0a" + varint(len(inner)) + inner
    return struct.pack(">I", len(env)) + env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--state-file", default="/run/sockmesh/state.json")
    a, _ = ap.parse_known_args()
    if a.mode == "exit":
        return 3
    lock = os.path.splitext(a.state_file)[0] + ".lock"
    info = json.load(open(lock))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(info["rendezvous"])
    version = 99 if a.mode == "wrong-version" else info["protocol_version"]
    s.sendall(hello(version))
    fds = []
    msg, fds, _, _ = socket.recv_fds(s, 1 << 20, 300)
    print(f"fake successor ({a.mode}): {len(msg)} bytes, {len(fds)} descriptors: {msg!r}", flush=True)
    if a.mode == "die-after-commit":
        # Envelope{ready(4): Ready{pid(1)}}
        inner = b"\x08" + varint(os.getpid())
        env = b"\x22" + varint(len(inner)) + inner
        s.sendall(struct.pack(">I", len(env)) + env)
        commit = s.recv(64)
        print(f"fake successor: got {commit!r}, dying before Started", flush=True)
        os._exit(9)
    for fd in fds:
        os.close(fd)
    return 1


if __name__ == "__main__":
    sys.exit(main())
