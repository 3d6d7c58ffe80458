#!/usr/bin/env python3
"""10,000 concurrent logged-in idle IMAP sessions held by one gmailproxy worker.

    python3 tools/load/idle_sessions.py [--sessions 10000] [--hold 30] [--concurrency 200]

Logs ``--sessions`` clients in (at most ``--concurrency`` logins at a time), holds them
idle for ``--hold`` seconds, then sends NOOP on every one of them (each must be answered
by the backend through the proxy), and reports the worker's RSS and descriptors before,
with all sessions up, and after they closed, plus the memory per session. Exit status 1
if any session failed. Loopback only; stops by itself.
"""
import argparse
import sys
import time

from gevent.pool import Pool

from common import Proxy, Services, Session, open_fds, raise_nofile, rss_kb


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--sessions', type=int, default=10000)
    ap.add_argument('--hold', type=float, default=30)
    ap.add_argument('--concurrency', type=int, default=200)
    args = ap.parse_args()
    print('open files allowed here:', raise_nofile())
    services = Services()
    proxy = Proxy(services, level='notice')
    sessions, failures = [], []
    try:
        warm = Session(proxy.port)
        warm.login()
        warm.noop()
        warm.logout()
        warm.close()
        time.sleep(0.5)
        base = rss_kb(proxy.pid), open_fds(proxy.pid)
        print('worker pid %d at rest: RSS %d kB, %d fds' % ((proxy.pid,) + base))

        def one(i):
            try:
                s = Session(proxy.port)
                s.login(b'user%d' % i)
                sessions.append(s)
            except Exception as exc:            # noqa: BLE001 (a report, not a test)
                failures.append(('login', i, repr(exc)))

        began = time.monotonic()
        pool = Pool(args.concurrency)
        for i in range(args.sessions):
            pool.spawn(one, i)
        pool.join()
        took = time.monotonic() - began
        up = rss_kb(proxy.pid), open_fds(proxy.pid)
        print('%d sessions logged in in %.1f s (%.0f/s), %d failed' % (
            len(sessions), took, len(sessions) / took, len(failures)))
        print('all up: RSS %d kB, %d fds; per session %.1f kB, %.2f fds' % (
            up[0], up[1], (up[0] - base[0]) / max(len(sessions), 1),
            (up[1] - base[1]) / max(len(sessions), 1)))
        time.sleep(args.hold)
        print('after %.0f s idle: RSS %d kB, %d fds' % (args.hold, rss_kb(proxy.pid),
                                                        open_fds(proxy.pid)))

        def ping(s):
            try:
                s.noop()
            except Exception as exc:            # noqa: BLE001
                failures.append(('noop', repr(exc)))
        began = time.monotonic()
        pool = Pool(args.concurrency * 5)
        for s in sessions:
            pool.spawn(ping, s)
        pool.join()
        print('NOOP answered on %d of %d sessions in %.1f s' % (
            len(sessions) - sum(1 for f in failures if f[0] == 'noop'), len(sessions),
            time.monotonic() - began))
        for s in sessions:
            s.close()
        sessions.clear()
        deadline = time.monotonic() + 30
        while open_fds(proxy.pid) > base[1] + 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        after = rss_kb(proxy.pid), open_fds(proxy.pid)
        print('all closed: RSS %d kB, %d fds (at rest before: %d kB, %d fds)' % (
            after + base))
        print('proxy alive:', proxy.alive())
        log = proxy.log_text()
        for level in ('[alert]', '[crit]', '[emerg]'):
            print('%s lines in the log: %d' % (level, log.count(level)))
        for f in failures[:10]:
            print('failure:', f)
        return 1 if failures or not proxy.alive() else 0
    finally:
        for s in sessions:
            s.close()
        proxy.stop()
        services.stop()


if __name__ == '__main__':
    sys.exit(main())
