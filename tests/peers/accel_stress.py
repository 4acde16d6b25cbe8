#!/usr/bin/env python3
"""Stress the accelerated (sk_msg) path with many concurrent flows that half-close at every
point: before the first byte, after small messages, right at and just over the size gate, after
crossing the per-flow byte budget, in the middle of a bulk stream of 64 KiB writes.

Each flow goes either to a `sink` (reads to EOF, then answers `bytes=<n> fnv1a64=<hex>`) or to an
`echo` server (echoes as it reads, then half-closes after our FIN). A flow passes when the answer
is byte-exact and EOF follows; it *stalls* when nothing more arrives for --stall-secs. Everything is
bounded by --seconds-limit. Prints one JSON summary; exit status 0 even with stalls (the caller
decides), 2 on usage errors.

usage: accel_stress.py --host H --sink-port P --echo-port Q --flows N --concurrency C
                       --max-msg BYTES --budget BYTES [--seed S] [--stall-secs T] [--seconds-limit L]
"""

import argparse
import asyncio
import json
import random
import sys
import time

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a64(h, data):
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


class Pattern:
    """Flow-specific bytes with period 251 (a byte from another flow or out of order shows),
    sliced from one buffer instead of materialising a whole stream."""

    def __init__(self, flow, longest):
        base = bytes(((flow * 7 + i) % 251) for i in range(251))
        self.buf = memoryview(base * (longest // 251 + 2))

    def at(self, off, n):
        s = off % 251
        return self.buf[s:s + n]


def plan(flow, rng, max_msg, budget):
    """A list of write sizes, then the half-close. Covers every interesting point."""
    kind = flow % 10
    if kind == 0:
        return "nothing", []  # half-close before any byte
    if kind == 1:
        return "one-small", [rng.choice([1, 17, 200, 1000])]
    if kind == 2:
        return "at-gate", [max_msg] * rng.randint(1, 3)
    if kind == 3:
        return "over-gate", [max_msg + 1]
    if kind == 4:
        # small messages, then one over the gate, then small again (already fell back)
        return "small-big-small", [300] * rng.randint(1, 5) + [64 * 1024] + [300] * rng.randint(0, 5)
    if kind == 5:
        # many gate-sized messages that cross the flow budget partway
        n = budget // max_msg + rng.randint(1, 4)
        return "cross-budget", [max_msg] * n
    if kind == 6:
        # bulk: 64 KiB writes, half-close somewhere in the middle of the stream
        return "bulk", [64 * 1024] * rng.randint(1, 48)
    if kind == 7:
        # exactly the budget, then half-close (the boundary itself)
        n = budget // max_msg
        return "exact-budget", [max_msg] * n
    if kind == 9:
        # a long bulk stream (what the benchmark's bulk client does), half-closed at its end
        return "long-bulk", [64 * 1024] * rng.randint(256, 1024)
    # many tiny messages
    return "tiny-many", [rng.randint(1, 64) for _ in range(rng.randint(10, 200))]


async def one_flow(args, flow, sem, results, t_end):
    rng = random.Random(args.seed * 1000003 + flow)
    name, sizes = plan(flow, rng, args.max_msg, args.budget)
    use_echo = flow % 2 == 1
    port = args.echo_port if use_echo else args.sink_port
    total = sum(sizes)
    rec = {"flow": flow, "plan": name, "to": "echo" if use_echo else "sink", "bytes": total, "writes": len(sizes)}
    async with sem:
        if time.monotonic() > t_end:
            rec["outcome"] = "skipped"
            results.append(rec)
            return
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(args.host, port), args.stall_secs)
        except Exception as e:  # noqa: BLE001
            rec["outcome"] = "connect-error"
            rec["error"] = repr(e)
            results.append(rec)
            return
        pat = Pattern(flow, max(sizes + [256 * 1024]))
        got = bytearray()  # the sink's answer
        echoed = [0, True]  # bytes echoed so far, all matched

        phase = ["writing"]
        progress = [time.monotonic()]  # last time either direction moved

        async def read_all():
            while True:
                try:
                    b = await asyncio.wait_for(reader.read(256 * 1024), 0.5)
                except asyncio.TimeoutError:
                    if time.monotonic() - progress[0] > args.stall_secs:
                        raise
                    continue
                progress[0] = time.monotonic()
                if not b:
                    return
                if use_echo:
                    if echoed[1] and pat.at(echoed[0], len(b)) != b:
                        echoed[1] = False
                    echoed[0] += len(b)
                else:
                    got.extend(b)

        rtask = asyncio.ensure_future(read_all())
        try:
            off = 0
            for n in sizes:
                writer.write(pat.at(off, n))
                off += n
                progress[0] = time.monotonic()
                # sometimes drain at once, sometimes let several writes pile up
                if rng.random() < 0.7:
                    await asyncio.wait_for(writer.drain(), args.stall_secs)
                if rng.random() < 0.05:
                    await asyncio.sleep(rng.random() * 0.01)
            await asyncio.wait_for(writer.drain(), args.stall_secs)
            phase[0] = "half-closed"
            writer.write_eof()
            await rtask
            phase[0] = "done"
        except asyncio.TimeoutError:
            rec["outcome"] = "stalled"
            rec["phase"] = phase[0]
            rec["received"] = echoed[0] if use_echo else len(got)
            rtask.cancel()
            writer.transport.abort()
            results.append(rec)
            return
        except Exception as e:  # noqa: BLE001
            rec["outcome"] = "error"
            rec["phase"] = phase[0]
            rec["error"] = repr(e)
            rec["received"] = echoed[0] if use_echo else len(got)
            rtask.cancel()
            writer.transport.abort()
            results.append(rec)
            return
        writer.close()
        if use_echo:
            ok = echoed[1] and echoed[0] == total
        else:
            # The hash in Python is slow: check it for streams up to 256 KiB, the count always
            # (the echo flows compare every byte).
            line = got.decode(errors="replace").strip()
            if total <= 256 * 1024:
                data = (pat.at(0, 251).tobytes() * (total // 251 + 1))[:total]
                ok = line == "bytes=%d fnv1a64=%016x" % (total, fnv1a64(FNV_OFFSET, data))
            else:
                ok = line.startswith("bytes=%d " % total)
        rec["outcome"] = "ok" if ok else "corrupt"
        if not ok:
            rec["received"] = echoed[0] if use_echo else len(got)
            rec["head"] = got[:80].decode(errors="replace")
        results.append(rec)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--sink-port", type=int, required=True)
    p.add_argument("--echo-port", type=int, required=True)
    p.add_argument("--flows", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-msg", type=int, default=16384)
    p.add_argument("--budget", type=int, default=16 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stall-secs", type=float, default=10.0)
    p.add_argument("--seconds-limit", type=float, default=60.0)
    args = p.parse_args()
    t0 = time.monotonic()
    t_end = t0 + args.seconds_limit
    sem = asyncio.Semaphore(args.concurrency)
    results = []
    await asyncio.gather(*(one_flow(args, i, sem, results, t_end) for i in range(args.flows)))
    by = {}
    for r in results:
        by[r["outcome"]] = by.get(r["outcome"], 0) + 1
    bad = [r for r in results if r["outcome"] not in ("ok", "skipped")]
    bad.sort(key=lambda r: r["flow"])
    print(json.dumps({
        "flows": args.flows,
        "outcomes": by,
        "secs": round(time.monotonic() - t0, 2),
        "bad": bad[:30],
        "bad_by_plan": {k: sum(1 for r in bad if r["plan"] == k) for k in sorted({r["plan"] for r in bad})},
    }))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(1)
