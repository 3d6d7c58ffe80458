"""Differential conformance: the same IMAP client scripts against Debian's nginx mail proxy
and gmailproxy, with the same auth service and backend, compared byte for byte: what the
client receives, what the auth service is sent and what the backend is sent.

Allowed differences, each deliberate or an nginx version difference:
* ``imap_id off`` and ``auth_http_keepalive off`` are set on gmailproxy: with the defaults
  it advertises and answers ``ID`` and keeps auth connections alive (HTTP/1.1).
* DIFFERENT below lists the scripts where the two differ and why.
"""
import time

import pytest

from tests.support.fake_backend import FakeBackend
from tests.support.net import exchange, free_port

MAIL = '''
mail {
    auth_http %(auth)s;
    max_errors 3;
    imap_client_buffer 256;
    imap_auth plain login;
    %(extra)s
    server { listen 127.0.0.1:%(port)d; protocol imap; }
}
'''

QUIET = 0.3         # seconds of silence that mean "the proxy has answered"

# Each script: the chunks a client sends, one after another.
SCRIPTS = {
    'capability-noop-logout': [b'a1 CAPABILITY\r\n', b'a2 NOOP\r\n', b'a3 LOGOUT\r\n'],
    'login-pipelined-logout': [b'a1 LOGIN alice secret\r\na2 LOGOUT\r\n'],
    'login-literals': [b'a1 LOGIN {5}\r\n', b'alice {6}\r\n', b'secret\r\n', b'a2 LOGOUT\r\n'],
    'login-quoted': [b'a1 LOGIN "alice" "secret"\r\n', b'a2 NOOP\r\n'],
    'authenticate-plain-ir': [b'a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n'],
    'authenticate-plain': [b'a1 AUTHENTICATE PLAIN\r\n', b'AGFsaWNlAHNlY3JldA==\r\n'],
    'authenticate-login': [b'a1 AUTHENTICATE LOGIN\r\n', b'YWxpY2U=\r\n', b'c2VjcmV0\r\n'],
    'wrong-password': [b'a1 LOGIN alice wrong\r\n'],
    'invalid-commands': [b'a1 FOO\r\n', b'a2 LOGIN\r\n', b'a3 NOOP\r\n'],
    'max-errors': [b'a1 FOO\r\n', b'a2 BAR\r\n', b'a3 BAZ\r\n', b'a4 NOOP\r\n'],
    'bad-tag': [b'bad*tag NOOP\r\n', b'a2 NOOP\r\n'],
    'too-long': [b'a1 LOGIN ' + b'x' * 300 + b' y\r\n'],
    'literal-plus-invalid': [b'a03 FOOBAR {10+}\r\n'],
    'bad-base64': [b'a1 AUTHENTICATE PLAIN !!!\r\n', b'a2 NOOP\r\n'],
    'split-command': [b'a1 LO', b'GIN ali', b'ce secret\r\n'],
}

# Scripts where nginx 1.22 and gmailproxy differ, with the reason.
DIFFERENT = {
    # nginx 1.22's tag handling keeps the previous state; the spec (1.31) answers '* BAD'.
}


@pytest.fixture
def both(nginx, gmailproxy, auth):
    backend = FakeBackend('imap')
    auth.users = {'alice': {'password': 'secret', 'port': backend.port}}
    nginx_port, gmp_port = free_port(), free_port()
    nginx(MAIL % {'auth': auth.url, 'port': nginx_port, 'extra': ''}, ports=[nginx_port])
    gmailproxy('events { }\n' + MAIL % {'auth': auth.url, 'port': gmp_port,
                                        'extra': 'imap_id off; auth_http_keepalive off;'},
               ports=[gmp_port])
    yield {'nginx': nginx_port, 'gmailproxy': gmp_port}, backend
    backend.stop()


@pytest.mark.parametrize('name', sorted(SCRIPTS))
def test_same_as_nginx(both, auth, name):
    ports, backend = both
    seen = {}
    for proxy, port in sorted(ports.items()):
        auth.requests.clear()
        backend.received = b''
        client = exchange(port, SCRIPTS[name], lambda got: QUIET)
        time.sleep(0.05)
        seen[proxy] = (client, list(auth.requests), backend.received)
    if name in DIFFERENT:
        pytest.skip(DIFFERENT[name])
    for part, label in enumerate(('client received', 'auth service sent', 'backend sent')):
        assert seen['gmailproxy'][part] == seen['nginx'][part], label
