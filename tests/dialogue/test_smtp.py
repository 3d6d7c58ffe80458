"""SMTP client dialogue and backend login, byte for byte against smtp.md, in-process.

Every reply string of smtp.md is spelled out here; the backend is the scripted
FakeBackend (it records every line), the auth service the RecordingAuthServer.
"""
import base64
import time

import gevent
import pytest

from tests.support.auth import b64, http_response
from tests.support.net import Client
from tests.support.nginxlog import logged_in, login_failed, too_many_invalid_commands
from tests.unit.test_resolver import FakeDNS

CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    server_name mx.example.com;
    %s
    server { listen 127.0.0.1:{port}; protocol smtp; %s }
}
'''
GREETING = b'220 mx.example.com ESMTP ready\r\n'
EHLO = b'250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n'
INVALID = b'500 5.5.1 Invalid command\r\n'
INTERNAL = b'451 4.3.2 Internal server error\r\n'
TLS = 'ssl_certificate %s; ssl_certificate_key %s; '


@pytest.fixture
def backend(fake_backend, auth):
    be = fake_backend('smtp')
    auth.users = {'alice': {'password': 'secret'}, 'bob': {'password': 'x+y z'}}
    auth.ports = {'smtp': be.port}
    return be


@pytest.fixture(scope='module')
def cert(tmp_path_factory):
    from tests.support.backends import make_cert
    return make_cert(tmp_path_factory.mktemp('smtpcert'), cn='localhost')


def start(mailproxy, directives='', server=''):
    return mailproxy(CONF % (directives, server))


def greeted(proxy, **kw):
    return proxy.client(greeting=GREETING, **kw)


PLAIN = b64(b'\0alice\0secret')


def request_lines(auth, index=-1) -> list:
    """The recorded auth request as lines, without the request line."""
    return auth.requests[index].split(b'\r\n')[1:-2]


def wait_backend(be, count, timeout=5.0):
    with gevent.Timeout(timeout, AssertionError('backend got %r' % be.lines)):
        while len(be.lines) < count:
            gevent.sleep(0.01)
    return be.lines


# --- greeting, HELO/EHLO, local commands -------------------------------------------

def test_greeting_helo_noop_rset_quit(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'HELO client.example\r\n')
    c.expect(b'250 mx.example.com\r\n')
    c.send(b'NOOP\r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    c.send(b'RSET\r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'221 2.0.0 Bye\r\n')
    assert c.closed()
    assert backend.connections == 0


@pytest.mark.parametrize('directives, reply', [
    ('', b'250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n'),
    ('smtp_auth none;', b'250 mx.example.com\r\n'),
    ('smtp_auth none external;', b'250-mx.example.com\r\n250 AUTH EXTERNAL\r\n'),
    ('smtp_capabilities "SIZE 10485760" ENHANCEDSTATUSCODES 8BITMIME DSN;'
     ' smtp_auth login plain cram-md5;',
     b'250-mx.example.com\r\n250-SIZE 10485760\r\n250-ENHANCEDSTATUSCODES\r\n'
     b'250-8BITMIME\r\n250-DSN\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n'),
    ('smtp_capabilities PIPELINING; smtp_auth none;',
     b'250-mx.example.com\r\n250 PIPELINING\r\n'),
    ('smtp_auth external cram-md5 login plain none;',
     b'250-mx.example.com\r\n250 AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n'),
])
def test_ehlo_lists(mailproxy, backend, directives, reply):
    c = greeted(start(mailproxy, directives))
    c.send(b'EHLO client.example\r\n')
    c.expect(reply)
    c.send(b'HELO client.example\r\n')
    c.expect(b'250 mx.example.com\r\n')


@pytest.mark.parametrize('starttls, reply', [
    ('on', b'250-mx.example.com\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n'),
    ('only', b'250-mx.example.com\r\n250 STARTTLS\r\n'),
    ('off', b'250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n'),
])
def test_ehlo_lists_with_starttls(mailproxy, backend, cert, starttls, reply):
    c = greeted(start(mailproxy, TLS % cert + 'starttls %s;' % starttls))
    c.send(b'EHLO client.example\r\n')
    c.expect(reply)


def test_starttls(mailproxy, backend, auth, cert):
    c = greeted(start(mailproxy, TLS % cert + 'starttls on;'))
    c.send(b'EHLO client.example\r\n')
    c.read_lines_until(b'250 ')
    c.send(b'STARTTLS\r\n')
    c.expect(b'220 2.0.0 Start TLS\r\n')
    c.starttls()
    c.send(b'EHLO client.example\r\n')
    c.expect(EHLO)
    c.send(b'STARTTLS\r\n')
    c.expect(INVALID)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    # the HELO name from before TLS was forgotten; the one after it is replayed
    assert wait_backend(backend, 3)[2] == b'EHLO client.example\r\n'
    assert b'Auth-SSL: on\r\n' in auth.requests[0]


def test_starttls_only_blocks_auth_not_mail(mailproxy, backend, auth, cert):
    """As nginx: only AUTH needs TLS first; MAIL/RCPT with ``none`` do not."""
    auth.relay = lambda req: True
    c = greeted(start(mailproxy, TLS % cert + 'starttls only; smtp_auth plain none;'))
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(INVALID)
    c.send(b'MAIL FROM:<a@example.com>\r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    c.send(b'RCPT TO:<b@example.com>\r\n')
    c.expect(b'250 2.1.5 Ok\r\n')


@pytest.mark.parametrize('command', [
    b'STARTTLS\r\n', b'VRFY alice\r\n', b'EXPN list\r\n', b'HELP\r\n', b'DATA\r\n',
    b'BDAT 10\r\n', b'XCLIENT ADDR=1.2.3.4\r\n', b'\r\n', b'\n', b'FOO\r\n',
    b'HELOX a\r\n', b'HEL0 a\r\n', b' HELO a\r\n', b'HELO a\rb\r\n', b'HELO a\r\r\n',
    b'AUTH FOO\r\n', b'AUTH CRAM-MD5\r\n', b'AUTH EXTERNAL\r\n', b'AUTH EXTERNAL =\r\n',
    b'AUTH PLAIN a b\r\n', b'AUTH LOGIN a b\r\n', b'AUTH PLAIN !!!!\r\n',
    b'NOOP 1 2 3 4 5 6 7 8 9 10 11 12\r\n',
])
def test_invalid_commands(mailproxy, backend, command):
    c = greeted(start(mailproxy))
    c.send(command)
    c.expect(INVALID)
    c.send(b'NOOP\r\n')
    c.expect(b'250 2.0.0 OK\r\n')


@pytest.mark.parametrize('command', [
    b'HELO\r\n', b'HELO a b\r\n', b'EHLO\r\n', b'EHLO  \r\n', b'EHLO a b\r\n',
    b'AUTH\r\n', b'AUTH \r\n',
])
def test_invalid_argument(mailproxy, backend, command):
    c = greeted(start(mailproxy, 'max_errors 1;'))
    c.send(command)
    c.expect(b'501 5.5.4 Invalid argument\r\n')
    c.send(b'NOOP\r\n')                     # 501 does not count toward max_errors
    c.expect(b'250 2.0.0 OK\r\n')


def test_commands_are_case_insensitive_and_take_bare_lf(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'ehlo client.example\n')
    c.expect(EHLO)
    c.send(b'nOoP some thing\r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    c.send(b'NOOP 1 2 3 4 5 6 7 8 9 10 11\r\n')   # 11 arguments are fine
    c.expect(b'250 2.0.0 OK\r\n')


def test_max_errors_closes_after_reply(mailproxy, backend):
    proxy = start(mailproxy, 'max_errors 2;')
    c = greeted(proxy)
    c.send(b'FOO\r\n')
    c.expect(INVALID)
    c.send(b'BAR\r\nNOOP\r\n')
    c.expect(INVALID)
    assert c.closed()
    proxy.wait_log(too_many_invalid_commands())


def test_split_commands(mailproxy, backend):
    c = greeted(start(mailproxy, 'max_errors 2;'))
    for piece in (b'HEL', b'O exa', b'mple.com', b'\r', b'\n'):
        c.send(piece)
        gevent.sleep(0.02)
    c.expect(b'250 mx.example.com\r\n')
    c.send(b'FOO B')
    gevent.sleep(0.05)
    c.send(b'AR\r\n')
    c.expect(INVALID)                        # one reply, one error
    c.send(b'NOOP\r\n')
    c.expect(b'250 2.0.0 OK\r\n')


def test_pipelined_commands_answered_in_order(mailproxy, backend):
    c = greeted(start(mailproxy))
    c.send(b'EHLO a\r\nNOOP\r\nFOO\r\nRSET\r\nHELO b\r\nQUIT\r\nNOOP\r\n')
    c.expect(EHLO + b'250 2.0.0 OK\r\n' + INVALID + b'250 2.0.0 OK\r\n'
             b'250 mx.example.com\r\n221 2.0.0 Bye\r\n')
    assert c.closed()


def test_too_long_command(mailproxy, backend):
    proxy = start(mailproxy, 'smtp_client_buffer 128;')
    c = greeted(proxy)
    c.send(b'NOOP ' + b'x' * 200 + b'\r\n')
    c.expect(INVALID)
    assert c.closed()
    proxy.wait_log(r'client sent too long command "NOOP x{123}" while in auth state')


def test_too_long_sasl_response_is_not_logged(mailproxy, backend):
    proxy = start(mailproxy, 'smtp_client_buffer 128;')
    c = greeted(proxy)
    c.send(b'AUTH PLAIN\r\n')
    c.expect(b'334 \r\n')
    c.send(b'c2VjcmV0' * 30 + b'\r\n')
    c.expect(INVALID)
    assert c.closed()
    log = proxy.wait_log(r'client sent too long command "\.\.\." while in auth state')
    assert 'c2VjcmV0' not in log


def test_too_long_auth_line_is_redacted(mailproxy, backend):
    proxy = start(mailproxy, 'smtp_client_buffer 128;')
    c = greeted(proxy)
    c.send(b'AUTH PLAIN ' + b'c2VjcmV0' * 30 + b'\r\n')
    c.expect(INVALID)
    log = proxy.wait_log(r'client sent too long command "AUTH PLAIN \.\.\." while')
    assert 'c2VjcmV0' not in log


# --- MAIL, RCPT without smtp_auth none ---------------------------------------------

def test_mail_without_none_needs_authentication(mailproxy, backend):
    proxy = start(mailproxy, 'max_errors 1;')
    c = greeted(proxy)
    c.send(b'MAIL FROM:<a@example.com>\r\nNOOP\r\n')
    c.expect(b'530 5.7.1 Authentication required\r\n250 2.0.0 OK\r\n')
    c.send(b'RCPT TO:<b@example.com>\r\n')
    c.expect(b'503 5.5.1 Bad sequence of commands\r\n')
    proxy.wait_log(r'\[info\] .*client was rejected: "MAIL FROM:<a@example.com>__'
                   r'NOOP__" while in auth state, client: 127\.0\.0\.1')


def test_rejected_mail_log_hides_pipelined_auth(mailproxy, backend):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'MAIL FROM:<a@example.com>\r\nAUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'530 5.7.1 Authentication required\r\n235 2.0.0 OK\r\n')
    log = proxy.wait_log(r'client was rejected: "MAIL FROM:<a@example.com>__AUTH PLAIN'
                         r' \.\.\."')
    assert PLAIN.decode() not in log


# --- SASL ---------------------------------------------------------------------------

def test_auth_plain_initial_response(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert auth.requests == [
        b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n'
        b'Auth-User: alice\r\nAuth-Pass: secret\r\nAuth-Protocol: smtp\r\n'
        b'Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n'
        b'Client-Host: [UNAVAILABLE]\r\n\r\n']
    assert wait_backend(backend, 2) == [
        b'EHLO mx.example.com\r\n',
        b'XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]\r\n']
    proxy.wait_log(logged_in('alice', backend.port))


def test_auth_plain_challenge(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'AUTH plain\r\n')
    c.expect(b'334 \r\n')
    c.send(PLAIN + b' ignored\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert b'Auth-User: alice\r\n' in auth.requests[0]


def test_auth_login_both_forms(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'AUTH LOGIN\r\n')
    c.expect(b'334 VXNlcm5hbWU6\r\n')
    c.send(b64(b'alice') + b'\r\n')
    c.expect(b'334 UGFzc3dvcmQ6\r\n')
    c.send(b64(b'secret') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    c = greeted(start(mailproxy))
    c.send(b'AUTH LOGIN ' + b64(b'alice') + b'\r\n')
    c.expect(b'334 UGFzc3dvcmQ6\r\n')
    c.send(b64(b'secret') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    for request in auth.requests:            # nginx reports LOGIN as plain
        assert b'Auth-Method: plain\r\nAuth-User: alice\r\nAuth-Pass: secret\r\n' \
            in request


def test_auth_cram_md5(mailproxy, backend, auth):
    import hashlib
    import hmac
    c = greeted(start(mailproxy, 'smtp_auth cram-md5;'))
    c.send(b'AUTH CRAM-MD5\r\n')
    line = c.expect(b'334 ')
    salt = base64.b64decode(line[4:-2])
    assert salt.startswith(b'<') and salt.endswith(b'@mx.example.com>')
    digest = hmac.new(b'secret', salt, hashlib.md5).hexdigest().encode()
    c.send(b64(b'alice ' + digest) + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert (b'Auth-Method: cram-md5\r\nAuth-User: alice\r\nAuth-Pass: ' + digest
            + b'\r\nAuth-Salt: ' + salt + b'\r\n') in auth.requests[0]


def test_auth_external(mailproxy, backend, auth):
    c = greeted(start(mailproxy, 'smtp_auth external;'))
    c.send(b'AUTH EXTERNAL\r\n')
    c.expect(b'334 VXNlcm5hbWU6\r\n')
    c.send(b64(b'alice') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    c = greeted(start(mailproxy, 'smtp_auth external;'))
    c.send(b'AUTH EXTERNAL ' + b64(b'alice') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert all(b'Auth-Method: external\r\nAuth-User: alice\r\nAuth-Pass: \r\n' in r
               for r in auth.requests)


@pytest.mark.parametrize('command, response, message', [
    (b'AUTH PLAIN\r\n', b'!!!\r\n', 'invalid base64 encoding in AUTH PLAIN command'),
    (b'AUTH PLAIN\r\n', b64(b'alice') + b'\r\n', 'invalid login in AUTH PLAIN command'),
    (b'AUTH PLAIN\r\n', b64(b'\0alice') + b'\r\n',
     'invalid password in AUTH PLAIN command'),
    (b'AUTH LOGIN\r\n', b'*\r\n', 'invalid base64 encoding in AUTH LOGIN command'),
])
def test_bad_sasl_responses(mailproxy, backend, command, response, message):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(command)
    c.readline()
    c.send(response)
    c.expect(INVALID)
    c.send(b'NOOP\r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    proxy.wait_log('client sent %s while in auth state' % message)


def test_auth_failed_without_wait_closes(mailproxy, backend, auth):
    proxy = start(mailproxy)
    c = greeted(proxy)
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0wrong') + b'\r\n')
    c.expect(b'535 5.7.0 Invalid login or password\r\n')
    assert c.closed()
    proxy.wait_log(login_failed())


def test_auth_error_code(mailproxy, backend, auth):
    auth.users['carol'] = {'password': 'x', 'status': 'Try later',
                           'error_code': '451 4.3.0'}
    c = greeted(start(mailproxy))
    c.send(b'AUTH PLAIN ' + b64(b'\0carol\0x') + b'\r\n')
    c.expect(b'451 4.3.0 Try later\r\n')
    assert c.closed()


def test_auth_failed_with_wait_continues(mailproxy, backend, auth):
    auth.wait = 1
    c = greeted(start(mailproxy))
    started = time.monotonic()
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0wrong') + b'\r\nNOOP\r\n')
    c.expect(b'535 5.7.0 Invalid login or password\r\n250 2.0.0 OK\r\n')
    assert time.monotonic() - started >= 0.9
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert b'Auth-Login-Attempt: 2\r\n' in auth.requests[1]


# --- smtp_auth none -----------------------------------------------------------------

def test_none_mail_rcpt(mailproxy, backend, auth):
    auth.relay = lambda req: True
    proxy = start(mailproxy, 'smtp_auth none;')
    c = greeted(proxy)
    c.send(b'HELO client.example\r\n')
    c.expect(b'250 mx.example.com\r\n')
    c.send(b'RCPT TO:<b@example.com>\r\n')
    c.expect(b'503 5.5.1 Bad sequence of commands\r\n')
    c.send(b'MAIL\r\n')
    c.expect(b'501 5.5.4 Invalid argument\r\n')
    c.send(b'mail FROM:<a@example.com>  SIZE=100  \r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    c.send(b'MAIL FROM:<c@example.com>\r\n')
    c.expect(b'503 5.5.1 Bad sequence of commands\r\n')
    c.send(b'RCPT\r\n')
    c.expect(b'501 5.5.4 Invalid argument\r\n')
    c.send(b'RCPT TO:<b@example.com> NOTIFY=NEVER\r\nDATA\r\n')
    c.expect(b'250 2.1.5 Ok\r\n354 go ahead\r\n')
    c.send(b'Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n')
    c.expect(b'250 2.0.0 queued\r\n221 2.0.0 bye\r\n')
    assert request_lines(auth) == [
        b'Host: 127.0.0.1', b'Auth-Method: none', b'Auth-User: ', b'Auth-Pass: ',
        b'Auth-Protocol: smtp', b'Auth-Login-Attempt: 1', b'Client-IP: 127.0.0.1',
        b'Client-Host: [UNAVAILABLE]', b'Auth-SMTP-Helo: client.example',
        b'Auth-SMTP-From: mail FROM:<a@example.com>  SIZE=100',
        b'Auth-SMTP-To: RCPT TO:<b@example.com> NOTIFY=NEVER']
    assert backend.lines[:5] == [
        b'EHLO mx.example.com\r\n', b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n',
        b'HELO client.example\r\n', b'mail FROM:<a@example.com>  SIZE=100\r\n',
        b'RCPT TO:<b@example.com> NOTIFY=NEVER\r\n']
    proxy.wait_log(r'client logged in, client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+, '
                   r'upstream: 127\.0\.0\.1:%d' % backend.port)


def test_none_rset_and_helo_forget_mail(mailproxy, backend, auth):
    c = greeted(start(mailproxy, 'smtp_auth none;'))
    for forget in (b'RSET\r\n', b'HELO x\r\n', b'EHLO x\r\n'):
        c.send(b'MAIL FROM:<a@example.com>\r\n')
        c.expect(b'250 2.0.0 OK\r\n')
        c.send(forget)
        c.read_lines_until(b'250 ')
        c.send(b'RCPT TO:<b@example.com>\r\n')
        c.expect(b'503 5.5.1 Bad sequence of commands\r\n')


def test_none_backend_refusal_relayed_session_usable(mailproxy, backend, auth):
    backend.replies['RCPT'] = b'550 5.1.1 <nobody@example.com>: Recipient unknown\r\n'
    auth.relay = lambda req: True
    c = greeted(start(mailproxy, 'smtp_auth none;'))
    c.send(b'MAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\n')
    c.expect(b'250 2.0.0 OK\r\n550 5.1.1 <nobody@example.com>: Recipient unknown\r\n')
    c.send(b'NOOP\r\n')                      # now talking to the backend itself
    c.expect(b'250 2.0.0 Ok\r\n')


def test_none_service_refusal_with_wait_keeps_mail(mailproxy, backend, auth):
    auth.relay = lambda req: ({} if b'good' in req.raw else 'Recipient refused')
    auth.wait = 1
    c = greeted(start(mailproxy, 'smtp_auth none;'))
    c.send(b'MAIL FROM:<a@example.com>\r\nRCPT TO:<bad@example.com>\r\n')
    c.expect(b'250 2.0.0 OK\r\n535 5.7.0 Recipient refused\r\n')
    c.send(b'RCPT TO:<good@example.com>\r\n')
    c.expect(b'250 2.1.5 Ok\r\n')
    assert [r.get('Auth-SMTP-To') for r in auth.parsed] == [
        'RCPT TO:<bad@example.com>', 'RCPT TO:<good@example.com>']
    assert wait_backend(backend, 4)[2:4] == [b'MAIL FROM:<a@example.com>\r\n',
                                              b'RCPT TO:<good@example.com>\r\n']


def test_none_service_refusal_without_wait_keeps_session(mailproxy, backend, auth):
    """Beyond nginx (which closes): a refused recipient leaves the session usable, so
    one unknown address does not defer a message's other recipients."""
    auth.relay = lambda req: True if b'good' in req.raw else 'User unknown'
    c = greeted(start(mailproxy, 'smtp_auth none;'))
    c.send(b'MAIL FROM:<a@example.com>\r\nRCPT TO:<bad@example.com>\r\n')
    c.expect(b'250 2.0.0 OK\r\n535 5.7.0 User unknown\r\n')
    c.send(b'RCPT TO:<good@example.com>\r\n')
    c.expect(b'250 2.1.5 Ok\r\n')


def test_failed_auth_credentials_not_reused_by_mail(mailproxy, backend, auth):
    """CVE-2025-53859: MAIL FROM after a failed AUTH forgets its login and password."""
    auth.wait = 1
    auth.relay = lambda req: True
    c = greeted(start(mailproxy, 'smtp_auth plain none;'))
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0guess') + b'\r\n'
           b'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n')
    c.expect(b'535 5.7.0 Invalid login or password\r\n250 2.0.0 OK\r\n250 2.1.5 Ok\r\n')
    second = auth.parsed[1]
    assert second.get('Auth-Method') == 'none'
    assert second.get('Auth-User') == '' and second.get('Auth-Pass') == ''
    assert b'guess' not in auth.requests[1]
    assert not any(b'LOGIN=' in line for line in backend.lines)


# --- the backend dialogue (smtp.md section 7) ---------------------------------------

@pytest.mark.parametrize('directives, client, sent', [
    ('', [b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com',
      b'XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]']),
    ('', [b'HELO x.example', b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]',
      b'HELO x.example']),
    ('', [b'EHLO x.example', b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]',
      b'EHLO x.example']),
    ('', [b'EHLO x.example', b'HELO y.example', b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]',
      b'EHLO y.example']),
    ('smtp_auth none;', [b'MAIL FROM:<a@x>', b'RCPT TO:<b@y>'],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]',
      b'MAIL FROM:<a@x>', b'RCPT TO:<b@y>']),
    ('smtp_auth none;', [b'HELO x.example', b'MAIL FROM:<a@x>', b'RCPT TO:<b@y>'],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]',
      b'HELO x.example', b'MAIL FROM:<a@x>', b'RCPT TO:<b@y>']),
    ('proxy_smtp_auth on;', [b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]',
      b'AUTH PLAIN %s' % PLAIN]),
    ('proxy_smtp_auth on;', [b'EHLO x.example', b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com', b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]',
      b'EHLO x.example', b'AUTH PLAIN %s' % PLAIN]),
    ('xclient off; proxy_smtp_auth on;', [b'AUTH PLAIN %s' % PLAIN],
     [b'HELO mx.example.com', b'AUTH PLAIN %s' % PLAIN]),
    ('xclient off; proxy_smtp_auth on;', [b'EHLO x.example', b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com', b'AUTH PLAIN %s' % PLAIN]),
    ('xclient off;', [b'EHLO x.example', b'AUTH PLAIN %s' % PLAIN],
     [b'EHLO mx.example.com']),
    ('xclient off;', [b'AUTH PLAIN %s' % PLAIN], [b'HELO mx.example.com']),
    ('xclient off; smtp_auth none;', [b'MAIL FROM:<a@x>', b'RCPT TO:<b@y>'],
     [b'HELO mx.example.com', b'MAIL FROM:<a@x>', b'RCPT TO:<b@y>']),
])
def test_backend_sequences(mailproxy, backend, auth, directives, client, sent):
    auth.relay = lambda req: True
    c = greeted(start(mailproxy, directives))
    for line in client[:-1]:
        c.send(line + b'\r\n')
        c.read_lines_until(b'250 ')
    c.send(client[-1] + b'\r\n')
    c.expect(b'250 2.1.5 Ok\r\n' if b'RCPT' in client[-1] else b'235 2.0.0 OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'221 2.0.0 bye\r\n')
    assert backend.lines == [line + b'\r\n' for line in sent] + [b'QUIT\r\n']


def test_pipelined_after_auth_forwarded(mailproxy, backend, auth):
    c = greeted(start(mailproxy))
    c.send(b'EHLO x\r\n')
    c.expect(EHLO)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\nMAIL FROM:<alice@example.com>\r\n'
           b'RCPT TO:<bob@example.com>\r\nDATA\r\n')
    c.expect(b'235 2.0.0 OK\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n')
    c.send(b'Subject: x\r\n\r\n..dot\r\n.\r\n')
    c.expect(b'250 2.0.0 queued\r\n')
    assert backend.lines[3:] == [b'MAIL FROM:<alice@example.com>\r\n',
                                 b'RCPT TO:<bob@example.com>\r\n', b'DATA\r\n',
                                 b'Subject: x\r\n', b'\r\n', b'..dot\r\n', b'.\r\n']


@pytest.mark.parametrize('login, encoded', [
    (b'alice', b'alice'),
    (b'a b+c=d', b'a+20b+2Bc+3Dd'),
    (b'j\xc3\xb6rg\x7f\x01', b'j+C3+B6rg+7F+01'),
    (b'x@example.com!#~', b'x@example.com!#~'),
])
def test_xclient_login_is_xtext(mailproxy, backend, auth, login, encoded):
    auth.users = {login.decode('latin-1'): {'password': 'pw'}}   # as Request reads it
    c = greeted(start(mailproxy))
    c.send(b'AUTH PLAIN ' + b64(b'\0' + login + b'\0pw') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert wait_backend(backend, 2)[1] == (b'XCLIENT ADDR=127.0.0.1 LOGIN=' + encoded
                                           + b' NAME=[UNAVAILABLE]\r\n')


def test_auth_user_and_pass_overrides(mailproxy, backend, auth):
    auth.users['alice'].update(user='backend-alice', **{'pass': 'backend-pw'})
    c = greeted(start(mailproxy, 'proxy_smtp_auth on;'))
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert wait_backend(backend, 3)[2] == b'AUTH PLAIN %s\r\n' % b64(
        b'\0backend-alice\0backend-pw')


def test_ipv6_client_address(mailproxy, backend, auth):
    proxy = mailproxy(CONF.replace('listen 127.0.0.1:{port}', 'listen [::1]:{port}')
                      % ('', ''))
    c = Client('::1', proxy.port)
    c.expect(GREETING)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert wait_backend(backend, 2)[1] == (b'XCLIENT ADDR=IPV6:::1 LOGIN=alice'
                                           b' NAME=[UNAVAILABLE]\r\n')
    assert b'Client-IP: ::1\r\n' in auth.requests[0]


def test_no_password_for_proxy_smtp_auth(mailproxy, backend, auth):
    auth.responder = lambda req: http_response([
        ('Auth-Status', 'OK'), ('Auth-Server', '127.0.0.1'),
        ('Auth-Port', str(backend.port))])
    proxy = start(mailproxy, 'smtp_auth external; proxy_smtp_auth on;')
    c = greeted(proxy)
    c.send(b'AUTH EXTERNAL ' + b64(b'alice') + b'\r\n')
    c.expect(INTERNAL)
    assert c.closed()
    proxy.wait_log(r'\[error\] .*no password available while sending AUTH to upstream, '
                   r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+, login: "alice", '
                   r'upstream: 127\.0\.0\.1:%d' % backend.port)
    assert backend.lines == [b'EHLO mx.example.com\r\n',
                             b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n']


@pytest.mark.parametrize('key, reply, directives', [
    ('greeting', b'554 go away\r\n', ''),
    ('EHLO', b'502 no\r\n', ''),
    ('XCLIENT', b'550 5.7.0 not authorized\r\n', ''),
    ('HELO', b'501 bad\r\n', 'xclient off;'),
    ('AUTH', b'535 5.7.8 bad credentials\r\n', 'proxy_smtp_auth on;'),
])
def test_backend_refusals(mailproxy, backend, auth, key, reply, directives):
    backend.replies[key] = reply
    proxy = start(mailproxy, directives)
    c = greeted(proxy)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(INTERNAL)
    assert c.closed()
    proxy.wait_log(r'\[error\] .*upstream sent invalid response: "%s" while reading '
                   r'response from upstream, client: 127\.0\.0\.1, '
                   r'server: 127\.0\.0\.1:\d+, login: "alice", '
                   r'upstream: 127\.0\.0\.1:\d+'
                   % reply[:-2].decode().replace('.', r'\.'))


def test_backend_refusal_relayed_with_pass_error_message(mailproxy, backend, auth):
    backend.replies['XCLIENT'] = b'550-5.7.0 not\r\n550 5.7.0 authorized\r\n'
    proxy = start(mailproxy, 'proxy_pass_error_message on;')
    c = greeted(proxy)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'550-5.7.0 not\r\n550 5.7.0 authorized\r\n')
    assert c.closed()
    proxy.wait_log(r'\[info\] .*upstream sent invalid response: "550-5\.7\.0 not"')


def test_backend_mail_refused_in_none_mode(mailproxy, backend, auth):
    auth.relay = lambda req: True
    backend.replies['MAIL'] = b'452 4.3.1 full\r\n'
    c = greeted(start(mailproxy, 'smtp_auth none;'))
    c.send(b'MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n')
    c.expect(b'250 2.0.0 OK\r\n' + INTERNAL)
    assert c.closed()


def test_multiline_backend_replies(mailproxy, backend, auth):
    backend.replies.update({'greeting': b'220-backend\r\n220 ESMTP\r\n',
                            'XCLIENT': b'250-a\r\n250-b\r\n250 c\r\n',
                            'RCPT': b'250-first\r\n250 second\r\n'})
    auth.relay = lambda req: True
    c = greeted(start(mailproxy, 'smtp_auth none;'))
    c.send(b'MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n')
    c.expect(b'250 2.0.0 OK\r\n250-first\r\n250 second\r\n')


def test_auth_service_failure_is_internal_error(mailproxy, backend, auth):
    auth.respond_raw = b'garbage\r\n\r\n'
    c = greeted(start(mailproxy))
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(INTERNAL)
    assert c.closed()


# --- greeting delay ------------------------------------------------------------------

def test_greeting_delay(mailproxy, backend):
    proxy = start(mailproxy, 'smtp_greeting_delay 300ms;')
    c = proxy.client()
    started = time.monotonic()
    c.expect(GREETING)
    assert time.monotonic() - started >= 0.25
    c.send(b'EHLO x\r\n')
    c.expect(EHLO)


def test_client_talking_first_is_rejected(mailproxy, backend):
    proxy = start(mailproxy, 'smtp_greeting_delay 300ms;')
    c = proxy.client()
    c.send(b'EHLO example.com\r\nMAIL FROM:<a@b>\r\n')
    c.expect(b'503 5.5.0 Improper use of SMTP command pipelining\r\n')
    assert c.closed()
    proxy.wait_log(r'\[info\] .*client was rejected before greeting: '
                   r'"EHLO example\.com__MAIL FROM:<a@b>__" while in delay pipelining '
                   r'state, client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+')


def test_client_talking_first_with_auth_is_redacted(mailproxy, backend):
    proxy = start(mailproxy, 'smtp_greeting_delay 300ms;')
    c = proxy.client()
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'503 5.5.0 Improper use of SMTP command pipelining\r\n')
    log = proxy.wait_log(r'client was rejected before greeting: "AUTH PLAIN \.\.\."')
    assert PLAIN.decode() not in log


def test_timeout_closes_without_reply(mailproxy, backend):
    proxy = start(mailproxy, 'timeout 300ms;')
    c = greeted(proxy)
    c.send(b'EHLO x\r\n')
    c.expect(EHLO)
    assert c.closed(timeout=2)
    proxy.wait_log(r'client timed out \(110: Connection timed out\) while in auth '
                   r'state')


# --- the resolver ---------------------------------------------------------------------

@pytest.fixture
def dns_server():
    from gmailproxy import resolver
    resolver._resolvers.clear()
    server = FakeDNS({('1.0.0.127.in-addr.arpa.', 'PTR'): [('client.test.', 300)],
                      ('client.test.', 'A'): [('127.0.0.1', 300)]})
    yield server
    server.stop()
    resolver._resolvers.clear()


def test_resolved_name_in_auth_request_and_xclient(mailproxy, backend, auth,
                                                    dns_server):
    c = greeted(start(mailproxy, 'resolver 127.0.0.1:%d;' % dns_server.port))
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert b'Client-IP: 127.0.0.1\r\nClient-Host: client.test\r\n' in auth.requests[0]
    assert wait_backend(backend, 2)[1] == (b'XCLIENT ADDR=127.0.0.1 LOGIN=alice'
                                           b' NAME=client.test\r\n')


def test_resolver_timeout_gives_tempunavail(mailproxy, backend, auth, dns_server):
    dns_server.records[('1.0.0.127.in-addr.arpa.', 'PTR')] = 'DROP'
    proxy = start(mailproxy, 'resolver 127.0.0.1:%d; resolver_timeout 300ms;'
                  % dns_server.port)
    c = proxy.client()
    c.send(b'EHLO early\r\n')               # waits in the socket meanwhile
    c.expect(GREETING)
    c.expect(EHLO)
    c.send(b'AUTH PLAIN ' + PLAIN + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert b'Client-Host: [TEMPUNAVAIL]\r\n' in auth.requests[0]
    assert wait_backend(backend, 3)[1] == (b'XCLIENT ADDR=127.0.0.1 LOGIN=alice'
                                           b' NAME=[TEMPUNAVAIL]\r\n')
    proxy.wait_log(r'\[error\] .*127\.0\.0\.1 could not be resolved \(110: Operation '
                   r'timed out\) while in resolving client address, '
                   r'client: 127\.0\.0\.1')


def test_resolver_and_greeting_delay_reject_early_talker(mailproxy, backend,
                                                         dns_server):
    dns_server.delay = 0.2
    proxy = start(mailproxy, 'resolver 127.0.0.1:%d; smtp_greeting_delay 100ms;'
                  % dns_server.port)
    c = proxy.client()
    c.send(b'EHLO early\r\n')               # sent during the lookup
    c.expect(b'503 5.5.0 Improper use of SMTP command pipelining\r\n')
    assert c.closed()
