"""Faults in the middle of a 10 MB transfer, end to end: imaplib -> gmailproxy
(subprocess, one process) -> a relay that can reset -> real Dovecot (issue 11).

Each case checks what the client saw, the log line, the proxy process's open
descriptors before and after (no leak), and that the same process serves a whole
10 MB FETCH for the next client.
"""
import imaplib
import os
import re
import socket
import struct
import time

import gevent
import pytest
from gevent.server import StreamServer

from tests.support.net import free_port

CONF = '''
master_process off;
events { }
mail {
    auth_http %(auth)s;
    auth_http_keepalive off;
    timeout 5s;
    server_name mx.test.example;
    server { listen 127.0.0.1:%(port)d; protocol imap; }
}
'''
BIG = 10 * 1024 * 1024


def message(size: int) -> bytes:
    head = b'From: alice@test.example\r\nTo: alice@test.example\r\nSubject: big\r\n\r\n'
    line = bytes(range(33, 33 + 76)) + b'\r\n'
    return head + (line * (size // len(line) + 1))[:size]


class ResettingRelay:
    """TCP relay to ``port``; once ``limit`` bytes went backend -> client it resets both
    connections (SO_LINGER 0)."""

    def __init__(self, port: int, limit: int):
        self.port_to, self.limit = port, limit
        self.relayed = 0
        self.server = StreamServer(('127.0.0.1', 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, client, addr):
        backend = socket.create_connection(('127.0.0.1', self.port_to), timeout=10)

        def up():
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    backend.sendall(data)
            except OSError:
                pass

        def down():
            try:
                while True:
                    data = backend.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
                    self.relayed += len(data)
                    if self.relayed >= self.limit:
                        break
            except OSError:
                pass
        workers = [gevent.spawn(up), gevent.spawn(down)]
        gevent.joinall(workers, timeout=60, count=1)
        for sock in (client, backend):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            sock.close()
        gevent.killall(workers, timeout=1)

    def stop(self):
        self.server.stop(timeout=1)


def open_fds(pid: int) -> int:
    return len(os.listdir('/proc/%d/fd' % pid))


def settled_fds(pid: int, limit: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = open_fds(pid)
        if n <= limit or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


@pytest.fixture
def setup(gmailproxy, auth, dovecot):
    msg = message(BIG)
    for user in ('alice', 'bob'):
        dovecot.deliver(user, msg)
    relay = ResettingRelay(dovecot.imap_port, BIG // 2)
    auth.users = {'alice': {'password': 'secret', 'port': relay.port},
                  'bob': {'password': 'hunter2', 'port': dovecot.imap_port}}
    auth.ports = {'imap': dovecot.imap_port}
    port = free_port()
    proxy = gmailproxy(CONF % {'auth': auth.url, 'port': port}, ports=[port])
    proxy.port = port
    yield proxy, relay, msg
    relay.stop()


def fetch_all(port, user, password):
    with imaplib.IMAP4('127.0.0.1', port, timeout=30) as imap:
        imap.login(user, password)
        imap.select('INBOX')
        typ, data = imap.fetch('1', '(BODY.PEEK[])')
        assert typ == 'OK'
        return data[0][1]


def test_backend_reset_mid_10mb_fetch(setup):
    """Dovecot's side resets after 5 MB: imaplib sees the connection end inside the
    literal; the proxy logs the session done, frees both sockets, and serves the next
    client a whole 10 MB FETCH."""
    proxy, relay, msg = setup
    assert fetch_all(proxy.port, 'bob', 'hunter2') == msg        # warm-up
    proxy.wait_log('proxied session done')
    before = open_fds(proxy.pid)
    start = len(proxy.log_text())
    with pytest.raises((imaplib.IMAP4.abort, OSError, EOFError)):
        fetch_all(proxy.port, 'alice', 'secret')
    log = proxy.wait_log('proxied session done', start=start, timeout=10)
    assert 'login: "alice"' in log[start:]
    assert '[alert]' not in log and '[crit]' not in log
    assert settled_fds(proxy.pid, before) <= before
    assert relay.relayed >= BIG // 2
    assert fetch_all(proxy.port, 'bob', 'hunter2') == msg


def test_client_reset_mid_10mb_fetch(setup):
    """The client resets after reading 1 MB of the literal: the proxy ends the session
    (Dovecot's connection closed too) without leaking, and the next client is served."""
    proxy, relay, msg = setup
    assert fetch_all(proxy.port, 'bob', 'hunter2') == msg
    proxy.wait_log('proxied session done')
    before = open_fds(proxy.pid)
    start = len(proxy.log_text())
    sock = socket.create_connection(('127.0.0.1', proxy.port), timeout=10)
    f = sock.makefile('rb')
    assert f.readline().startswith(b'* OK')
    sock.sendall(b'a1 LOGIN bob hunter2\r\na2 SELECT INBOX\r\na3 FETCH 1 BODY.PEEK[]\r\n')
    got = 0
    while got < 1024 * 1024:
        got += len(f.read1(65536))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    f.close()
    sock.close()
    log = proxy.wait_log('proxied session done', start=start, timeout=10)
    assert '[alert]' not in log and '[crit]' not in log
    assert settled_fds(proxy.pid, before) <= before
    assert fetch_all(proxy.port, 'bob', 'hunter2') == msg


EXHAUSTED_CONF = '''
worker_processes 1;
worker_rlimit_nofile 48;
events { worker_connections 4096; }
mail {
    auth_http %(auth)s;
    auth_http_keepalive off;
    timeout 5s;
    server { listen 127.0.0.1:%(port)d; protocol imap; }
}
'''


def test_descriptor_exhaustion_is_a_logged_refusal(gmailproxy, auth, dovecot):
    """The worker runs out of descriptors (``worker_rlimit_nofile 48``, 80 clients):
    accept() failing is logged as nginx logs it, nothing reaches stderr, the worker
    lives, and once the clients leave a normal login and 10 MB FETCH work again."""
    msg = message(BIG)
    dovecot.deliver('bob', msg)
    auth.users = {'bob': {'password': 'hunter2', 'port': dovecot.imap_port}}
    port = free_port()
    proxy = gmailproxy(EXHAUSTED_CONF % {'auth': auth.url, 'port': port}, ports=[port])
    held = [socket.create_connection(('127.0.0.1', port), timeout=5) for _ in range(80)]
    try:
        proxy.wait_log('accept4() failed (24: Too many open files)', timeout=10)
    finally:
        for sock in held:
            sock.close()
    assert re.search(r'(?m)\[crit\] \d+#\d+: accept4\(\) failed \(24: Too many open files\)$',
                     proxy.log_text())
    assert 'Traceback' not in proxy.stderr_text()
    deadline = time.monotonic() + 10
    while True:                 # the backlog drains as the held clients' sessions end
        try:
            assert fetch_all(port, 'bob', 'hunter2') == msg
            break
        except (imaplib.IMAP4.abort, OSError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert 'Traceback' not in proxy.stderr_text()
