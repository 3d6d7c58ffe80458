#!/usr/bin/env python3
"""Soak: a steady login rate for a long time, RSS and descriptors sampled each minute.

    python3 tools/load/soak.py [--minutes 30] [--rate 20] [--idle 200] [--csv out.csv]

Each second ``--rate`` new clients log in, send NOOP, and LOGOUT (one in five instead
resets the connection after NOOP, one in five never logs in and times out); ``--idle``
sessions stay logged in for the whole run and send NOOP once a minute. Every minute it
prints (and writes to ``--csv``) the worker's RSS and open descriptors, the logins done
and failed, and the proxy's CPU. At the end the first and last third of the samples are
compared: "flat" means the mean RSS grew by less than 5 % and the median of the
descriptors by at most 2.
Exit status 1 on failures or growth. Loopback only; stops by itself.
"""
import argparse
import socket
import struct
import sys
import time

import gevent
from gevent.pool import Pool

from common import Proxy, Services, Session, cpu_seconds, open_fds, raise_nofile, rss_kb


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--minutes', type=float, default=30)
    ap.add_argument('--rate', type=int, default=20)
    ap.add_argument('--idle', type=int, default=200)
    ap.add_argument('--csv', default=None)
    args = ap.parse_args()
    raise_nofile()
    services = Services()
    proxy = Proxy(services, timeout='5s', level='info')
    stats = {'ok': 0, 'failed': 0, 'reset': 0, 'abandoned': 0}
    errors = []

    def client(i):
        kind = i % 5
        try:
            s = Session(proxy.port, timeout=15)
            try:
                if kind == 4:                       # never logs in: times out at 5 s
                    s.line()
                    gevent.sleep(6)
                    stats['abandoned'] += 1
                    return
                s.login(b'user%d' % i)
                s.noop()
                if kind == 3:
                    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack('ii', 1, 0))
                    stats['reset'] += 1
                else:
                    s.logout()
                    stats['ok'] += 1
            finally:
                s.close()
        except Exception as exc:                    # noqa: BLE001 (a report, not a test)
            stats['failed'] += 1
            if len(errors) < 20:
                errors.append(repr(exc))

    idle = []
    rows = []
    try:
        for i in range(args.idle):
            s = Session(proxy.port, timeout=30)
            s.login(b'idle%d' % i)
            idle.append(s)
        pool = Pool(5000)
        began = time.monotonic()
        end = began + args.minutes * 60
        next_sample = began
        i = 0
        cpu_last, t_last = cpu_seconds(proxy.pid), began
        print('minute,rss_kb,fds,ok,reset,abandoned,failed,cpu_percent', flush=True)
        while True:
            now = time.monotonic()
            if now >= next_sample:
                cpu = cpu_seconds(proxy.pid)
                row = (round((now - began) / 60), rss_kb(proxy.pid), open_fds(proxy.pid),
                       stats['ok'], stats['reset'], stats['abandoned'], stats['failed'],
                       round(100 * (cpu - cpu_last) / max(now - t_last, 1e-9)))
                cpu_last, t_last = cpu, now
                rows.append(row)
                print(','.join(str(x) for x in row), flush=True)
                for s in idle:
                    pool.spawn(lambda s=s: s.noop())
                next_sample += 60
            if now >= end:
                break
            for _ in range(args.rate):
                pool.spawn(client, i)
                i += 1
            gevent.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        pool.join(timeout=30)
        idle_ok = 0
        for s in idle:
            try:
                s.noop()
                idle_ok += 1
            except Exception as exc:                # noqa: BLE001
                errors.append('idle: %r' % exc)
        print('idle sessions still answering NOOP: %d of %d' % (idle_ok, len(idle)))
        third = max(1, len(rows) // 3)
        first, last = rows[1:1 + third] or rows[:1], rows[-third:]
        rss0 = sum(r[1] for r in first) / len(first)
        rss1 = sum(r[1] for r in last) / len(last)
        fds0 = sorted(r[2] for r in first)[len(first) // 2]    # medians: sessions in
        fds1 = sorted(r[2] for r in last)[len(last) // 2]       # flight move each sample
        flat = rss1 <= rss0 * 1.05 and fds1 <= fds0 + 2
        print('ran %.1f min; RSS %.0f -> %.0f kB (%+.1f%%), fds %d -> %d: %s' % (
            (time.monotonic() - began) / 60, rss0, rss1, 100 * (rss1 / rss0 - 1), fds0, fds1,
            'flat' if flat else 'GROWING'))
        print('proxy alive: %s; [alert]/[crit] lines: %d' % (
            proxy.alive(), sum(proxy.log_text().count(x) for x in ('[alert]', '[crit]'))))
        for e in errors[:10]:
            print('error:', e)
        if args.csv:
            with open(args.csv, 'w') as f:
                f.write('minute,rss_kb,fds,ok,reset,abandoned,failed,cpu_percent\n')
                for row in rows:
                    f.write(','.join(str(x) for x in row) + '\n')
        return 0 if flat and not stats['failed'] and idle_ok == len(idle) else 1
    finally:
        for s in idle:
            s.close()
        proxy.stop()
        services.stop()


if __name__ == '__main__':
    sys.exit(main())
