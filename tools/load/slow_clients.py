#!/usr/bin/env python3
"""2,000 slow clients sending a byte a second must not delay a normal client's login.

    python3 tools/load/slow_clients.py [--slow 2000] [--duration 60] [--limit 1.0]

Opens ``--slow`` connections that dribble ``a1 LOGIN slow secret\\r\\n`` one byte per
second each (spread over the second, so the worker sees ~2,000 reads a second), then,
during ``--duration`` seconds, logs a normal client in (greeting, LOGIN, NOOP, LOGOUT)
twice a second and records how long each login took (connect to the tagged OK). Reports
the distribution; exit status 1 if any normal login took longer than ``--limit`` seconds
or failed. The proxy's ``timeout`` is 60s, so the slow clients stay in their dialogue for
the whole run. Loopback only; stops by itself.
"""
import argparse
import random
import sys
import time

import gevent

from common import Proxy, Services, Session, cpu_seconds, open_fds, raise_nofile, rss_kb

LINE = b'a1 LOGIN slow secret\r\n'


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--slow', type=int, default=2000)
    ap.add_argument('--duration', type=float, default=60)
    ap.add_argument('--limit', type=float, default=1.0)
    args = ap.parse_args()
    raise_nofile()
    services = Services()
    proxy = Proxy(services, timeout='%ds' % int(args.duration + 30), level='notice')
    stop = [False]
    sent = [0]
    dropped = []

    def slow(i):
        try:
            s = Session(proxy.port, timeout=args.duration + 60)
        except OSError as exc:
            dropped.append(repr(exc))
            return
        try:
            s.line()                            # the greeting
            gevent.sleep(random.random())       # spread the bytes over the second
            pos = 0
            while not stop[0]:
                s.sock.sendall(LINE[pos % (len(LINE) - 2):][:1])   # never completes
                sent[0] += 1
                pos += 1
                gevent.sleep(1.0)
        except (OSError, EOFError) as exc:
            dropped.append(repr(exc))
        finally:
            s.close()

    try:
        began = time.monotonic()
        workers = []
        for i in range(args.slow):
            workers.append(gevent.spawn(slow, i))
            if i % 100 == 99:
                gevent.sleep(0.05)
        gevent.sleep(2)
        print('%d slow clients connected in %.1f s; proxy %d fds, RSS %d kB' % (
            args.slow, time.monotonic() - began, open_fds(proxy.pid), rss_kb(proxy.pid)))
        timings, failures = [], []
        cpu0, t0, sent0 = cpu_seconds(proxy.pid), time.monotonic(), sent[0]
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                s = Session(proxy.port, timeout=10)
                s.login()
                timings.append(time.monotonic() - start)
                s.noop()
                s.logout()
                s.close()
            except Exception as exc:            # noqa: BLE001 (a report, not a test)
                failures.append(repr(exc))
            gevent.sleep(max(0.0, 0.5 - (time.monotonic() - start)))
        cpu = (cpu_seconds(proxy.pid) - cpu0) / (time.monotonic() - t0)
        rate = (sent[0] - sent0) / (time.monotonic() - t0)
        stop[0] = True
        gevent.joinall(workers, timeout=5)
        timings.sort()
        n = len(timings)
        print('slow bytes received by the proxy: %.0f/s; proxy CPU %.0f%% of a core' % (
            rate, cpu * 100))
        if n:
            print('normal logins: %d, failed %d; login time min %.3f median %.3f p95 %.3f '
                  'p99 %.3f max %.3f s' % (n, len(failures), timings[0], timings[n // 2],
                                           timings[int(n * 0.95)], timings[int(n * 0.99)],
                                           timings[-1]))
        print('slow clients dropped by the proxy during the run: %d' % len(dropped))
        print('proxy alive: %s; [alert]/[crit] lines: %d' % (
            proxy.alive(), sum(proxy.log_text().count(x) for x in ('[alert]', '[crit]'))))
        for f in failures[:5]:
            print('failure:', f)
        slow_logins = [t for t in timings if t > args.limit]
        return 1 if failures or slow_logins or not n else 0
    finally:
        stop[0] = True
        proxy.stop()
        services.stop()


if __name__ == '__main__':
    sys.exit(main())
