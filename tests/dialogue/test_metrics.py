"""The metrics endpoint (issue 12 item 5): a few sessions, then the page fetched over
HTTP and read with Prometheus' own text-format parser, in-process and with worker
processes (the library's multiprocess mode, summed by the master)."""
import os
import signal
import socket
import urllib.request

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gmailproxy import limits, metrics
from tests.support.certs import PKI
from tests.support.net import Client, free_port, insecure_context
from tests.support.proxyproc import GmailProxy

TIMEOUT = 5.0
CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    imap_id off;
    metrics_listen 127.0.0.1:{mport};
    ssl_certificate %s;
    ssl_certificate_key %s;
    %s
    server { listen 127.0.0.1:{port}; protocol imap; }
    server { listen 127.0.0.1:{port2}; protocol pop3; }
    server { listen 127.0.0.1:{port3} ssl; protocol imap; }
}
'''


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp('pki'))


@pytest.fixture
def backends(fake_backend, auth):
    made = {p: fake_backend(p) for p in ('imap', 'pop3')}
    auth.users = {'alice': {'password': 'secret'}}
    auth.ports = {p: b.port for p, b in made.items()}
    return made


@pytest.fixture
def served(mailproxy, pki):
    """``served(directives='') -> (proxy, metrics url)``: a proxy and its endpoint."""
    started = []

    def start(directives=''):
        mport = free_port()
        cert, key = pki.server_files('rsa')
        proxy = mailproxy(CONF % (cert, key, directives), mport=mport)
        assert metrics.start(proxy.config) is None
        started.append(proxy)
        return proxy, 'http://127.0.0.1:%d/metrics' % mport

    limits.reset()
    yield start
    metrics.stop()
    limits.reset()


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} read by prometheus' parser."""
    with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
        assert answer.status == 200
        assert answer.headers['Content-Type'].startswith('text/plain; version=0.0.4')
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def settled(url: str, connections: int) -> dict:
    """The page once ``connections`` connections have ended."""
    with gevent.Timeout(TIMEOUT, AssertionError('sessions did not end')):
        while True:
            samples = scrape(url)
            if (total(samples, 'gmailproxy_session_outcomes_total') == connections
                    and total(samples, 'gmailproxy_connections_active') == 0):
                return samples
            gevent.sleep(0.05)


def test_metrics_page_after_a_few_sessions(served, backends, auth):
    proxy, url = served()
    imap = {'protocol': 'imap', 'server': '127.0.0.1:%d' % proxy.ports[0]}
    pop3 = {'protocol': 'pop3', 'server': '127.0.0.1:%d' % proxy.ports[1]}
    imaps = {'protocol': 'imap', 'server': '127.0.0.1:%d' % proxy.ports[2]}

    c = proxy.client()                                      # 1: proxied IMAP session
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 OK logged in\r\n')
    c.send(b'a2 NOOP\r\n')
    c.expect(b'a2 OK done\r\n')
    during = scrape(url)
    assert value(during, 'gmailproxy_sessions_active', **imap) == 1
    assert value(during, 'gmailproxy_connections_active', **imap) == 1
    c.send(b'a3 LOGOUT\r\n')
    c.expect(b'* BYE bye\r\na3 OK logged out\r\n')
    assert c.closed()

    c = proxy.client()                                      # 2: rejected login
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice wrong\r\n')
    c.expect(b'a1 NO Invalid login or password\r\n')
    assert c.closed()

    c = proxy.client()                                      # 3: logout before login
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGOUT\r\n')
    c.expect(b'* BYE\r\na1 OK completed\r\n')
    assert c.closed()

    c = proxy.client(proxy.ports[1])                        # 4: proxied POP3 session
    c.expect(b'+OK POP3 ready\r\n')
    c.send(b'USER alice\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'PASS secret\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'STAT\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK bye\r\n')
    assert c.closed()

    sock = insecure_context().wrap_socket(                  # 5: implicit TLS, logout
        socket.create_connection(('127.0.0.1', proxy.ports[2]), timeout=TIMEOUT))
    tls_version = sock.version()
    c = Client(sock=sock, timeout=TIMEOUT)
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGOUT\r\n')
    c.expect(b'* BYE\r\na1 OK completed\r\n')
    c.close()

    c = Client('127.0.0.1', proxy.ports[2], timeout=TIMEOUT)   # 6: a failed handshake
    c.send(b'a1 CAPABILITY\r\n')
    c.recv_all_until_close()

    m = settled(url, 6)
    assert value(m, 'gmailproxy_connections_total', **imap) == 3
    assert value(m, 'gmailproxy_connections_total', **pop3) == 1
    assert value(m, 'gmailproxy_connections_total', **imaps) == 2
    assert value(m, 'gmailproxy_sessions_total', **imap) == 1
    assert value(m, 'gmailproxy_sessions_total', **pop3) == 1
    assert value(m, 'gmailproxy_sessions_total', **imaps) == 0
    assert total(m, 'gmailproxy_sessions_active') == 0
    assert value(m, 'gmailproxy_logins_total', outcome='ok', **imap) == 1
    assert value(m, 'gmailproxy_logins_total', outcome='failed', **imap) == 1
    assert value(m, 'gmailproxy_logins_total', outcome='ok', **pop3) == 1
    assert total(m, 'gmailproxy_logins_total') == 3
    outcomes = 'gmailproxy_session_outcomes_total'
    assert value(m, outcomes, outcome='ok', **imap) == 1
    assert value(m, outcomes, outcome='auth_failed', **imap) == 1
    assert value(m, outcomes, outcome='quit', **imap) == 1
    assert value(m, outcomes, outcome='ok', **pop3) == 1
    assert value(m, outcomes, outcome='quit', **imaps) == 1
    assert value(m, outcomes, outcome='tls_error', **imaps) == 1
    # the pump's bytes: after the login reply, each way
    sent = 'gmailproxy_proxied_bytes_total'
    assert value(m, sent, direction='from_client', **imap) == \
        len(b'a2 NOOP\r\na3 LOGOUT\r\n')
    assert value(m, sent, direction='to_client', **imap) == \
        len(b'a2 OK done\r\n* BYE bye\r\na3 OK logged out\r\n')
    assert value(m, sent, direction='from_client', **pop3) == len(b'STAT\r\nQUIT\r\n')
    assert value(m, sent, direction='to_client', **pop3) == len(b'+OK\r\n+OK bye\r\n')
    handshakes = 'gmailproxy_tls_handshakes_total'
    assert value(m, handshakes, version=tls_version, **imaps) == 1
    assert value(m, handshakes, version='failed', **imaps) == 1
    assert value(m, 'gmailproxy_auth_duration_seconds_count') == 3
    assert 0 < value(m, 'gmailproxy_auth_duration_seconds_sum') < TIMEOUT
    assert value(m, 'gmailproxy_auth_duration_seconds_bucket', le='+Inf') == 3
    assert value(m, 'gmailproxy_backend_connect_duration_seconds_count') == 2
    assert total(m, 'gmailproxy_limit_refusals_total') == 0


def test_metrics_of_limits_and_cache(served, backends, auth):
    proxy, url = served('max_sessions_per_address 1; auth_cache 10;')
    imap = {'protocol': 'imap', 'server': '127.0.0.1:%d' % proxy.ports[0]}
    for _ in range(2):
        c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN alice secret\r\na2 LOGOUT\r\n')
        c.expect(b'a1 OK logged in\r\n* BYE bye\r\na2 OK logged out\r\n')
        assert c.closed()
        settled(url, 1 if _ == 0 else 2)
    held = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    refused = proxy.client()
    refused.expect(b'* BYE [UNAVAILABLE] Too many connections from your address\r\n')
    held.close()
    m = settled(url, 4)
    assert value(m, 'gmailproxy_limit_refusals_total', limit='address', **imap) == 1
    assert value(m, 'gmailproxy_session_outcomes_total', outcome='refused', **imap) == 1
    assert value(m, 'gmailproxy_session_outcomes_total', outcome='closed', **imap) == 1
    assert value(m, 'gmailproxy_auth_cache_lookups_total', result='miss') == 1
    assert value(m, 'gmailproxy_auth_cache_lookups_total', result='hit') == 1
    assert value(m, 'gmailproxy_auth_duration_seconds_count') == 1   # hits: not timed
    assert value(m, 'gmailproxy_logins_total', outcome='ok', **imap) == 2
    assert len(auth.requests) == 1


def test_metrics_listen_errors_and_off(mailproxy, backends, tmp_path):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    proxy = mailproxy('mail { auth_http {auth}; metrics_listen 127.0.0.1:%d; '
                      'server { listen 127.0.0.1:{port}; protocol imap; } }' % port)
    try:
        assert metrics.start(proxy.config) == \
            'bind() to 127.0.0.1:%d failed (98: Address already in use)' % port
    finally:
        metrics.stop()
        taken.close()
    off = mailproxy('mail { auth_http {auth}; '
                    'server { listen 127.0.0.1:{port}; protocol imap; } }')
    assert metrics.start(off.config) is None
    assert metrics._served is None and off.config.servers[0].tracked is False
    metrics.stop()


# --- with worker processes ------------------------------------------------------------

def children(pid: int) -> list[int]:
    with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
        return [int(p) for p in f.read().split()]


def test_metrics_summed_over_worker_processes(backends, auth, tmp_path, monkeypatch):
    """worker_processes 2: the master serves the sum of the workers' files; counters of
    killed workers stay, their live gauges go; the folder is removed at exit."""
    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    monkeypatch.setenv('TMPDIR', str(tmp))
    port, mport = free_port(), free_port()
    conf = '''
worker_processes 2;
events { }
mail {
    auth_http %s;
    auth_http_keepalive off;
    metrics_listen 127.0.0.1:%d;
    server { listen 127.0.0.1:%d; protocol imap; }
}
''' % (auth.url, mport, port)
    url = 'http://127.0.0.1:%d/metrics' % mport
    proxy = GmailProxy(conf, tmp_path / 'proxy').start(ports=[port, mport])
    try:
        workers = wait_workers(proxy.pid, ())
        assert len(list(tmp.iterdir())) == 1                # the multiprocess folder
        # start() probed the port: one connection, closed at once
        probe = total(settled_to(url, 'gmailproxy_session_outcomes_total', 1),
                      'gmailproxy_connections_total')
        clients = []
        for _ in range(4):
            c = Client('127.0.0.1', port, timeout=TIMEOUT)
            c.expect(b'* OK IMAP4 ready\r\n')
            c.send(b'a1 LOGIN alice secret\r\n')
            c.expect(b'a1 OK logged in\r\n')
            clients.append(c)
        # the gauge moves just after the OK is relayed: wait for it, not a race
        m = settled_to(url, 'gmailproxy_sessions_active', 4)
        assert total(m, 'gmailproxy_connections_total') == probe + 4
        for c in clients[:2]:
            c.send(b'a2 LOGOUT\r\n')
            c.expect(b'* BYE bye\r\na2 OK logged out\r\n')
            c.close()
        m = settled_to(url, 'gmailproxy_sessions_active', 2)
        assert total(m, 'gmailproxy_session_outcomes_total') == probe + 2
        for pid in workers:                                 # two sessions die with them
            os.kill(pid, signal.SIGKILL)
        proxy.wait_log('exited on signal 9')
        wait_workers(proxy.pid, workers)
        m = settled_to(url, 'gmailproxy_sessions_active', 0)
        assert total(m, 'gmailproxy_connections_active') == 0
        assert total(m, 'gmailproxy_connections_total') == probe + 4   # counters stay
        assert total(m, 'gmailproxy_logins_total') == 4
        c = Client('127.0.0.1', port, timeout=TIMEOUT)      # the new workers count on
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGOUT\r\n')
        c.expect(b'* BYE\r\na1 OK completed\r\n')
        c.close()
        settled_to(url, 'gmailproxy_connections_total', probe + 5)
        # the outcome is counted once the session has ended, after the client saw BYE
        with gevent.Timeout(TIMEOUT, AssertionError('the quit was not counted once')):
            while value(scrape(url), 'gmailproxy_session_outcomes_total', outcome='quit',
                        protocol='imap', server='127.0.0.1:%d' % port) != 1:
                gevent.sleep(0.05)
    finally:
        proxy.stop()
        for c in locals().get('clients', []):
            c.close()
    assert proxy.proc.returncode == 0
    assert list(tmp.iterdir()) == []                        # the master removed it


def wait_workers(pid: int, old) -> list[int]:
    """The master's two workers, once neither is one of ``old``."""
    with gevent.Timeout(TIMEOUT, AssertionError('no two new workers')):
        while True:
            pids = children(pid)
            if len(pids) == 2 and not set(pids) & set(old):
                return pids
            gevent.sleep(0.05)


def settled_to(url: str, name: str, expected: float) -> dict:
    never = AssertionError('%s never reached %s' % (name, expected))
    with gevent.Timeout(TIMEOUT, never):
        while True:
            samples = scrape(url)
            if total(samples, name) == expected:
                return samples
            gevent.sleep(0.05)
