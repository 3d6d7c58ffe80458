"""Backend failover (failover.py, beyond nginx) with an in-process proxy: several
servers in the auth answer (repeated pairs, comma lists), a refused or a silent first
backend, ``proxy_connect_timeout``, ``proxy_next_upstream_tries`` and the circuit
breaker (``proxy_backend_failures``/``proxy_backend_cooldown``)."""
import re
import socket

import gevent
import pytest

from gevent.server import StreamServer

from gmailproxy import failover
from tests.support import fake_backend as fake_backend_module
from tests.support.fake_backend import FakeBackend
from tests.support.net import free_port

OK = b'a1 OK logged in\r\n'
INTERNAL = b'* BAD internal server error\r\n'


@pytest.fixture(autouse=True)
def fresh_breaker():
    failover.reset()
    yield
    failover.reset()


def conf(directives=''):
    return '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    imap_id off;
    timeout 5s;
    %s
    server { listen 127.0.0.1:{port}; protocol imap; }
}
''' % directives


def answer(auth, servers, ports):
    """Auth-Server/Auth-Port exactly as given (lists become repeated headers)."""
    headers = [('Auth-Status', 'OK')]
    for name, values in (('Auth-Server', servers), ('Auth-Port', ports)):
        values = values if isinstance(values, list) else [values]
        headers += [(name, str(v)) for v in values]

    def respond(req):
        text = 'HTTP/1.0 200 OK\r\n' + ''.join('%s: %s\r\n' % h for h in headers) + '\r\n'
        return text.encode()
    auth.responder = respond


def login(proxy) -> bytes:
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    got = c.readline(timeout=8)
    c.close()
    return got


def failures(proxy, port) -> int:
    return len(re.findall(r'\[error\] \S+ \*\d+ connect\(\) to 127\.0\.0\.1:%d failed'
                          % port, proxy.log_text()))


@pytest.fixture
def silent_port():
    """A port whose connects hang: a listener with a full accept queue drops SYNs."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        sock = socket.socket()
        sock.settimeout(0.3)
        fillers.append(sock)
        try:
            sock.connect(('127.0.0.1', port))
        except OSError:
            break               # this one hangs: the queue is full
    else:
        pytest.skip('could not fill the accept queue')
    yield port
    for sock in fillers:
        sock.close()
    listener.close()


def backend_on(monkeypatch, port) -> FakeBackend:
    """A FakeBackend listening on ``port``."""
    with monkeypatch.context() as m:
        m.setattr(fake_backend_module, 'StreamServer',
                  lambda addr, handle: StreamServer(('127.0.0.1', port), handle))
        return FakeBackend('imap')


# --- several servers --------------------------------------------------------------------

def test_repeated_pairs_first_refused(mailproxy, auth, fake_backend):
    be = fake_backend('imap')
    dead = free_port()
    answer(auth, ['127.0.0.1', '127.0.0.1'], [dead, be.port])
    proxy = mailproxy(conf())
    assert login(proxy) == OK
    log = proxy.wait_log('client logged in')
    assert re.search(r'\[error\] \S+ \*\d+ connect\(\) to 127\.0\.0\.1:%d failed \(111: '
                     r'Connection refused\) while connecting to upstream, client: '
                     r'127\.0\.0\.1, server: 127\.0\.0\.1:\d+, login: "alice", upstream: '
                     r'127\.0\.0\.1:%d\n' % (dead, dead), log), log
    assert re.search(r'\*\d+ client logged in, client: .* upstream: 127\.0\.0\.1:%d\n'
                     % be.port, log), log
    assert be.connections == 1


def test_comma_list_of_servers_with_one_port(mailproxy, auth):
    be = FakeBackend('imap')            # on 127.0.0.1 only: 127.0.0.2 refuses
    try:
        answer(auth, '127.0.0.2, 127.0.0.1', be.port)
        proxy = mailproxy(conf())
        assert login(proxy) == OK
        log = proxy.wait_log('client logged in')
        assert 'connect() to 127.0.0.2:%d failed (111: Connection refused)' % be.port in log
    finally:
        be.stop()


def test_comma_lists_of_servers_and_ports(mailproxy, auth, fake_backend):
    be = fake_backend('imap')
    dead1, dead2 = free_port(), free_port()
    answer(auth, '127.0.0.1,127.0.0.1, 127.0.0.1', '%d, %d,%d' % (dead1, dead2, be.port))
    proxy = mailproxy(conf())
    assert login(proxy) == OK
    log = proxy.wait_log('client logged in')
    assert failures(proxy, dead1) == failures(proxy, dead2) == 1, log


def test_all_refused_ends_with_the_last_error(mailproxy, auth):
    dead1, dead2 = free_port(), free_port()
    answer(auth, ['127.0.0.1', '127.0.0.1'], [dead1, dead2])
    proxy = mailproxy(conf())
    assert login(proxy) == INTERNAL
    proxy.wait_log(r'connect\(\) to 127\.0\.0\.1:%d failed' % dead2)
    assert failures(proxy, dead1) == failures(proxy, dead2) == 1


def test_invalid_server_in_list_refused(mailproxy, auth, fake_backend):
    be = fake_backend('imap')
    answer(auth, '127.0.0.1, not an address', be.port)
    proxy = mailproxy(conf())
    assert login(proxy) == INTERNAL
    proxy.wait_log(r'sent invalid server address:"not an address"')
    assert be.connections == 0


# --- connect timeout ------------------------------------------------------------------------

def test_silent_first_backend_times_out_then_next(mailproxy, auth, fake_backend,
                                                 silent_port):
    be = fake_backend('imap')
    answer(auth, ['127.0.0.1', '127.0.0.1'], [silent_port, be.port])
    proxy = mailproxy(conf('proxy_connect_timeout 300ms;'))
    started = gevent.get_hub().loop.now()
    assert login(proxy) == OK
    elapsed = gevent.get_hub().loop.now() - started
    assert 0.25 < elapsed < 3, elapsed
    log = proxy.wait_log('client logged in')
    assert re.search(r'\[error\] .* connect\(\) to 127\.0\.0\.1:%d failed \(110: Connection '
                     r'timed out\) while connecting to upstream' % silent_port, log), log


def test_silent_backend_without_connect_timeout_uses_timeout(mailproxy, auth, fake_backend,
                                                            silent_port):
    """No ``proxy_connect_timeout``: the session's ``timeout`` covers connect and login,
    as in nginx, and ends the session."""
    be = fake_backend('imap')
    answer(auth, ['127.0.0.1', '127.0.0.1'], [silent_port, be.port])
    proxy = mailproxy(conf().replace('timeout 5s;', 'timeout 500ms;'))
    assert login(proxy) == INTERNAL
    proxy.wait_log(r'\[info\] .* upstream timed out \(110: Connection timed out\) while '
                   r'connecting to upstream')
    assert be.connections == 0


def test_tries_limit(mailproxy, auth, fake_backend):
    be = fake_backend('imap')
    dead = free_port()
    answer(auth, ['127.0.0.1', '127.0.0.1'], [dead, be.port])
    proxy = mailproxy(conf('proxy_next_upstream_tries 1;'))
    assert login(proxy) == INTERNAL
    assert be.connections == 0


# --- the circuit breaker --------------------------------------------------------------------

def test_breaker_skips_a_dead_backend_and_tries_it_after_cooldown(mailproxy, auth,
                                                                  fake_backend, monkeypatch):
    be = fake_backend('imap')
    dead = free_port()
    answer(auth, ['127.0.0.1', '127.0.0.1'], [dead, be.port])
    proxy = mailproxy(conf('proxy_backend_failures 2; proxy_backend_cooldown 1s;'))
    assert login(proxy) == OK
    assert login(proxy) == OK
    log = proxy.wait_log(r'marked down')
    assert re.search(r'\[warn\] \S+ \*\d+ upstream 127\.0\.0\.1:%d is marked down for 1s after '
                     r'2 failures while connecting to upstream, client: 127\.0\.0\.1, '
                     r'server: \S+, login: "alice", upstream: 127\.0\.0\.1:%d\n'
                     % (dead, dead), log), log
    assert failures(proxy, dead) == 2
    for _ in range(3):                   # skipped: no connect, straight to the second
        assert login(proxy) == OK
    assert failures(proxy, dead) == 2
    assert be.connections == 5
    gevent.sleep(1.1)                    # cool-down over: tried again, down again at once
    assert login(proxy) == OK
    assert failures(proxy, dead) == 3
    proxy.wait_log(r'upstream 127\.0\.0\.1:%d is marked down for 1s after 3 failures' % dead)
    assert login(proxy) == OK
    assert failures(proxy, dead) == 3
    revived = backend_on(monkeypatch, dead)     # the dead port comes back
    try:
        gevent.sleep(1.1)
        assert login(proxy) == OK
        assert revived.connections == 1
        proxy.wait_log(r'\[info\] .* upstream 127\.0\.0\.1:%d is up again after 3 failures'
                       % dead)
        assert login(proxy) == OK        # forgotten: first in order again
        assert revived.connections == 2
    finally:
        revived.stop()


def test_breaker_tries_down_backends_when_none_is_left(mailproxy, auth):
    """One backend, down: it is still tried (the breaker never refuses on its own)."""
    dead = free_port()
    answer(auth, '127.0.0.1', dead)
    proxy = mailproxy(conf('proxy_backend_failures 1; proxy_backend_cooldown 60s;'))
    assert login(proxy) == INTERNAL
    proxy.wait_log(r'marked down for 60s after 1 failures')
    assert login(proxy) == INTERNAL
    proxy.wait_log(r'(?s)connect\(\) to 127\.0\.0\.1:%d failed.*connect\(\) to '
                   r'127\.0\.0\.1:%d failed' % (dead, dead))


def test_breaker_counts_connect_timeouts(mailproxy, auth, fake_backend, silent_port):
    be = fake_backend('imap')
    answer(auth, ['127.0.0.1', '127.0.0.1'], [silent_port, be.port])
    proxy = mailproxy(conf('proxy_connect_timeout 200ms; proxy_backend_failures 1;'))
    assert login(proxy) == OK
    proxy.wait_log(r'upstream 127\.0\.0\.1:%d is marked down for 10s after 1 failures'
                   % silent_port)
    assert login(proxy) == OK            # no second wait for the silent one
    assert failures(proxy, silent_port) == 1


def test_breaker_off_by_default(mailproxy, auth, fake_backend):
    be = fake_backend('imap')
    dead = free_port()
    answer(auth, ['127.0.0.1', '127.0.0.1'], [dead, be.port])
    proxy = mailproxy(conf())
    for _ in range(4):
        assert login(proxy) == OK
    assert failures(proxy, dead) == 4
    assert 'marked down' not in proxy.log_text()
    assert proxy.config.servers[0].failover is None
