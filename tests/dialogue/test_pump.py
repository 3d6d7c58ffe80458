"""The pump (proxy.md section 5) with an in-process proxy: pipelined bytes, bulk both ways
at once (the splice path between plain sockets, the buffer path through TLS), the idle
deadline, the byte counts in the log, and that idle sessions hold no pipe."""
import hashlib
import os
import re
import socket

import gevent
import pytest
from gevent.server import StreamServer

from tests.support.certs import PKI
from tests.support.net import Client

CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    %s
    server { listen 127.0.0.1:{port}%s; protocol imap; }
}
'''
BULK = 3 * 1024 * 1024 + 12345          # odd, so chunks never line up


class EchoBackend:
    """IMAP greeting and LOGIN literal exchange, then every byte echoed back."""

    def __init__(self):
        self.server = StreamServer(('127.0.0.1', 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def stop(self):
        self.server.stop(timeout=1)

    def _handle(self, sock, addr):
        f = sock.makefile('rb')
        try:
            sock.sendall(b'* OK backend ready\r\n')
            line = f.readline()                     # a1 LOGIN {5}
            tag = line.split(b' ', 1)[0]
            sock.sendall(b'+ OK\r\n')
            f.readline()                            # alice {6}
            sock.sendall(b'+ OK\r\n')
            f.readline()                            # secret
            sock.sendall(tag + b' OK logged in\r\n')
            while True:
                data = f.read1(65536)
                if not data:
                    return
                sock.sendall(data)
        except OSError:
            return
        finally:
            sock.close()


@pytest.fixture
def echo(auth):
    be = EchoBackend()
    auth.users = {'alice': {'password': 'secret'}}
    auth.ports = {'imap': be.port}
    yield be
    be.stop()


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp('pki'))


def logged_in(c: Client, pipelined: bytes = b'') -> None:
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n' + pipelined)
    c.expect(b'a1 OK logged in\r\n')


def round_trip(c: Client, size: int) -> None:
    """Send ``size`` bytes while reading the echo; both directions run at once."""
    payload = os.urandom(size)
    sender = gevent.spawn(c.sock.sendall, payload)
    got = c.read_exactly(size, timeout=30)
    sender.get(timeout=5)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def test_pipelined_bytes_after_login_are_relayed_first(mailproxy, echo):
    proxy = mailproxy(CONF % ('', ''))
    c = proxy.client()
    logged_in(c, pipelined=b'a2 NOOP\r\n')
    c.expect(b'a2 NOOP\r\n')                      # the echo of the pipelined command
    c.send(b'a3 NOOP\r\n')
    c.expect(b'a3 NOOP\r\n')
    c.close()
    log = proxy.wait_log(r'proxied session done')
    assert re.search(r'proxied session done.*bytes from client: 18, bytes to client: 18', log)


@pytest.mark.parametrize('buffers', ['', 'proxy_buffer 64k; imap_client_buffer 64k;'])
def test_bulk_both_ways_plain(mailproxy, echo, buffers):
    proxy = mailproxy(CONF % (buffers, ''))
    c = proxy.client()
    logged_in(c)
    round_trip(c, BULK)
    round_trip(c, 100)                            # small again after bulk
    c.close()
    log = proxy.wait_log(r'proxied session done')
    assert 'bytes from client: %d, bytes to client: %d' % (BULK + 100, BULK + 100) in log


def test_bulk_both_ways_tls(mailproxy, echo, pki):
    cert, key = pki.server_files('rsa')
    proxy = mailproxy(CONF % ('ssl_certificate %s; ssl_certificate_key %s;' % (cert, key),
                              ' ssl'))
    sock = socket.create_connection(('127.0.0.1', proxy.port), timeout=10)
    sock = pki.client_context().wrap_socket(sock, server_hostname='localhost')
    c = Client('127.0.0.1', proxy.port, timeout=10, sock=sock)
    logged_in(c)
    round_trip(c, BULK)
    round_trip(c, 100)
    c.close()
    log = proxy.wait_log(r'proxied session done')
    assert 'bytes from client: %d, bytes to client: %d' % (BULK + 100, BULK + 100) in log


def test_idle_deadline(mailproxy, echo):
    proxy = mailproxy(CONF % ('proxy_timeout 300ms;', ''))
    c = proxy.client()
    logged_in(c)
    for _ in range(3):                            # traffic pushes the deadline back
        gevent.sleep(0.15)
        c.send(b'x\r\n')
        c.expect(b'x\r\n')
    assert not c.closed(timeout=0.1)
    assert c.closed(timeout=2)
    log = proxy.wait_log(r'proxied session done')
    assert 'client timed out (110: Connection timed out) while proxying' in log


def _pipe_fds() -> int:
    count = 0
    for fd in os.listdir('/proc/self/fd'):
        try:
            count += os.readlink('/proc/self/fd/' + fd).startswith('pipe:')
        except OSError:                           # the directory's own descriptor
            pass
    return count


def test_idle_sessions_hold_no_pipe(mailproxy, echo):
    from gmailproxy import proxy as pump
    proxy = mailproxy(CONF % ('', ''))
    pooled, pipes = len(pump._pipes), _pipe_fds()
    clients = []
    for _ in range(5):
        c = proxy.client()
        logged_in(c)
        round_trip(c, 200000)                     # bulk: spliced through a pipe
        clients.append(c)
    # the sessions are idle now: every pipe they used is back in the pool
    assert _pipe_fds() - pipes == 2 * (len(pump._pipes) - pooled)
    for c in clients:
        c.close()
    proxy.wait_log(r'(?s)(proxied session done.*){5}')
