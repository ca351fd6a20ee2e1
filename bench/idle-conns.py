#!/usr/bin/env python3
"""Per-connection memory of the gateway: open N TLS keep-alive connections, send one
proxied GET on each (so every connection has served a request, like a real keep-alive),
hold them all idle, and report the gateway's RSS before and after.

    bench/idle-conns.py --pid PID --port 18443 --conns 10000 [--h2]

Not a test: numbers only (bench/idle-rss.sh starts the gateway and calls this).
"""
import argparse
import asyncio
import ssl
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def one(port, ctx, h2, held, failures, sem):
    async with sem:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            if h2:
                # The smallest valid HTTP/2 exchange is not worth hand-rolling here:
                # an h2 connection that negotiated ALPN and sent its preface and
                # SETTINGS is what an idle browser connection looks like.
                writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                await writer.drain()
                await reader.read(9)
            else:
                writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head[:40])
            held.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - counted and reported
            failures.append(repr(e))


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--h2", action="store_true")
    p.add_argument("--hold", type=float, default=3.0, help="seconds to hold before reading RSS")
    a = p.parse_args()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"] if a.h2 else ["http/1.1"])
    before = rss_kib(a.pid)
    held, failures = [], []
    sem = asyncio.Semaphore(200)
    t0 = time.monotonic()
    await asyncio.gather(*(one(a.port, ctx, a.h2, held, failures, sem) for _ in range(a.conns)))
    opened = time.monotonic() - t0
    await asyncio.sleep(a.hold)
    after = rss_kib(a.pid)
    per = (after - before) / max(len(held), 1)
    print(
        f"conns={len(held)} failed={len(failures)} h2={a.h2} open_s={opened:.1f} "
        f"rss_before_kib={before} rss_after_kib={after} "
        f"rss_after_mib={after / 1024:.1f} per_conn_kib={per:.2f}"
    )
    if failures:
        print("first failures:", failures[:3], file=sys.stderr)
    for _, w in held:
        w.close()


asyncio.run(main())
