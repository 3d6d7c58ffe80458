"""IMAP client dialogue, byte for byte against imap.md, with an in-process proxy."""
import base64
import re
import time

import gevent
import pytest

from tests.support.auth import b64
from tests.support.nginxlog import logged_in, login_failed

CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    %s
    server { listen 127.0.0.1:{port}; protocol imap; }
}
'''


@pytest.fixture
def backend(fake_backend, auth):
    be = fake_backend('imap')
    auth.users = {'alice': {'password': 'secret', 'port': be.port}}
    auth.ports = {'imap': be.port}
    return be


def start(mailproxy, directives=''):
    return mailproxy(CONF % directives)


def greeted(proxy):
    return proxy.client(greeting=b'* OK IMAP4 ready\r\n')


def test_greeting_capability_noop_logout(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'a1 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS ID AUTH=PLAIN\r\na1 OK completed\r\n')
    c.send(b'a2 NOOP\r\n')
    c.expect(b'a2 OK completed\r\n')
    c.send(b'a3 LOGOUT\r\n')
    c.expect(b'* BYE\r\na3 OK completed\r\n')
    assert c.closed()


@pytest.mark.parametrize('directives, line', [
    ('imap_capabilities SEE-THIS; imap_id off;', b'* CAPABILITY SEE-THIS AUTH=PLAIN\r\n'),
    ('imap_auth login plain cram-md5 external; imap_id off;',
     b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5'
     b' AUTH=EXTERNAL\r\n'),
    ('imap_id off;', b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n'),
    ('imap_capabilities IMAP4rev1 ID;', b'* CAPABILITY IMAP4rev1 ID AUTH=PLAIN\r\n'),
])
def test_capability_lists(mailproxy, backend, directives, line):
    c = greeted(start(mailproxy, directives))
    c.send(b'x CAPABILITY\r\n')
    c.expect(line + b'x OK completed\r\n')


@pytest.mark.parametrize('command', [
    b'a01 LOGIN\r\n', b'1 AUTHENTICATE\r\n', b'a FOO\r\n', b'a LOGIN "" x\r\n',
    b'a LOGIN a b c\r\n', b'a NOOP a b c d\r\n', b'a STARTTLS\r\n', b'a 123\r\n',
    b'a LOGIN "unterminated\r\n', b'a LOGIN a\rb c\r\n', b'a AUTHENTICATE FOO\r\n',
    b'a AUTHENTICATE CRAM-MD5\r\n', b'a AUTHENTICATE EXTERNAL\r\n',
    b'a AUTHENTICATE PLAIN x y z\r\n', b'a ID (\"a\")\r\n', b'a ID foo\r\n',
])
def test_invalid_commands_tagged(mailproxy, backend, command):
    c = greeted(start(mailproxy))
    c.send(command)
    tag = command.split(b' ')[0]
    c.expect(tag + b' BAD invalid command\r\n')
    c.send(b'b NOOP\r\n')
    c.expect(b'b OK completed\r\n')


@pytest.mark.parametrize('command', [b'\r\n', b'bad*tag NOOP\r\n', b'a' * 33 + b' NOOP\r\n',
                                     b' NOOP\r\n'])
def test_invalid_without_tag(mailproxy, backend, command):
    c = greeted(start(mailproxy))
    c.send(command)
    c.expect(b'* BAD invalid command\r\n')


def test_max_errors_closes_after_reply(mailproxy, backend):
    proxy = start(mailproxy, 'max_errors 2;')
    c = greeted(proxy)
    c.send(b'a01 FOO\r\n')
    c.expect(b'a01 BAD invalid command\r\n')
    c.send(b'a02 BAR\r\n')
    c.expect(b'a02 BAD invalid command\r\n')
    assert c.closed()
    proxy.wait_log(r'\[info\] \d+#\d+: \*\d+ client sent too many invalid commands while in '
                   r'auth state, client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+$')


def test_literal_plus_after_invalid_line_closes(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'a03 FOOBAR {10+}\r\n')
    c.expect(b'a03 BAD invalid command\r\n')
    assert c.closed()


def test_too_long_command(mailproxy, backend):
    proxy = start(mailproxy, 'imap_client_buffer 64;')
    c = greeted(proxy)
    c.send(b'a1 LOGIN alice ' + b'x' * 80 + b'secretpassword\r\n')
    c.expect(b'a1 BAD invalid command\r\n')         # the tag was complete: nginx uses it
    assert c.closed()
    log = proxy.wait_log(r'client sent too long command "a1 LOGIN\.\.\." while in auth state')
    assert 'secretpassword' not in log and 'alice' not in log
    c = greeted(proxy)
    c.send(b'x' * 100)
    c.expect(b'* BAD invalid command\r\n')
    assert c.closed()


def test_login_with_pipelined_logout(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'a1 LOGIN alice secret\r\na2 LOGOUT\r\n')
    c.expect(b'a1 OK logged in\r\n* BYE bye\r\na2 OK logged out\r\n')
    assert backend.received == (b'a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\na2 LOGOUT\r\n')
    assert auth.requests == [
        b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n'
        b'Auth-User: alice\r\nAuth-Pass: secret\r\nAuth-Protocol: imap\r\n'
        b'Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n\r\n']


def test_quoted_and_literal_arguments(mailproxy, backend, auth):
    auth.users['we"ird\\'] = {'password': 'p a%ss', 'port': backend.port}
    c = greeted(start(mailproxy))
    c.send(b'a1 LOGIN "we\\"ird\\\\" {6}\r\n')
    c.expect(b'+ OK\r\n')
    c.send(b'p a%ss\r\n')
    c.expect(b'a1 OK logged in\r\n')
    assert b'Auth-User: we"ird\\\r\nAuth-Pass: p%20a%25ss\r\n' in auth.requests[0]
    assert backend.lines[:3] == [b'a1 LOGIN {7}\r\n', b'we"ird\\ {6}\r\n', b'p a%ss\r\n']


def test_non_synchronizing_literal(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n')
    c.expect(b'a1 OK logged in\r\n')


def test_empty_literal_is_empty_string(mailproxy, backend, auth):
    auth.users['alice']['password'] = ''
    c = greeted(start(mailproxy))
    c.send(b'a1 LOGIN alice {0}\r\n')
    c.expect(b'+ OK\r\n')
    c.send(b'\r\n')
    c.expect(b'a1 OK logged in\r\n')
    assert b'Auth-Pass: \r\n' in auth.requests[0]


def test_literal_split_at_every_byte(mailproxy, backend):
    proxy = start(mailproxy)
    script = b'a1 LOGIN {5}\r\nalice "secret"\r\n'
    for cut in range(1, len(script)):
        c = greeted(proxy)
        c.send(script[:cut])
        gevent.sleep(0.002)
        if cut >= len(b'a1 LOGIN {5}\r\n'):
            c.expect(b'+ OK\r\n')
        c.send(script[cut:])
        if cut < len(b'a1 LOGIN {5}\r\n'):
            c.expect(b'+ OK\r\n')
        c.expect(b'a1 OK logged in\r\n')
        c.close()


def test_garbage_after_literal_is_invalid(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'a1 LOGIN {5}\r\n')
    c.expect(b'+ OK\r\n')
    c.send(b'alicex secret\r\n')
    c.expect(b'a1 BAD invalid command\r\n')


def test_literal_larger_than_buffer_is_invalid(mailproxy, backend):
    c = greeted(start(mailproxy, 'imap_client_buffer 1k;'))
    c.send(b'a1 LOGIN {99999999}\r\n')
    c.expect(b'a1 BAD invalid command\r\n')
    c.send(b'a2 LOGIN {-1}\r\n')
    c.expect(b'a2 BAD invalid command\r\n')


def test_id_before_login(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'a1 ID ("name" "Mail" "version" {4+}\r\n16.0)\r\n')
    c.expect(b'* ID NIL\r\na1 OK completed\r\n')
    c.send(b'a2 ID NIL\r\n')
    c.expect(b'* ID NIL\r\na2 OK completed\r\n')
    c.send(b'a3 LOGIN alice secret\r\n')
    c.expect(b'a3 OK logged in\r\n')
    assert b'ID' not in backend.received


def test_authenticate_plain_both_forms(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'1 AUTHENTICATE PLAIN ' + b64(b'\0alice\0secret') + b'\r\n')
    c.expect(b'1 OK logged in\r\n')
    c = greeted(proxy)
    c.send(b'2 AUTHENTICATE PLAIN\r\n')
    c.expect(b'+ \r\n')
    c.send(b64(b'authz\0alice\0secret') + b'\r\n')
    c.expect(b'2 OK logged in\r\n')
    assert [r.count(b'Auth-Method: plain\r\n') for r in auth.requests] == [1, 1]


def test_authenticate_login(mailproxy, backend):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'1 AUTHENTICATE LOGIN\r\n')
    c.expect(b'+ VXNlcm5hbWU6\r\n')
    c.send(b64(b'alice') + b'\r\n')
    c.expect(b'+ UGFzc3dvcmQ6\r\n')
    c.send(b64(b'secret') + b'\r\n')
    c.expect(b'1 OK logged in\r\n')
    c = greeted(proxy)
    c.send(b'2 AUTHENTICATE LOGIN ' + b64(b'alice') + b'\r\n')
    c.expect(b'+ UGFzc3dvcmQ6\r\n')
    c.send(b64(b'secret') + b'\r\n')
    c.expect(b'2 OK logged in\r\n')


def test_authenticate_cram_md5(mailproxy, backend, auth):
    import hashlib
    import hmac
    c = greeted(start(mailproxy, 'imap_auth plain cram-md5; server_name mx.example;'))
    c.send(b'1 AUTHENTICATE CRAM-MD5\r\n')
    line = c.readline()
    assert line.startswith(b'+ ') and line.endswith(b'\r\n')
    salt = base64.b64decode(line[2:-2])
    assert re.fullmatch(rb'<\d+\.\d+@mx\.example>', salt)
    digest = hmac.new(b'secret', salt, hashlib.md5).hexdigest().encode()
    c.send(b64(b'alice ' + digest) + b'\r\n')
    c.expect(b'1 OK logged in\r\n')
    req = auth.requests[0]
    assert b'Auth-Method: cram-md5\r\nAuth-User: alice\r\nAuth-Pass: ' + digest + \
        b'\r\nAuth-Salt: ' + salt + b'\r\nAuth-Protocol: imap\r\n' in req
    assert backend.lines[2] == b'secret\r\n'


def test_authenticate_external(mailproxy, backend, auth):
    c = greeted(start(mailproxy, 'imap_auth external;'))
    c.send(b'1 AUTHENTICATE EXTERNAL ' + b64(b'alice') + b'\r\n')
    c.expect(b'1 OK logged in\r\n')
    assert b'Auth-Method: external\r\nAuth-User: alice\r\nAuth-Pass: \r\n' in auth.requests[0]


def test_authenticate_cancel(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'1 AUTHENTICATE PLAIN\r\n')
    c.expect(b'+ \r\n')
    c.send(b'*\r\n')
    c.expect(b'1 BAD invalid command\r\n')
    c.send(b'2 NOOP\r\n')
    c.expect(b'2 OK completed\r\n')


@pytest.mark.parametrize('response, message', [
    (b'!!!', 'client sent invalid base64 encoding in AUTH PLAIN command'),
    (base64.b64encode(b'nonul'), 'client sent invalid login in AUTH PLAIN command'),
    (base64.b64encode(b'\0alice'), 'client sent invalid password in AUTH PLAIN command'),
])
def test_bad_plain_logged(mailproxy, backend, response, message):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'1 AUTHENTICATE PLAIN ' + response + b'\r\n')
    c.expect(b'1 BAD invalid command\r\n')
    proxy.wait_log(re.escape(message) + ' while in auth state')


def test_crlf_in_sasl_credentials_refused(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'1 AUTHENTICATE PLAIN ' + b64(b'\0alice\0secret\r\na2 DELETE INBOX') + b'\r\n')
    c.expect(b'1 BAD invalid command\r\n')
    assert auth.requests == [] and backend.connections == 0


def test_auth_failed_with_wait(mailproxy, backend, auth):
    auth.users['alice']['wait'] = 1
    proxy = start(mailproxy)
    c = greeted(proxy)
    began = time.monotonic()
    c.send(b'a1 LOGIN alice wrong\r\n')
    c.expect(b'a1 NO Invalid login or password\r\n', timeout=5)
    assert 0.9 <= time.monotonic() - began < 3
    c.send(b'a2 LOGIN alice secret\r\n')
    c.expect(b'a2 OK logged in\r\n')
    assert b'Auth-Login-Attempt: 2\r\n' in auth.requests[1]
    proxy.wait_log(login_failed())


def test_auth_failed_without_wait_closes(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'a1 LOGIN alice wrong\r\n')
    c.expect(b'a1 NO Invalid login or password\r\n')
    assert c.closed()


def test_auth_overrides_user_and_password(mailproxy, backend, auth):
    auth.users['alice'].update(user='alice@backend', **{'pass': 'other'})
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 OK logged in\r\n')
    assert backend.lines[:3] == [b'a1 LOGIN {13}\r\n', b'alice@backend {5}\r\n', b'other\r\n']
    proxy.wait_log(logged_in('alice@backend', backend.port, proxy.port))
