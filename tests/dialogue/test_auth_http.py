"""The auth_http client beyond a single login: keep-alive, https, WAIT, escaping."""
import socket
import ssl
import time

import gevent
import pytest
import trustme
from gevent.server import StreamServer

CONF = '''
mail {
    error_log {log} info;
    auth_http %s;
    %s
    server { listen 127.0.0.1:{port}; protocol imap; }
}
'''


@pytest.fixture
def backend(fake_backend, auth):
    be = fake_backend('imap')
    auth.users = {'alice': {'password': 'secret', 'port': be.port}}
    return be


def login(proxy, user=b'alice', password=b'secret', expect=b'a1 OK logged in\r\n'):
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n' % (len(user), user, len(password),
                                                    password))
    c.expect(expect)
    c.send(b'a2 LOGOUT\r\n')
    c.recv_all_until_close()


def test_keepalive_reuses_one_connection(mailproxy, auth, backend):
    proxy = mailproxy(CONF % ('{auth}', ''))
    for _ in range(3):
        login(proxy)
    assert auth.connections == 1
    assert [r.split(b'\r\n', 1)[0] for r in auth.requests] == [b'GET /auth HTTP/1.1'] * 3


def test_keepalive_off_is_one_connection_per_login(mailproxy, auth, backend):
    proxy = mailproxy(CONF % ('{auth}', 'auth_http_keepalive off;'))
    for _ in range(3):
        login(proxy)
    assert auth.connections == 3
    assert [r.split(b'\r\n', 1)[0] for r in auth.requests] == [b'GET /auth HTTP/1.0'] * 3


def test_keepalive_connection_closed_by_service_is_replaced(mailproxy, auth, backend):
    proxy = mailproxy(CONF % ('{auth}', ''))
    login(proxy)
    for sock in list(auth._socks):          # the service drops its idle connection
        sock.shutdown(socket.SHUT_RDWR)
    gevent.sleep(0.1)
    login(proxy)
    assert auth.connections == 2 and len(auth.requests) == 2


def test_wait_status_asks_again(mailproxy, auth, backend):
    answers = [b'HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 1\r\n\r\n']

    def responder(req):
        return answers.pop() if answers else None
    auth.responder = responder
    proxy = mailproxy(CONF % ('{auth}', 'auth_http_keepalive off;'))
    began = time.monotonic()
    login(proxy)
    assert 0.9 < time.monotonic() - began < 4
    assert len(auth.requests) == 2
    assert auth.requests[0] == auth.requests[1]          # same Auth-Login-Attempt


def test_escaping_of_user_and_password(mailproxy, auth, backend):
    auth.users['a b%c\x01\x7f\xc3\xa9+'] = {'password': 'p"w d', 'port': backend.port}
    proxy = mailproxy(CONF % ('{auth}', ''))
    login(proxy, b'a b%c\x01\x7f\xc3\xa9+', b'p"w d')
    assert b'Auth-User: a%20b%25c%01\x7f\xc3\xa9+\r\nAuth-Pass: p"w%20d\r\n' in auth.requests[0]


def test_custom_headers_come_last(mailproxy, auth, backend):
    proxy = mailproxy(CONF % ('{auth}', 'auth_http_header X-Auth-Key "k e y"; '
                              'auth_http_header X-Two 2;'))
    login(proxy)
    assert auth.requests[0].endswith(b'Client-IP: 127.0.0.1\r\nX-Auth-Key: k e y\r\n'
                                     b'X-Two: 2\r\n\r\n')


def test_https_auth_service(mailproxy, auth, backend, tmp_path, monkeypatch):
    """``https://`` auth URLs (beyond nginx): TLS with the service's certificate checked."""
    ca = trustme.CA()
    cert = ca.issue_cert('localhost')
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    plain_port = auth.port

    def relay(sock, addr):
        # Terminate TLS here and pass the request to the recording service.
        with socket.create_connection(('127.0.0.1', plain_port)) as inner:
            request = b''
            while not request.endswith(b'\r\n\r\n'):
                request += sock.recv(4096)
            inner.sendall(request.replace(b'HTTP/1.1', b'HTTP/1.0'))
            answer = b''
            while chunk := inner.recv(4096):
                answer += chunk
            sock.sendall(answer)
    tls_server = StreamServer(('127.0.0.1', 0), relay, ssl_context=server_ctx)
    tls_server.start()
    from gmailproxy.config import values
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    monkeypatch.setattr(values, '_client_tls', client_ctx)
    try:
        proxy = mailproxy(CONF % ('https://localhost:%d/auth' % tls_server.server_port,
                                  'auth_http_keepalive off;'))
        login(proxy)
        assert auth.requests[0].startswith(b'GET /auth HTTP/1.0\r\nHost: localhost\r\n')
        untrusted = ssl.create_default_context()
        monkeypatch.setattr(values, '_client_tls', untrusted)
        proxy = mailproxy(CONF % ('https://localhost:%d/auth' % tls_server.server_port,
                                  'auth_http_keepalive off;'))
        login(proxy, expect=b'* BAD internal server error\r\n')
        proxy.wait_log('CERTIFICATE_VERIFY_FAILED')
    finally:
        tls_server.stop()


def test_auth_server_host_name_through_resolver(mailproxy, auth, backend):
    """Beyond nginx: ``Auth-Server`` may name a host, resolved with ``resolver``."""
    from tests.unit.test_resolver import FakeDNS
    dns = FakeDNS({('backend.test.', 'A'): [('127.0.0.1', 300)]})
    auth.users['alice']['server'] = 'backend.test'
    try:
        proxy = mailproxy(CONF % ('{auth}', 'resolver 127.0.0.1:%d; resolver_timeout 2s;'
                                  % dns.port))
        login(proxy)
        proxy.wait_log(r'client logged in, .*upstream: 127\.0\.0\.1:%d' % backend.port)
        assert ('backend.test.', 'A') in dns.queries
        auth.users['alice']['server'] = 'missing.test'
        login(proxy, expect=b'* BAD internal server error\r\n')
        proxy.wait_log(r'sent invalid server address:"missing\.test"')
    finally:
        dns.stop()


def test_auth_server_host_name_without_resolver_is_refused(mailproxy, auth, backend):
    auth.users['alice']['server'] = 'localhost'
    proxy = mailproxy(CONF % ('{auth}', ''))
    login(proxy, expect=b'* BAD internal server error\r\n')
    proxy.wait_log(r'\[error\] .*auth http server 127\.0\.0\.1:\d+ sent invalid server '
                   r'address:"localhost" while in http auth state')
