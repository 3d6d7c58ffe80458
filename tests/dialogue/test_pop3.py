"""POP3 client dialogue, byte for byte against pop3.md, with an in-process proxy."""
import hashlib
import hmac
import re
import socket
import time

import gevent
import pytest

from tests.support.auth import b64
from tests.support.backends import make_cert
from tests.support.net import insecure_context
from tests.support.nginxlog import logged_in, login_failed, too_many_invalid_commands

CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    server_name mx.example;
    %s
    server { listen 127.0.0.1:{port}; protocol pop3; }
}
'''
TLS_CONF = '''
ssl_certificate %s;
ssl_certificate_key %s;
'''
PASS_REPLY = b'+OK maildrop has 2 messages\r\n'
CAPA = b'+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\n'
SALTED = re.compile(rb'\+OK POP3 ready (<\d+\.\d+@mx\.example>)\r\n\Z')


@pytest.fixture
def backend(fake_backend, auth):
    be = fake_backend('pop3', {'PASS': PASS_REPLY})
    auth.users = {'alice': {'password': 'secret'}}
    auth.ports = {'pop3': be.port}
    return be


@pytest.fixture(scope='module')
def tls_conf(tmp_path_factory):
    return TLS_CONF % make_cert(tmp_path_factory.mktemp('pop3cert'), cn='localhost')


def start(mailproxy, directives=''):
    return mailproxy(CONF % directives)


def greeted(proxy):
    return proxy.client(greeting=b'+OK POP3 ready\r\n')


def salted(proxy):
    """A client past the greeting with a salt; returns (client, salt)."""
    c = proxy.client()
    m = SALTED.match(c.readline())
    assert m, 'no salted greeting'
    return c, m.group(1)


def request(method: bytes, user: bytes, passwd: bytes, attempt: int = 1,
            salt: bytes | None = None) -> bytes:
    """The exact auth_http request nginx sends for a POP3 login (auth_http.md 2)."""
    return (b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: ' + method
            + b'\r\nAuth-User: ' + user + b'\r\nAuth-Pass: ' + passwd + b'\r\n'
            + (b'Auth-Salt: ' + salt + b'\r\n' if salt else b'')
            + b'Auth-Protocol: pop3\r\nAuth-Login-Attempt: %d\r\n' % attempt
            + b'Client-IP: 127.0.0.1\r\n\r\n')


# ------------------------------------------------------------- greeting, CAPA, AUTH

def test_greeting_capa_auth_noop_quit(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'CAPA\r\n')
    c.expect(CAPA + b'.\r\n')
    c.send(b'AUTH\r\n')
    c.expect(b'+OK methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n')
    c.send(b'NOOP\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK\r\n')
    assert c.closed()
    assert backend.connections == 0


@pytest.mark.parametrize('auth_methods', ['apop', 'cram-md5', 'plain apop cram-md5'])
def test_greeting_with_salt(mailproxy, backend, auth_methods):
    proxy = start(mailproxy, 'pop3_auth %s;' % auth_methods)
    c, salt = salted(proxy)
    c2, salt2 = salted(proxy)
    assert salt != salt2


@pytest.mark.parametrize('directives, capa, methods', [
    ('pop3_auth plain apop cram-md5 external;',
     b'TOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n',
     b'PLAIN\r\nLOGIN\r\nCRAM-MD5\r\nEXTERNAL\r\n'),
    ('pop3_auth external cram-md5; pop3_capabilities "LAST" PIPELINING;',
     b'LAST\r\nPIPELINING\r\nSASL CRAM-MD5 EXTERNAL\r\n', b'CRAM-MD5\r\nEXTERNAL\r\n'),
    ('pop3_auth apop;', b'TOP\r\nUSER\r\nUIDL\r\nSASL\r\n', b''),
])
def test_capa_and_auth_lists(mailproxy, backend, directives, capa, methods):
    proxy = start(mailproxy, directives)
    c = proxy.client()
    c.readline()
    c.send(b'capa\r\nauth\r\n')
    c.expect(b'+OK Capability list follows\r\n' + capa + b'.\r\n'
             + b'+OK methods supported:\r\n' + methods + b'.\r\n')


def test_capa_starttls_variants(mailproxy, backend, tls_conf):
    c = greeted(start(mailproxy, tls_conf + 'starttls on;'))
    c.send(b'CAPA\r\n')
    c.expect(CAPA + b'STLS\r\n.\r\n')
    only = 'starttls only; pop3_capabilities TOP user UIDL;'
    c = greeted(start(mailproxy, tls_conf + only))
    c.send(b'CAPA\r\n')
    c.expect(b'+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n')


def test_starttls_only_refuses_authentication(mailproxy, backend, auth, tls_conf):
    c, _ = salted(start(mailproxy, tls_conf + 'starttls only; pop3_auth plain apop;'))
    for line in (b'USER alice\r\n', b'APOP alice 0123456789abcdef0123456789abcdef\r\n',
                 b'AUTH\r\n'):
        c.send(line)
        c.expect(b'-ERR invalid command\r\n')
    c.send(b'NOOP\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK\r\n')
    assert auth.requests == []


def test_stls_handshake_then_normal_capa(mailproxy, backend, auth, tls_conf):
    c = greeted(start(mailproxy, tls_conf + 'starttls only;'))
    c.send(b'STLS\r\nUSER injected\r\n')
    c.expect(b'+OK\r\n')
    c.starttls(insecure_context())
    c.send(b'CAPA\r\nSTLS\r\n')
    c.expect(CAPA + b'.\r\n-ERR invalid command\r\n')
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n' + PASS_REPLY)
    assert b'Auth-User: alice\r\n' in auth.requests[0]
    assert b'injected' not in b''.join(auth.requests)


def test_stls_refused_without_starttls(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'STLS\r\n')
    c.expect(b'-ERR invalid command\r\n')


# ------------------------------------------------------ USER/PASS and the user state

def test_user_pass_login_and_pump(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'USER alice\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'PASS secret\r\n')
    c.expect(PASS_REPLY)
    c.send(b'STAT\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK bye\r\n')
    assert c.closed()
    assert backend.received == b'USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n'
    assert auth.requests == [request(b'plain', b'alice', b'secret')]
    proxy.wait_log(logged_in('alice', backend.port, proxy.port))


def test_pipelined_user_pass_quit_in_order(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'CAPA\r\nNOOP\r\nUSER alice\r\nPASS secret\r\nLIST\r\nQUIT\r\n')
    c.expect(CAPA + b'.\r\n+OK\r\n+OK\r\n' + PASS_REPLY + b'+OK\r\n+OK bye\r\n')
    assert c.closed()
    assert backend.received == b'USER alice\r\nPASS secret\r\nLIST\r\nQUIT\r\n'


def test_every_byte_in_its_own_packet(mailproxy, backend):
    c = greeted(start(mailproxy))
    for byte in b'NOOP\r\nUSER alice\nPASS secret\r\nQUIT\r\n':
        c.send(bytes([byte]))
        gevent.sleep(0.001)
    c.expect(b'+OK\r\n+OK\r\n' + PASS_REPLY + b'+OK bye\r\n')


def test_script_split_at_every_position(mailproxy, backend):
    proxy = start(mailproxy)
    script = b'USER alice\r\nPASS secret\r\n'
    for cut in range(1, len(script)):
        c = greeted(proxy)
        c.send(script[:cut])
        gevent.sleep(0.002)
        c.send(script[cut:])
        c.expect(b'+OK\r\n' + PASS_REPLY)
        c.close()


def test_user_and_pass_keep_inner_and_trailing_spaces(mailproxy, backend, auth):
    auth.users['john smith'] = {'password': 'pass word '}
    c = greeted(start(mailproxy))
    c.send(b'USER   john smith\r\nPASS  pass word \r\n')
    c.expect(b'+OK\r\n' + PASS_REPLY)
    assert auth.requests == [request(b'plain', b'john%20smith', b'pass%20word%20')]
    assert backend.lines[:2] == [b'USER john smith\r\n', b'PASS pass word \r\n']


def test_user_state_capa_noop_then_pass(mailproxy, backend, tls_conf):
    c = greeted(start(mailproxy, tls_conf + 'starttls on;'))
    c.send(b'USER alice\r\nCAPA\r\nNOOP\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n'
             b'SASL PLAIN LOGIN\r\n.\r\n+OK\r\n' + PASS_REPLY)


@pytest.mark.parametrize('second', [b'USER bob\r\n', b'AUTH\r\n', b'STLS\r\n',
                                    b'APOP a b\r\n', b'PASS\r\n', b'PASS \r\n',
                                    b'STAT\r\n', b'\r\n'])
def test_user_state_anything_else_returns_to_start(mailproxy, backend, auth, second):
    c = greeted(start(mailproxy))
    c.send(b'USER alice\r\n' + second)
    c.expect(b'+OK\r\n-ERR invalid command\r\n')
    c.send(b'PASS secret\r\n')
    c.expect(b'-ERR invalid command\r\n')
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n' + PASS_REPLY)
    assert len(auth.requests) == 1


def test_quit_in_user_state(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'USER alice\r\nQUIT\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n+OK\r\n')
    assert c.closed()
    assert auth.requests == []


@pytest.mark.parametrize('line', [
    b'\r\n', b'\n', b' NOOP\r\n', b'NOP\r\n', b'NOOPS\r\n', b'STAT\r\n', b'RETR 1\r\n',
    b'PASS secret\r\n', b'USER\r\n', b'USER   \r\n', b'N0OP\r\n', b'NOOP\rx\r\n',
    b'NOOP a b c d\r\n', b'USER a\rb\r\n', b'APOP alice\r\n', b'APOP a b c\r\n',
    b'AUTH FOO\r\n', b'AUTH PLAIN a b\r\n', b'AUTH LOGIN a b\r\n', b'AUTH CRAM-MD5\r\n',
    b'AUTH EXTERNAL\r\n', b'AUTH EXTERNAL Ym9i\r\n', b'NOOP\tx\r\n',
])
def test_invalid_commands(mailproxy, backend, auth, line):
    c = greeted(start(mailproxy))
    c.send(line)
    c.expect(b'-ERR invalid command\r\n')
    c.send(b'noop x y z\r\n')
    c.expect(b'+OK\r\n')
    assert auth.requests == []


def test_max_errors_counts_every_invalid_command(mailproxy, backend):
    proxy = start(mailproxy, 'max_errors 3;')
    c = greeted(proxy)
    c.send(b'FOO\r\nUSER\r\n')
    c.expect(b'-ERR invalid command\r\n-ERR invalid command\r\n')
    c.send(b'NOOP\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'AUTH BAR\r\nNOOP\r\n')
    c.expect(b'-ERR invalid command\r\n')
    assert c.closed()
    proxy.wait_log(too_many_invalid_commands())


# ------------------------------------------------------------------ the 128-byte buffer

def test_line_of_128_bytes_fits(mailproxy, backend, auth):
    login = b'a' * 121                         # 'USER ' + 121 + CRLF = 128 bytes
    auth.users[login.decode()] = {'password': 'secret'}
    c = greeted(start(mailproxy))
    c.send(b'USER ' + login + b'\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'PASS secret\r\n')
    c.expect(PASS_REPLY)


def test_longer_line_is_invalid_then_closed(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'NOOP\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'USER ' + b'a' * 122 + b'\r\nNOOP\r\n')
    c.expect(b'-ERR invalid command\r\n')
    assert c.closed()
    log = proxy.wait_log(r'client sent too long command "USER\.\.\." while in auth')
    assert 'client sent too many invalid commands' not in log
    assert auth.requests == []


def test_long_pass_and_sasl_lines_not_logged(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'USER alice\r\n')
    c.expect(b'+OK\r\n')
    c.send(b'PASS ' + b'topsecret' * 20 + b'\r\n')
    c.expect(b'-ERR invalid command\r\n')
    c = greeted(proxy)
    c.send(b'AUTH PLAIN\r\n')
    c.expect(b'+ \r\n')
    c.send(b'dG9wc2VjcmV0' * 20 + b'\r\n')
    c.expect(b'-ERR invalid command\r\n')
    log = proxy.wait_log(r'client sent too long command "PASS\.\.\."')
    log = proxy.wait_log(r'client sent too long command "\.\.\."')
    assert 'topsecret' not in log and 'dG9wc2VjcmV0' not in log
    assert auth.requests == []


def test_pop3_client_buffer_allows_long_lines(mailproxy, backend, auth):
    login = 'user.with.a.rather.long.name.' * 8 + '@example.com'
    passwd = 'p' * 300
    auth.users[login] = {'password': passwd}
    c = greeted(start(mailproxy, 'pop3_client_buffer 1k;'))
    c.send(b'USER %s\r\nPASS %s\r\n' % (login.encode(), passwd.encode()))
    c.expect(b'+OK\r\n' + PASS_REPLY)
    c = greeted(start(mailproxy, 'pop3_client_buffer 1k;'))
    plain = b64(b'\0' + login.encode() + b'\0' + passwd.encode())
    c.send(b'AUTH PLAIN ' + plain + b'\r\n')
    c.expect(PASS_REPLY)
    assert auth.requests[0] == request(b'plain', login.encode(), passwd.encode())
    assert backend.lines[:2] == [b'USER %s\r\n' % login.encode(),
                                 b'PASS %s\r\n' % passwd.encode()]


# ------------------------------------------------------------------ APOP and SASL

def test_apop_sends_salt_and_digest(mailproxy, backend, auth):
    proxy = start(mailproxy, 'pop3_auth plain apop;')
    c, salt = salted(proxy)
    digest = hashlib.md5(salt + b'secret').hexdigest().encode()
    c.send(b'APOP alice ' + digest + b'\r\n')
    c.expect(PASS_REPLY)
    assert auth.requests == [request(b'apop', b'alice', digest, salt=salt)]
    assert backend.lines[:2] == [b'USER alice\r\n', b'PASS secret\r\n']


def test_apop_not_enabled_is_invalid(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'APOP alice 0123456789abcdef0123456789abcdef\r\n')
    c.expect(b'-ERR invalid command\r\n')
    assert auth.requests == []


def test_apop_without_auth_pass_is_internal_error(mailproxy, backend, auth):
    auth.responder = lambda req: (b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n'
                                  b'Auth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n\r\n'
                                  % backend.port)
    proxy = start(mailproxy, 'pop3_auth apop;')
    c, salt = salted(proxy)
    c.send(b'APOP alice 0123456789abcdef0123456789abcdef\r\n')
    c.expect(b'-ERR internal server error\r\n')
    assert c.closed()
    proxy.wait_log(r'\[error\] .* auth http server 127\.0\.0\.1:%d did not send '
                   r'password while in http auth state' % auth.port)
    assert backend.connections == 0


def test_auth_plain_with_and_without_initial_response(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0secret') + b'\r\n')
    c.expect(PASS_REPLY)
    c = greeted(proxy)
    c.send(b'auth plain\r\n')
    c.expect(b'+ \r\n')
    c.send(b64(b'authz\0alice\0secret') + b' ignored\r\n')
    c.expect(PASS_REPLY)
    assert auth.requests == [request(b'plain', b'alice', b'secret')] * 2


def test_auth_login_pipelined(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'AUTH LOGIN\r\n' + b64(b'alice') + b'\r\n' + b64(b'secret') + b'\r\n')
    c.expect(b'+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n' + PASS_REPLY)
    c = greeted(proxy)
    c.send(b'AUTH LOGIN ' + b64(b'alice') + b'\r\n')
    c.expect(b'+ UGFzc3dvcmQ6\r\n')
    c.send(b64(b'secret') + b'\r\n')
    c.expect(PASS_REPLY)
    assert auth.requests == [request(b'plain', b'alice', b'secret')] * 2


def test_auth_cram_md5_uses_greeting_salt(mailproxy, backend, auth):
    proxy = start(mailproxy, 'pop3_auth plain cram-md5;')
    c, salt = salted(proxy)
    c.send(b'AUTH CRAM-MD5\r\n')
    c.expect(b'+ ' + b64(salt) + b'\r\n')
    digest = hmac.new(b'secret', salt, hashlib.md5).hexdigest().encode()
    c.send(b64(b'alice ' + digest) + b'\r\n')
    c.expect(PASS_REPLY)
    assert auth.requests == [request(b'cram-md5', b'alice', digest, salt=salt)]
    assert backend.lines[:2] == [b'USER alice\r\n', b'PASS secret\r\n']


def test_auth_cram_md5_with_initial_response_is_invalid(mailproxy, backend):
    proxy = start(mailproxy, 'pop3_auth cram-md5;')
    c, _ = salted(proxy)
    c.send(b'AUTH CRAM-MD5 ' + b64(b'alice ' + b'0' * 32) + b'\r\n')
    c.expect(b'-ERR invalid command\r\n')


def test_auth_external_both_forms(mailproxy, backend, auth):
    proxy = start(mailproxy, 'pop3_auth external;')
    c = greeted(proxy)
    c.send(b'AUTH EXTERNAL ' + b64(b'alice') + b'\r\n')
    c.expect(PASS_REPLY)
    c = greeted(proxy)
    c.send(b'AUTH EXTERNAL\r\n')
    c.expect(b'+ VXNlcm5hbWU6\r\n')
    c.send(b64(b'alice') + b'\r\n')
    c.expect(PASS_REPLY)
    assert auth.requests == [request(b'external', b'alice', b'')] * 2
    assert backend.lines[:2] == [b'USER alice\r\n', b'PASS secret\r\n']


@pytest.mark.parametrize('script, replies, message', [
    (b'AUTH PLAIN !!!\r\n', b'', 'invalid base64 encoding in AUTH PLAIN command'),
    (b'AUTH PLAIN\r\n*\r\n', b'+ \r\n',
     'invalid base64 encoding in AUTH PLAIN command'),
    (b'AUTH PLAIN bm9udWw=\r\n', b'', 'invalid login in AUTH PLAIN command'),
    (b'AUTH PLAIN AGFsaWNl\r\n', b'', 'invalid password in AUTH PLAIN command'),
    (b'AUTH LOGIN\r\na\r\n', b'+ VXNlcm5hbWU6\r\n',
     'invalid base64 encoding in AUTH LOGIN command'),
    (b'AUTH LOGIN YWxpY2U=\r\n*\r\n', b'+ UGFzc3dvcmQ6\r\n',
     'invalid base64 encoding in AUTH LOGIN command'),
    (b'AUTH CRAM-MD5\r\nYWxpY2UgMTIz\r\n', None,
     'invalid CRAM-MD5 hash in AUTH CRAM-MD5 command'),
    (b'AUTH EXTERNAL\r\n!x\r\n', b'+ VXNlcm5hbWU6\r\n',
     'invalid base64 encoding in AUTH EXTERNAL command'),
    (b'AUTH EXTERNAL a\r\n', b'', 'invalid base64 encoding in AUTH EXTERNAL command'),
])
def test_bad_sasl_responses(mailproxy, backend, auth, script, replies, message):
    proxy = start(mailproxy, 'pop3_auth plain cram-md5 external;')
    c, salt = salted(proxy)
    if replies is None:
        replies = b'+ ' + b64(salt) + b'\r\n'
    c.send(script + b'NOOP\r\n')
    c.expect(replies + b'-ERR invalid command\r\n+OK\r\n')
    proxy.wait_log('client sent ' + re.escape(message) + ' while in auth state')
    assert auth.requests == []


def test_sasl_response_with_four_words_is_invalid(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'AUTH LOGIN\r\n' + b64(b'alice') + b' a b c\r\n')
    c.expect(b'+ VXNlcm5hbWU6\r\n-ERR invalid command\r\n')
    c.send(b'AUTH LOGIN\r\n' + b64(b'alice') + b' a b\r\n' + b64(b'secret') + b'\r\n')
    c.expect(b'+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n' + PASS_REPLY)


@pytest.mark.parametrize('script', [
    b'AUTH PLAIN ' + b64(b'\0alice\0secret\r\nDELE 1') + b'\r\n',
    b'AUTH PLAIN\r\n' + b64(b'\0alice\r\nDELE 1\0secret') + b'\r\n',
    b'AUTH LOGIN ' + b64(b'alice') + b'\r\n' + b64(b'secret\nDELE 1') + b'\r\n',
    b'AUTH LOGIN\r\n' + b64(b'alice\rx') + b'\r\n',
])
def test_crlf_in_sasl_credentials_refused(mailproxy, backend, auth, script):
    c = greeted(start(mailproxy, 'pop3_auth plain external;'))
    c.send(script)
    c.read_lines_until(b'-ERR invalid command\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK\r\n')
    assert auth.requests == [] and backend.connections == 0


# ------------------------------------------------------------------ auth_http outcomes

def test_auth_failed_without_wait_closes(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'USER alice\r\nPASS wrong\r\nQUIT\r\n')
    c.expect(b'+OK\r\n-ERR Invalid login or password\r\n')
    assert c.closed()
    proxy.wait_log(login_failed())


def test_auth_failed_with_wait_continues_with_pipelined(mailproxy, backend, auth):
    auth.users['alice']['wait'] = 1
    c = greeted(start(mailproxy))
    began = time.monotonic()
    c.send(b'USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n')
    c.expect(b'-ERR Invalid login or password\r\n')
    assert 0.9 <= time.monotonic() - began < 3
    c.expect(b'+OK\r\n' + PASS_REPLY)
    assert auth.requests == [request(b'plain', b'alice', b'wrong'),
                             request(b'plain', b'alice', b'secret', attempt=2)]


def test_auth_failed_with_wait_after_sasl_back_to_start(mailproxy, backend, auth):
    auth.users['alice']['wait'] = 1
    auth.users['alice']['status'] = 'Temporarily locked'
    c = greeted(start(mailproxy))
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0secret') + b'\r\nNOOP\r\nQUIT\r\n')
    c.expect(b'-ERR Temporarily locked\r\n+OK\r\n+OK\r\n')
    assert c.closed()


def test_auth_overrides_user_and_password(mailproxy, backend, auth):
    auth.users['alice'].update(user='alice@backend', **{'pass': 'other pass'})
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n' + PASS_REPLY)
    assert backend.lines[:2] == [b'USER alice@backend\r\n', b'PASS other pass\r\n']
    proxy.wait_log(logged_in('alice@backend', backend.port, proxy.port))


def test_auth_service_down_is_internal_error(mailproxy, backend, auth):
    proxy = start(mailproxy)
    auth.stop()
    c = greeted(proxy)
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n-ERR internal server error\r\n')
    assert c.closed()


def test_client_timeout_closes_without_reply(mailproxy, backend):
    proxy = start(mailproxy, 'timeout 300ms;')
    c = greeted(proxy)
    c.send(b'USER alice\r\n')
    c.expect(b'+OK\r\n')
    assert c.closed(timeout=3)
    proxy.wait_log(r'(?m)client timed out \(110: Connection timed out\) while in auth '
                   r'state, client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+, '
                   r'login: "alice"$')


# ------------------------------------------------------------------ backend login

@pytest.mark.parametrize('replies, sent', [
    ({'greeting': b'-ERR go away\r\n'}, b''),
    ({'USER': b'-ERR no such user\r\n'}, b'USER alice\r\n'),
    ({'PASS': b'-ERR [AUTH] mailbox locked\r\n'}, b'USER alice\r\nPASS secret\r\n'),
])
def test_backend_refusal_is_internal_error(mailproxy, fake_backend, auth, replies,
                                           sent):
    be = fake_backend('pop3', replies)
    auth.users = {'alice': {'password': 'secret', 'port': be.port}}
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n-ERR internal server error\r\n')
    assert c.closed()
    first = list(replies.values())[0][:-2].decode()
    proxy.wait_log(r'(?m)\[error\] .* upstream sent invalid response: "%s" while '
                   r'reading response from upstream, client: 127\.0\.0\.1, '
                   r'server: 127\.0\.0\.1:\d+, login: "alice", '
                   r'upstream: 127\.0\.0\.1:%d$' % (re.escape(first), be.port))
    gevent.sleep(0.05)
    assert be.received == sent


def test_proxy_pass_error_message_relays_backend_reply(mailproxy, fake_backend, auth):
    be = fake_backend('pop3', {'PASS': b'-ERR [IN-USE] mailbox locked\r\n'})
    auth.users = {'alice': {'password': 'secret', 'port': be.port}}
    proxy = start(mailproxy, 'proxy_pass_error_message on;')
    c = greeted(proxy)
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n-ERR [IN-USE] mailbox locked\r\n')
    assert c.closed()
    proxy.wait_log(r'\[info\] .* upstream sent invalid response: '
                   r'"-ERR \[IN-USE\] mailbox locked" while reading response')


def test_backend_reply_split_and_relayed_verbatim(mailproxy, auth):
    """nginx's reply rule: at least 4 bytes ending in CRLF, however it arrives."""
    from gevent.server import StreamServer
    received = []

    def handle(sock, addr):
        sock.sendall(b'+O')
        gevent.sleep(0.01)
        sock.sendall(b'K hello\r\n')
        f = sock.makefile('rb')
        for answer in (b'+OK\r\n', b'+OK 2 messages\r\n+OK pipelined\r\n'):
            received.append(f.readline())
            for byte in answer[:6]:
                sock.sendall(bytes([byte]))
                gevent.sleep(0.002)
            sock.sendall(answer[6:])
        received.append(f.readline())
        sock.close()

    be = StreamServer(('127.0.0.1', 0), handle)
    be.start()
    try:
        auth.users = {'alice': {'password': 'secret', 'port': be.server_port}}
        c = greeted(start(mailproxy))
        c.send(b'USER alice\r\nPASS secret\r\nSTAT\r\n')
        c.expect(b'+OK\r\n+OK 2 messages\r\n+OK pipelined\r\n')
        assert c.closed()
        assert received == [b'USER alice\r\n', b'PASS secret\r\n', b'STAT\r\n']
    finally:
        be.stop()


def test_backend_connect_refused(mailproxy, auth):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        dead = s.getsockname()[1]
    auth.users = {'alice': {'password': 'secret', 'port': dead}}
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n-ERR internal server error\r\n')
    proxy.wait_log(r'connect\(\) to 127\.0\.0\.1:%d failed \(111: Connection refused\) '
                   r'while connecting to upstream' % dead)


def test_session_ending_replies():
    from gmailproxy.protocols import pop3
    assert [pop3.reply(None, key) for key in ('invalid', 'internal', 'cert_error',
                                               'cert_missing')] == [
        b'-ERR invalid command\r\n', b'-ERR internal server error\r\n',
        b'-ERR SSL certificate error\r\n', b'-ERR No required SSL certificate\r\n']
