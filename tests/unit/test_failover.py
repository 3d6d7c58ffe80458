"""failover.py: the order of tries, the circuit breaker's state (with a fake clock),
its bound, the directives, and the auth answer's comma lists (auth_http.interpret)."""
import logging
import socket
from types import SimpleNamespace

import pytest

from gmailproxy import auth_http, errors, failover
from gmailproxy.config.parser import load

A = (('10.0.0.1', 143), socket.AF_INET, '10.0.0.1:143')
B = (('10.0.0.2', 143), socket.AF_INET, '10.0.0.2:143')
C = (('10.0.0.3', 993), socket.AF_INET, '10.0.0.3:993')


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(failover, 'clock', lambda: now[0])
    failover.reset()
    yield now
    failover.reset()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def session():
    logger = logging.getLogger('test.failover')
    logger.setLevel(logging.DEBUG)
    handler = Lines()
    logger.addHandler(handler)
    s = SimpleNamespace(logger=logger, conn_id=7, action='connecting to upstream',
                        client_ip='192.0.2.1', starttls_used=False, login=b'alice',
                        listen=SimpleNamespace(addr_text='127.0.0.1:143'),
                        upstream_name='10.0.0.1:143', lines=handler.lines)
    yield s
    logger.removeHandler(handler)


def settings(failures=3, cooldown=10.0, tries=0, connect_timeout=None):
    return failover.Settings(connect_timeout, tries, failures, cooldown)


def test_order_without_state_is_the_answers_order():
    assert failover.order([A, B, C], settings()) == [A, B, C]


def test_tries_bound_the_list():
    assert failover.order([A, B, C], settings(tries=2)) == [A, B]
    assert failover.order([A, B, C], settings(failures=0, tries=1)) == [A]


def test_marked_down_after_n_failures_in_a_row(clock, session):
    conf = settings(failures=3, cooldown=10.0)
    failover.failed(session, A[2], conf)
    failover.failed(session, A[2], conf)
    assert failover.order([A, B], conf) == [A, B]
    failover.failed(session, A[2], conf)
    assert session.lines == [('warn', '*7 upstream 10.0.0.1:143 is marked down for 10s after '
                              '3 failures while connecting to upstream, client: 192.0.2.1, '
                              'server: 127.0.0.1:143, login: "alice", upstream: '
                              '10.0.0.1:143')]
    assert failover.order([A, B, C], conf) == [B, C]
    clock[0] += 9.9
    assert failover.order([A, B, C], conf) == [B, C]
    clock[0] += 0.2                     # the cool-down is over: tried again, in its place
    assert failover.order([A, B, C], conf) == [A, B, C]
    failover.failed(session, A[2], conf)  # one more failure: down again at once
    assert session.lines[-1][1].startswith('*7 upstream 10.0.0.1:143 is marked down for '
                                           '10s after 4 failures')
    assert failover.order([A, B, C], conf) == [B, C]


def test_success_forgets_failures(clock, session):
    conf = settings(failures=2)
    failover.failed(session, A[2], conf)
    failover.succeeded(session, A[2], conf)
    failover.failed(session, A[2], conf)
    assert failover.order([A, B], conf) == [A, B]     # not two in a row
    failover.failed(session, A[2], conf)
    assert failover.order([A, B], conf) == [B]
    clock[0] += 11
    failover.succeeded(session, A[2], conf)
    assert session.lines[-1] == ('info', '*7 upstream 10.0.0.1:143 is up again after 2 '
                                 'failures while connecting to upstream, client: 192.0.2.1, '
                                 'server: 127.0.0.1:143, login: "alice", upstream: '
                                 '10.0.0.1:143')
    assert failover._state == {}


def test_marked_down_logged_once_while_down(session):
    conf = settings(failures=1)
    for _ in range(5):                   # concurrent sessions failing on the same one
        failover.failed(session, A[2], conf)
    assert len(session.lines) == 1


def test_all_down_tried_anyway_earliest_cooldown_end_first(clock, session):
    conf = settings(failures=1, cooldown=10.0)
    failover.failed(session, B[2], conf)
    clock[0] += 1
    failover.failed(session, A[2], conf)
    assert failover.order([A, B], conf) == [B, A]
    assert failover.order([A, B], settings(failures=1, tries=1)) == [B]


def test_state_is_bounded(session, monkeypatch):
    monkeypatch.setattr(failover, 'MAX_TRACKED', 3)
    conf = settings(failures=1)
    names = ['10.0.1.%d:143' % i for i in range(5)]
    for name in names:
        failover.failed(session, name, conf)
    assert list(failover._state) == names[2:]        # the longest untouched dropped
    failover.failed(session, names[2], conf)
    assert list(failover._state) == [names[3], names[4], names[2]]


class FakeSock:
    pass


def test_connect_records_failures_and_timeouts(session):
    conf = settings(failures=2, connect_timeout=0.05)
    session.conf = SimpleNamespace(failover=conf)

    def refused(sock, addr):
        raise ConnectionRefusedError(111, 'Connection refused')

    def hangs(sock, addr):
        import gevent
        gevent.sleep(5)

    with pytest.raises(ConnectionRefusedError):
        failover.connect(session, refused, FakeSock(), A[0], A[2])
    with pytest.raises(TimeoutError) as info:
        failover.connect(session, hangs, FakeSock(), A[0], A[2])
    assert info.value.errno == 110 and info.value.strerror == 'Connection timed out'
    assert failover.order([A, B], conf) == [B]
    failover.connect(session, lambda sock, addr: None, FakeSock(), A[0], A[2])
    assert failover.order([A, B], conf) == [A, B]


def test_connect_counts_the_session_timeout(session):
    conf = settings(failures=1)
    session.conf = SimpleNamespace(failover=conf)

    def session_timeout(sock, addr):
        raise errors.UpstreamTimeout()

    with pytest.raises(errors.UpstreamTimeout):
        failover.connect(session, session_timeout, FakeSock(), A[0], A[2])
    assert failover.order([A, B], conf) == [B]


# --- directives -----------------------------------------------------------------------------

def load_conf(tmp_path, directives):
    path = tmp_path / 'mail.conf'
    path.write_text('events { }\nmail { auth_http 127.0.0.1:9; %s\n'
                    'server { listen 127.0.0.1:1143; protocol imap; } }\n' % directives)
    return load(str(path)).servers[0]


def test_off_by_default(tmp_path):
    conf = load_conf(tmp_path, '')
    assert conf.failover is None
    assert (conf.proxy_connect_timeout, conf.proxy_next_upstream_tries,
            conf.proxy_backend_failures, conf.proxy_backend_cooldown) == (None, 0, 0, 10.0)


def test_directives(tmp_path):
    conf = load_conf(tmp_path, 'proxy_connect_timeout 500ms; proxy_next_upstream_tries 2; '
                               'proxy_backend_failures 3; proxy_backend_cooldown 1m;')
    fo = conf.failover
    assert (fo.connect_timeout, fo.tries, fo.failures, fo.cooldown) == (0.5, 2, 3, 60.0)
    assert load_conf(tmp_path, 'proxy_backend_failures off;').failover is None


@pytest.mark.parametrize('directive, message', [
    ('proxy_connect_timeout x;', '"proxy_connect_timeout" directive invalid value'),
    ('proxy_backend_failures -1;', '"proxy_backend_failures" directive invalid number'),
])
def test_directive_errors(tmp_path, directive, message):
    with pytest.raises(errors.ConfigError) as info:
        load_conf(tmp_path, directive)
    assert str(info.value).startswith(message + ' in ')


# --- the auth answer: several servers --------------------------------------------------------

def interpret(headers):
    s = SimpleNamespace(conf=SimpleNamespace(resolver=None), login=b'alice', passwd=b'pw',
                        auth_method='plain', proto=SimpleNamespace(NAME='imap'))
    url = SimpleNamespace(addr_text='127.0.0.1:9')
    return auth_http.interpret(s, url, [(n.encode(), v.encode()) for n, v in headers])


@pytest.mark.parametrize('headers, names', [
    ([('Auth-Server', '10.0.0.1'), ('Auth-Port', '143')], ['10.0.0.1:143']),
    ([('Auth-Server', '10.0.0.1'), ('Auth-Port', '143'), ('Auth-Server', '10.0.0.2'),
      ('Auth-Port', '144')], ['10.0.0.1:143', '10.0.0.2:144']),
    ([('Auth-Server', '10.0.0.1, 10.0.0.2,10.0.0.3'), ('Auth-Port', '143')],
     ['10.0.0.1:143', '10.0.0.2:143', '10.0.0.3:143']),
    ([('Auth-Server', '10.0.0.1, 10.0.0.2'), ('Auth-Port', '143, 993')],
     ['10.0.0.1:143', '10.0.0.2:993']),
    ([('Auth-Server', '::1,10.0.0.2'), ('Auth-Port', '143')], ['::1:143', '10.0.0.2:143']),
])
def test_answer_names_several_servers(headers, names):
    result = interpret([('Auth-Status', 'OK')] + headers)
    assert [name for _, _, name in result.servers] == names
    assert result.tls is None


@pytest.mark.parametrize('server, port, message', [
    ('10.0.0.1,', '143', 'sent invalid server address:""'),
    ('10.0.0.1, x', '143', 'sent invalid server address:"x"'),
    ('10.0.0.1', '143, 0', None),             # extra ports are ignored, as before
    ('10.0.0.1,10.0.0.2', '143,', 'sent invalid server port:""'),
])
def test_answer_list_errors(server, port, message):
    headers = [('Auth-Status', 'OK'), ('Auth-Server', server), ('Auth-Port', port)]
    if message is None:
        assert [n for _, _, n in interpret(headers).servers] == ['10.0.0.1:143']
        return
    with pytest.raises(errors.AuthServiceError) as info:
        interpret(headers)
    assert message in info.value.message


def test_answer_backend_tls_headers():
    result = interpret([('Auth-Status', 'OK'), ('Auth-Server', '10.0.0.1'),
                        ('Auth-Port', '993'), ('Auth-SSL-Backend', 'on'),
                        ('auth-ssl-backend-name', 'imap.example.com')])
    assert result.tls == {b'auth-ssl-backend': b'on',
                          b'auth-ssl-backend-name': b'imap.example.com'}
