"""Reload (HUP) without dropping anyone: nginx's zero-downtime reconfiguration (issue 4).

gmailproxy (2 workers) runs as a subprocess; the IMAP clients, the auth service and the
backend run as greenlets in this process.
"""
import functools
import imaplib
import re
import signal
import socket
import time

import gevent
import gevent.event
import gevent.pool
import pytest

from tests.support.clients import imap_capabilities, imap_login
from tests.support.fake_backend import FakeBackend
from tests.support.net import free_ports, port_open
from tests.support.procs import children, two_workers, wait_for

PASSWORD = 'Rl-pa55-Vq2'
HELD = 200                  # sessions open across the reload
CHURNERS = 8                # greenlets logging in and out all along
CONF = '''worker_processes 2;
events { worker_connections 1024; }
mail {
    auth_http %(auth)s;
    timeout 10s;
    imap_capabilities IMAP4rev1 %(mark)s;
    server {
        listen 127.0.0.1:%(port)d;
        protocol imap;
    }
    %(extra)s
}
'''


def conf(auth, port, mark, extra=''):
    return CONF % dict(auth=auth.url, port=port, mark=mark, extra=extra)


def second_server(port):
    return 'server { listen 127.0.0.1:%d; protocol imap; }' % port


@pytest.fixture
def backend():
    b = FakeBackend('imap')
    yield b
    b.stop()


@pytest.fixture
def users(auth, backend):
    auth.users = {'u%d' % i: {'password': PASSWORD} for i in range(HELD + CHURNERS)}
    auth.ports = {'imap': backend.port}
    return auth


login = functools.partial(imap_login, password=PASSWORD)
def test_reload_under_load_drops_nobody(gmailproxy, users):
    port, port2 = free_ports(2)
    proxy = gmailproxy(conf(users, port, 'XGEN1'), ports=[port])
    old_workers = two_workers(proxy.pid)

    held = [None] * HELD

    def hold(i):
        held[i] = login(port, 'u%d' % i, timeout=20)
    # 20 at a time: the auth server's listen backlog is socketserver's 5
    pool = gevent.pool.Pool(20)
    jobs = [pool.spawn(hold, i) for i in range(HELD)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    assert all(imap is not None and 'XGEN1' in imap.capabilities for imap in held)

    results = []            # (started, ok, capabilities or error)
    stop = gevent.event.Event()

    def churn(user):
        while not stop.is_set():
            started = time.monotonic()
            try:
                imap = imaplib.IMAP4('127.0.0.1', port, timeout=10)
                caps = imap.capabilities
                imap.login(user, PASSWORD)
                assert imap.noop()[0] == 'OK'
                imap.logout()
                results.append((started, True, caps))
            except Exception as e:      # counted, reported below
                results.append((started, False, repr(e)))
    churners = [gevent.spawn(churn, 'u%d' % (HELD + i)) for i in range(CHURNERS)]
    gevent.sleep(0.5)
    hup = time.monotonic()
    proxy.write_conf(conf(users, port, 'XGEN2', second_server(port2)))
    proxy.signal(signal.SIGHUP)
    # the old workers have stopped accepting once both said so
    wait_for(lambda: proxy.log_text().count('gracefully shutting down') == 2,
             what='the old workers to stop accepting')
    switched = time.monotonic()
    gevent.sleep(1.0)
    stop.set()
    gevent.joinall(churners, timeout=20, raise_error=True)

    failed = [r for r in results if not r[1]]
    assert not failed, '%d of %d logins failed: %s' % (len(failed), len(results),
                                                        failed[:5])
    before = [r for r in results if r[0] < hup]
    after = [r for r in results if r[0] > switched]
    assert before and after, (len(before), len(after))
    assert all('XGEN1' in r[2] for r in before)
    assert all('XGEN2' in r[2] and 'XGEN1' not in r[2] for r in after)
    login(port2, 'u0').logout()         # the new configuration's new address

    # every session opened before the reload still works, served by the old workers
    new_workers = [w for w in children(proxy.pid) if w not in old_workers]
    assert len(new_workers) == 2
    assert all(w in children(proxy.pid) for w in old_workers)

    def finish(imap):
        assert imap.noop()[0] == 'OK'
        assert imap.logout()[0] == 'BYE'
    pool = gevent.pool.Pool(20)
    gevent.joinall([pool.spawn(finish, imap) for imap in held], timeout=60,
                   raise_error=True)
    for w in old_workers:
        proxy.wait_log('worker process %d exited with code 0' % w, timeout=10)
    assert children(proxy.pid) == sorted(new_workers)
    log = proxy.log_text()
    assert log.count('proxied session done') == HELD + len(results) + 1
    assert '[error]' not in log and '[alert]' not in log and '[emerg]' not in log
    assert PASSWORD not in log + proxy.stderr_text()


def test_reload_with_broken_file_keeps_old_configuration(gmailproxy, users):
    port, port2 = free_ports(2)
    proxy = gmailproxy(conf(users, port, 'XGEN1'), ports=[port])
    workers = two_workers(proxy.pid)

    # a syntax error: logged with file:line, nothing changes
    text = conf(users, port, 'XGEN2').replace('    timeout 10s;', '    timeout 10s;\n'
                                                                  '    bogus_directive on;')
    proxy.write_conf(text)
    line = proxy.conf.read_text().splitlines().index('    bogus_directive on;') + 1
    proxy.signal(signal.SIGHUP)
    log = proxy.wait_log('[emerg]')
    assert re.search(r'^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[emerg\] %d#%d: unknown directive '
                     r'"bogus_directive" in %s:%d$' % (proxy.pid, proxy.pid,
                                                       re.escape(str(proxy.conf)), line),
                     log, re.M), log
    assert 'XGEN1' in imap_capabilities(port)
    login(port, 'u1').logout()

    # a new address that cannot be bound: logged, nothing changes either
    busy = socket.socket()
    busy.bind(('127.0.0.1', port2))
    busy.listen(1)
    proxy.write_conf(conf(users, port, 'XGEN2', second_server(port2)))
    start = len(proxy.log_text())
    proxy.signal(signal.SIGHUP)
    log = proxy.wait_log('[emerg]', start=start)
    assert re.search(r'\[emerg\] %d#%d: bind\(\) to 127\.0\.0\.1:%d failed \(98: Address '
                     r'already in use\)$' % (proxy.pid, proxy.pid, port2), log, re.M), log
    busy.close()
    gevent.sleep(0.3)
    assert children(proxy.pid) == workers
    assert 'XGEN1' in imap_capabilities(port)
    assert 'start worker processes' not in log[start:]

    # fixed: the reload goes through
    start = len(proxy.log_text())
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('start worker processes', start=start)
    wait_for(lambda: 'XGEN2' in imap_capabilities(port), what='the new configuration')
    login(port2, 'u2').logout()
    for w in workers:
        proxy.wait_log('worker process %d exited with code 0' % w)


def test_reload_closes_removed_addresses(gmailproxy, users):
    port, port2 = free_ports(2)
    proxy = gmailproxy(conf(users, port, 'XGEN1', second_server(port2)),
                       ports=[port, port2])
    workers = two_workers(proxy.pid)
    proxy.write_conf(conf(users, port, 'XGEN2'))
    proxy.signal(signal.SIGHUP)
    for w in workers:
        proxy.wait_log('worker process %d exited with code 0' % w)
    assert not port_open('127.0.0.1', port2)
    assert 'XGEN2' in imap_capabilities(port)
