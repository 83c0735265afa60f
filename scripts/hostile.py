#!/usr/bin/env python3
"""Hostile load against a running estafeta, and a normal client's service during it.

    scripts/hostile.py --port 2525 [--host 127.0.0.1] [--seconds 60] [--connections 1000]
                       [--pid PID] [--to bob@example.test] [--kinds garbage,half,...]

Opens --connections connections from 127.0.0.2 .. 127.0.0.254 (so that the per-address caps
do not refuse the normal client on 127.0.0.1), each doing one of: garbage lines, half a
command held open, one byte every 5 s (slowloris), STARTTLS then garbage instead of a TLS
handshake, AUTH with wrong credentials again and again, thousands of RCPTs; and, for memory (--kinds), a command line that never ends (64 KiB writes, no LF), a
BDAT chunk declared at 2 GB, a message whose header is one line of 1,000,000 octets, a header of
80,000 short fields (both just under the 1 MiB header limit), MIME nested 5,000 deep. Each reconnects
when the server closes it, until --seconds have passed. Meanwhile a normal client on 127.0.0.1
sends one message every 0.5 s and its latency (connect to 250 after the data) is measured;
the server's RSS (--pid) is sampled every second. Prints the figures. Loopback only.
"""
import argparse
import asyncio
import base64
import multiprocessing
import os
import random
import time


async def hostile(host, port, source, kind, deadline, stats):
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(source, 0)), 5)
        except Exception:
            stats["refused"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["connections"] += 1
        try:
            await asyncio.wait_for(reader.readline(), 10)
            if kind == "garbage":
                while time.monotonic() < deadline:
                    writer.write(os.urandom(random.randint(1, 200)) + b"\r\n")
                    await writer.drain()
                    if not await asyncio.wait_for(reader.readline(), 10):
                        break
            elif kind == "half":
                writer.write(b"MAIL FR")
                await writer.drain()
                await asyncio.wait_for(reader.read(100), max(0.1, deadline - time.monotonic()))
            elif kind == "slowloris":
                for b in b"EHLO slow.example\r\n" * 100:
                    if time.monotonic() > deadline:
                        break
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(5)
            elif kind == "tls":
                writer.write(b"EHLO x\r\nSTARTTLS\r\n")
                await writer.drain()
                writer.write(os.urandom(2000))
                await writer.drain()
                await asyncio.wait_for(reader.read(100), 10)
            elif kind == "auth":
                writer.write(b"EHLO brute.example\r\n")
                await writer.drain()
                while time.monotonic() < deadline:
                    cred = base64.b64encode(b"\0alice@example.test\0guess%d" % random.randint(0, 10**9))
                    writer.write(b"AUTH PLAIN " + cred + b"\r\n")
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), 15)
                    if not line or line.startswith(b"421"):
                        break
            elif kind == "longline":
                writer.write(b"EHLO long.example\r\nMAIL FROM:<")
                while time.monotonic() < deadline:
                    writer.write(b"x" * 65536)
                    await writer.drain()
                    await asyncio.sleep(0.05)
            elif kind == "bigbdat":
                writer.write(b"EHLO big.example\r\nMAIL FROM:<x@example.net>\r\n"
                             b"RCPT TO:<bob@example.test>\r\nBDAT 2000000000 LAST\r\n")
                while time.monotonic() < deadline:
                    writer.write(b"y" * 65536)
                    await writer.drain()
                    await asyncio.sleep(0.05)
            elif kind in ("bigheader", "manyheaders", "deepmime"):
                if kind == "bigheader":
                    msg = b"Subject: " + b"z" * 1000000 + b"\r\n\r\nbody\r\n"
                elif kind == "manyheaders":
                    msg = b"".join(b"X-H%d: v\r\n" % i for i in range(80000)) + b"\r\nbody\r\n"
                else:
                    depth = 5000
                    msg = b"MIME-Version: 1.0\r\n" + b"".join(
                        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                        for i in range(depth)) + b"\r\nx\r\n" + b"".join(
                        b"--b%d--\r\n" % i for i in reversed(range(depth)))
                writer.write(b"EHLO hdr.example\r\nMAIL FROM:<x@example.net>\r\n"
                             b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
                await writer.drain()
                writer.write(msg + b".\r\n")
                await writer.drain()
                while time.monotonic() < deadline:
                    line = await asyncio.wait_for(reader.readline(), 30)
                    if not line or line.startswith(b"250 2.0.0") or line.startswith(b"4") or line.startswith(b"5"):
                        break
            elif kind == "rcpts":
                writer.write(b"EHLO many.example\r\nMAIL FROM:<x@example.net>\r\n")
                await writer.drain()
                for i in range(5000):
                    if time.monotonic() > deadline:
                        break
                    writer.write(b"RCPT TO:<nobody%d@example.test>\r\n" % i)
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), 15)
                    if not line or line.startswith(b"421"):
                        break
        except Exception:
            pass
        finally:
            writer.close()
            stats["closed"] += 1


async def normal(host, port, to, deadline, latencies, failures):
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=("127.0.0.1", 0)), 10)

            async def cmd(line):
                writer.write(line)
                await writer.drain()
                while True:
                    l = await asyncio.wait_for(reader.readline(), 30)
                    if len(l) < 4 or l[3:4] != b"-":
                        return l

            await asyncio.wait_for(reader.readline(), 30)
            await cmd(b"EHLO normal.example\r\n")
            await cmd(b"MAIL FROM:<normal@example.test>\r\n")
            await cmd(b"RCPT TO:<%s>\r\n" % to.encode())
            await cmd(b"DATA\r\n")
            r = await cmd(b"Subject: normal\r\n\r\nhello\r\n.\r\n")
            await cmd(b"QUIT\r\n")
            writer.close()
            if r.startswith(b"250"):
                latencies.append(time.monotonic() - start)
            else:
                failures.append(r.decode("latin-1").strip())
        except Exception as e:
            failures.append(repr(e))
        await asyncio.sleep(0.5)


def normal_process(host, port, to, seconds, results):
    latencies, failures = [], []
    asyncio.run(normal(host, port, to, time.monotonic() + seconds, latencies, failures))
    results.put((latencies, failures))


async def rss(pid, deadline, samples):
    while pid and time.monotonic() < deadline:
        try:
            with open("/proc/%d/status" % pid) as f:
                for l in f:
                    if l.startswith("VmRSS:"):
                        samples.append(int(l.split()[1]))
        except OSError:
            pass
        await asyncio.sleep(1)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--to", default="bob@example.test")
    p.add_argument("--kinds", default="garbage,half,slowloris,tls,auth,rcpts",
                   help="comma-separated; also longline, bigbdat, bigheader, manyheaders, deepmime")
    a = p.parse_args()
    kinds = a.kinds.split(",")
    stats = {"connections": 0, "refused": 0, "closed": 0}
    latencies, failures, samples = [], [], []
    # The normal client alone first: its usual latency.
    before = []
    await normal(a.host, a.port, a.to, time.monotonic() + 5, before, failures)
    deadline = time.monotonic() + a.seconds
    # The normal client during the attack runs in a process of its own: measured in the same
    # event loop as 1,000 hostile tasks, it would measure that loop, not the server.
    results = multiprocessing.Queue()
    during = multiprocessing.Process(target=normal_process, args=(a.host, a.port, a.to, a.seconds, results))
    during.start()
    tasks = [hostile(a.host, a.port, "127.0.0.%d" % (2 + i % 253), kinds[i % len(kinds)], deadline, stats)
             for i in range(a.connections)]
    tasks.append(rss(a.pid, deadline, samples))
    await asyncio.gather(*tasks)
    latencies, more_failures = results.get()
    failures += more_failures
    during.join()
    after = []
    await normal(a.host, a.port, a.to, time.monotonic() + 5, after, failures)

    def q(xs, f):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(f * len(xs)))] * 1000 if xs else float("nan")

    print("hostile: %d connections opened (%d refused at connect) over %.0f s, %d kinds" % (
        stats["connections"], stats["refused"], a.seconds, len(kinds)))
    print("normal client before: %d messages, p50 %.1f ms, max %.1f ms" % (len(before), q(before, .5), q(before, 1)))
    print("normal client during: %d messages, p50 %.1f ms, p99 %.1f ms, max %.1f ms, %d failures" % (
        len(latencies), q(latencies, .5), q(latencies, .99), q(latencies, 1), len(failures)))
    print("normal client after:  %d messages, p50 %.1f ms" % (len(after), q(after, .5)))
    if samples:
        print("server RSS: %d KiB at start, %d KiB at most, %d KiB at the end" % (samples[0], max(samples), samples[-1]))
    for f in failures[:5]:
        print("failure:", f)


if __name__ == "__main__":
    asyncio.run(main())
