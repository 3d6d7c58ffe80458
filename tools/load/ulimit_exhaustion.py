#!/usr/bin/env python3
"""``ulimit -n`` exhaustion: a logged refusal, not a crash.

    python3 tools/load/ulimit_exhaustion.py [--nofile 64] [--clients 120]

Starts gmailproxy with a limit of ``--nofile`` open files, then

1. opens ``--clients`` connections that only read the greeting (the worker runs out of
   descriptors while accepting);
2. closes them and tries ``--clients // 2`` concurrent logins kept open (the auth
   service and backend connections need descriptors too);
3. closes everything and logs one client in normally.

Prints what the clients saw, the proxy's error log lines about the shortage (nginx
logs ``[crit] accept4() failed (24: Too many open files)``), anything on its stderr
(a traceback there means the error escaped our logging), and whether it is still
alive and serving. Exit status 1 if it died or does not serve afterwards.
Loopback only; stops by itself.
"""
import argparse
import collections
import re
import socket
import sys
import time

import gevent

from common import Proxy, Services, Session, open_fds, raise_nofile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--nofile', type=int, default=64)
    ap.add_argument('--clients', type=int, default=120)
    args = ap.parse_args()
    raise_nofile()
    services = Services()
    proxy = Proxy(services, nofile=args.nofile, connections=4096, timeout='20s')
    held, outcomes = [], collections.Counter()
    try:
        print('proxy pid %d, limit %d open files, %d open at rest' % (
            proxy.pid, args.nofile, open_fds(proxy.pid)))

        def greet(i):
            try:
                s = Session(proxy.port, timeout=3)
                held.append(s)
                s.line()
                outcomes['greeted'] += 1
            except (socket.timeout, TimeoutError):
                outcomes['no greeting within 3 s (left in the backlog)'] += 1
            except (OSError, EOFError) as exc:
                outcomes['greeting: %s' % type(exc).__name__] += 1
        gevent.joinall([gevent.spawn(greet, i) for i in range(args.clients)], timeout=10)
        print('phase 1, %d connections:' % args.clients, dict(outcomes))
        print('  proxy alive: %s, its open files: %d' % (proxy.alive(), open_fds(proxy.pid)))
        outcomes.clear()
        for s in held:
            s.close()
        held.clear()
        time.sleep(1)

        def login(i):
            try:
                s = Session(proxy.port, timeout=5)
                held.append(s)
                s.login(b'user%d' % i)
                outcomes['logged in'] += 1
            except (socket.timeout, TimeoutError):
                outcomes['timed out'] += 1
            except AssertionError as exc:
                outcomes['refused: %s' % str(exc)[:60]] += 1
            except (OSError, EOFError) as exc:
                outcomes['login: %s' % type(exc).__name__] += 1
        gevent.joinall([gevent.spawn(login, i) for i in range(args.clients // 2)], timeout=15)
        print('phase 2, %d concurrent logins held open:' % (args.clients // 2), dict(outcomes))
        print('  proxy alive: %s' % proxy.alive())
        for s in held:
            s.close()
        held.clear()
        time.sleep(2)
        ok = False
        try:
            s = Session(proxy.port, timeout=10)
            s.login()
            s.noop()
            s.logout()
            s.close()
            ok = True
        except Exception as exc:            # noqa: BLE001 (a report, not a test)
            print('phase 3 failed:', repr(exc))
        print('phase 3, after closing everything: login %s; proxy alive: %s; open files %d'
              % ('OK' if ok else 'FAILED', proxy.alive(), open_fds(proxy.pid)))
        log = proxy.log_text()
        lines = [l for l in log.splitlines()
                 if re.search(r'Too many open files|\[(crit|alert|emerg)\]|internal error', l)]
        print('error log lines about it: %d, e.g.:' % len(lines))
        seen = set()
        for line in lines:
            key = re.sub(r'^\S+ \S+ |\*\d+ |:\d+|client: \S+', '', line)[:90]
            if key not in seen:
                seen.add(key)
                print('   ', line[:220])
        err = proxy.stderr_text()
        print('stderr: %d bytes%s' % (len(err), (':\n' + err[-1500:]) if err else ''))
        return 0 if ok and proxy.alive() else 1
    finally:
        for s in held:
            s.close()
        proxy.stop()
        services.stop()


if __name__ == '__main__':
    sys.exit(main())
