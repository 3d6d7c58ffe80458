"""Differential conformance for SMTP: the same client scripts against Debian's nginx
mail proxy (1.22 with Debian's security patches) and gmailproxy, each with its own but
identical auth service and scripted backend, compared byte for byte: what the client
receives, what the auth service is sent and what the backend is sent.

Allowed differences:
* ``auth_http_keepalive off`` is set on gmailproxy (by default it keeps auth connections
  alive with HTTP/1.1).
* DIFFERENT lists the scripts where the two differ, why, and the exact bytes; apart
  from those bytes the two must still be identical.
"""
import re
import time
from dataclasses import dataclass, field

import gevent
import pytest

from tests.support.auth import RecordingAuthServer, b64, http_response
from tests.support.backends import Nginx
from tests.support.fake_backend import FakeBackend
from tests.support.net import exchange, free_ports
from tests.support.proxyproc import GmailProxy

SERVERS = {
    'default': '',
    'caps': 'smtp_capabilities "SIZE 10485760" ENHANCEDSTATUSCODES 8BITMIME DSN;'
            ' smtp_auth login plain external;',
    'none': 'smtp_auth plain login none;',
    'proxyauth': 'proxy_smtp_auth on;',
    'noxclient': 'xclient off;',
    'noxclient-proxyauth': 'xclient off; proxy_smtp_auth on;',
    'noxclient-none': 'xclient off; smtp_auth none;',
    'passerror': 'proxy_pass_error_message on;',
    'delay': 'smtp_greeting_delay 300ms;',
}
MAIL = '''
mail {
    auth_http %(auth)s;
    server_name mx.test.example;
    max_errors 3;
    smtp_client_buffer 256;
    %(extra)s
%(servers)s
}
'''
SERVER = '    server { listen 127.0.0.1:%d; protocol smtp; %s }\n'
SETTLE = 0.05
_FINAL = re.compile(rb'(?:^|\n)\d{3}(?: [^\n]*)?\r?\n\Z')


def auth_plain(login: bytes, password: bytes) -> bytes:
    return b'AUTH PLAIN ' + b64(b'\0' + login + b'\0' + password) + b'\r\n'


PLAIN = auth_plain(b'alice', b'secret')


@dataclass
class Script:
    server: str
    chunks: list
    early: bool = False             # send the first chunk before reading the greeting
    quiet: float = 0.15             # silence that means "the proxy has answered"
    replies: dict = field(default_factory=dict)     # backend replies for this script


S = Script
SCRIPTS = {
    'quit': S('default', [b'QUIT\r\n', b'NOOP\r\n']),
    'helo-ehlo-noop-rset': S('default', [b'HELO a.example\r\n', b'EHLO b.example\r\n',
                                         b'NOOP\r\n', b'RSET\r\n', b'QUIT\r\n']),
    'ehlo-caps': S('caps', [b'EHLO x\r\n', b'HELO y\r\n']),
    'ehlo-lowercase-bare-lf': S('default', [b'ehlo x\n', b'nOoP a b\n']),
    'invalid-commands': S('default', [b'VRFY x\r\n', b'DATA\r\n', b'NOOP\r\n']),
    'more-invalid': S('default', [b'\r\n', b'HELOX a\r\n', b'NOOP\r\n']),
    'xclient-from-client': S('default', [b'XCLIENT ADDR=192.0.2.1\r\n', b'NOOP\r\n']),
    'max-errors': S('default', [b'FOO\r\n', b'BAR\r\n', b'BAZ\r\n', b'NOOP\r\n']),
    'invalid-argument': S('default', [b'HELO\r\n', b'EHLO a b\r\n', b'AUTH\r\n',
                                      b'NOOP\r\n']),
    'twelve-arguments': S('default', [b'NOOP 1 2 3 4 5 6 7 8 9 10 11 12\r\n',
                                      b'NOOP 1 2 3 4 5 6 7 8 9 10 11\r\n']),
    'mail-without-none': S('default', [b'MAIL FROM:<a@example.com>\r\n',
                                       b'RCPT TO:<b@example.com>\r\n', b'NOOP\r\n']),
    'too-long': S('default', [b'NOOP ' + b'x' * 300 + b'\r\n']),
    'starttls-off': S('default', [b'STARTTLS\r\n', b'NOOP\r\n']),
    'split': S('default', [b'HEL', b'O x\r\n', b'FOO B', b'AR\r\n', b'NOOP\r\n']),
    'pipelining': S('default', [b'EHLO a\r\nNOOP\r\nFOO\r\nRSET\r\nHELO b\r\n'
                                b'QUIT\r\nNOOP\r\n']),
    'odd-lines': S('default', [b'NOOP a\rb\r\n', b'NOOP\r\r\n', b'HELO a\tb\r\n',
                               b'RSET x\r\n', b'QUIT now\r\n']),
    'auth-plain-ir': S('default', [b'EHLO x\r\n', PLAIN, b'MAIL FROM:<a@x>\r\n',
                                   b'QUIT\r\n']),
    'auth-plain-challenge': S('default', [b'AUTH PLAIN\r\n',
                                          b64(b'\0alice\0secret') + b' junk\r\n']),
    'auth-plain-authzid': S('default', [b'AUTH PLAIN '
                                        + b64(b'admin\0alice\0secret') + b'\r\n']),
    'auth-lowercase': S('default', [PLAIN.replace(b'AUTH PLAIN', b'auth plain')]),
    'auth-login': S('default', [b'HELO x\r\n', b'AUTH LOGIN\r\n', b'YWxpY2U=\r\n',
                                b'c2VjcmV0\r\n']),
    'auth-login-ir': S('default', [b'AUTH LOGIN YWxpY2U=\r\n', b'c2VjcmV0\r\n']),
    'auth-login-three-args': S('default', [b'AUTH LOGIN a b\r\n', b'NOOP\r\n']),
    'auth-login-cancel': S('default', [b'AUTH LOGIN\r\n', b'*\r\n', b'NOOP\r\n']),
    'auth-empty-responses': S('default', [b'AUTH PLAIN\r\n', b'\r\n', b'AUTH LOGIN\r\n',
                                          b'\r\n', b'\r\n']),
    'auth-wrong': S('default', [auth_plain(b'alice', b'wrong')]),
    'auth-bad-base64': S('default', [b'AUTH PLAIN !!!\r\n', b'NOOP\r\n']),
    'auth-bad-plain': S('default', [b'AUTH PLAIN YWxpY2U=\r\n', b'NOOP\r\n']),
    'auth-unknown': S('default', [b'AUTH FOO\r\n', b'AUTH PLAIN a b\r\n', b'NOOP\r\n']),
    'auth-cram-disabled': S('default', [b'AUTH CRAM-MD5\r\n', b'NOOP\r\n']),
    'auth-external-disabled': S('default', [b'AUTH EXTERNAL\r\n', b'NOOP\r\n']),
    'auth-external-ir-disabled': S('default', [b'AUTH EXTERNAL YWxpY2U=\r\n',
                                               b'NOOP\r\n']),
    'auth-external': S('caps', [b'EHLO x\r\n', b'AUTH EXTERNAL YWxpY2U=\r\n']),
    'auth-external-challenge': S('caps', [b'AUTH EXTERNAL\r\n', b'YWxpY2U=\r\n']),
    'auth-error-code': S('default', [auth_plain(b'carol', b'x')]),
    'auth-wait': S('default', [auth_plain(b'dave', b'x') + b'NOOP\r\n', PLAIN],
                   quiet=1.3),
    'pipelined-after-auth': S('default', [
        b'EHLO x\r\n' + PLAIN + b'MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n',
        b'Subject: x\r\n\r\n..dot\r\n.\r\n', b'QUIT\r\n']),
    'none-relay': S('none', [b'HELO client.example\r\n',
                             b'MAIL FROM:<a@example.com>  SIZE=100\r\n',
                             b'RCPT TO:<bob@test.example> NOTIFY=NEVER\r\n',
                             b'DATA\r\n', b'Subject: relayed\r\n\r\nhello\r\n.\r\n',
                             b'QUIT\r\n']),
    'none-sequence': S('none', [b'RCPT TO:<b@x>\r\n', b'MAIL\r\n',
                                b'MAIL FROM:<a@x>\r\n', b'MAIL FROM:<c@x>\r\n',
                                b'RCPT\r\n', b'RSET\r\n', b'RCPT TO:<b@x>\r\n',
                                b'EHLO x\r\n', b'MAIL FROM:<a@x>\r\n', b'HELO y\r\n',
                                b'RCPT TO:<b@x>\r\n']),
    'none-tab-in-mail': S('none', [b'MAIL FROM:<a@x>\tSIZE=1\r\n',
                                   b'RCPT TO:<b@x>\r\n']),
    'none-then-auth': S('none', [b'EHLO c\r\n', b'MAIL FROM:<a@x>\r\n', PLAIN]),
    'none-rcpt-refused-by-backend': S(
        'none', [b'MAIL FROM:<a@x>\r\nRCPT TO:<nobody@test.example>\r\n',
                 b'RCPT TO:<bob@test.example>\r\n'],
        replies={'RCPT': b'550 5.1.1 Recipient unknown\r\n'}),
    'none-rcpt-refused-with-wait': S(
        'none', [b'MAIL FROM:<a@x>\r\nRCPT TO:<bad-wait@x>\r\n',
                 b'RCPT TO:<bob@x>\r\n'], quiet=1.3),
    'none-rcpt-refused': S('none', [b'MAIL FROM:<a@x>\r\nRCPT TO:<bad@x>\r\n',
                                    b'RCPT TO:<bob@x>\r\n']),
    'none-no-xclient': S('noxclient-none', [b'EHLO c\r\n', b'MAIL FROM:<a@x>\r\n',
                                            b'RCPT TO:<bob@x>\r\n']),
    'cve-2025-53859': S('none', [auth_plain(b'dave', b'guess')
                                 + b'MAIL FROM:<a@x>\r\nRCPT TO:<bob@x>\r\n'],
                        quiet=1.3),
    'proxy-smtp-auth': S('proxyauth', [b'EHLO x\r\n', PLAIN]),
    'proxy-smtp-auth-no-helo': S('proxyauth', [PLAIN]),
    'xclient-off': S('noxclient', [PLAIN, b'NOOP\r\n']),
    'xclient-off-ehlo': S('noxclient', [b'EHLO x\r\n', PLAIN, b'NOOP\r\n']),
    'xclient-off-proxy-auth': S('noxclient-proxyauth', [b'EHLO x\r\n', PLAIN]),
    'xclient-login-xtext': S('default', [auth_plain(b'odd user+x', b'pw')]),
    'backend-xclient-refused': S('default', [PLAIN],
                                 replies={'XCLIENT': b'550 5.7.0 no\r\n'}),
    'backend-refusal-relayed': S('passerror', [PLAIN], replies={
        'XCLIENT': b'550-5.7.0 not\r\n550 5.7.0 ok\r\n'}),
    'backend-multiline': S('none', [b'MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n'], replies={
        'greeting': b'220-hello\r\n220 there\r\n', 'RCPT': b'250-one\r\n250 two\r\n'}),
    'greeting-delay-early': S('delay', [b'EHLO x\r\n'], early=True),
    'greeting-delay-patient': S('delay', [b'EHLO x\r\n', b'QUIT\r\n'], quiet=0.5),
}

# Where nginx 1.22 and gmailproxy differ, why, and exactly how: (part, what nginx
# produced, what gmailproxy produces instead); parts are 0 client received, 1 auth
# service sent (requests joined), 2 backend sent. Everything else must be identical.
CLIENT_PART, AUTH_PART, BACKEND_PART = 0, 1, 2


def request(attempt: int, rest: bytes, method: bytes = b'none',
            user: bytes = b'') -> bytes:
    """An auth request as both proxies build it here."""
    return (b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: %s\r\n'
            b'Auth-User: %s\r\nAuth-Pass: \r\nAuth-Protocol: smtp\r\n'
            b'Auth-Login-Attempt: %d\r\nClient-IP: 127.0.0.1\r\n'
            b'Client-Host: [UNAVAILABLE]\r\n%s\r\n' % (method, user, attempt, rest))


DIFFERENT = {
    # nginx before 1.29.2 sends the XCLIENT LOGIN= value raw; current nginx and
    # gmailproxy encode it as xtext (RFC 3461).
    'xclient-login-xtext': [
        (BACKEND_PART, b' LOGIN=odd user+x ', b' LOGIN=odd+20user+2Bx ')],
    # Debian's patch for CVE-2025-53859 in nginx 1.22 keeps a failed AUTH's login and
    # password for the next RCPT (Auth-Method none, and XCLIENT LOGIN=); nginx 1.29.1
    # and gmailproxy forget them when MAIL FROM is accepted.
    'cve-2025-53859': [
        (AUTH_PART, b'Auth-Method: none\r\nAuth-User: dave\r\nAuth-Pass: guess\r\n',
         b'Auth-Method: none\r\nAuth-User: \r\nAuth-Pass: \r\n'),
        (BACKEND_PART, b'XCLIENT ADDR=127.0.0.1 LOGIN=dave NAME=',
         b'XCLIENT ADDR=127.0.0.1 NAME=')],
    # nginx closes the session after the auth service refuses a recipient without
    # Auth-Wait; gmailproxy goes on, so the client may try other recipients.
    'none-rcpt-refused': [
        (CLIENT_PART, b'535 5.7.0 No such user\r\n',
         b'535 5.7.0 No such user\r\n250 2.1.5 Ok\r\n'),
        (AUTH_PART, b'Auth-SMTP-To: RCPT TO:<bad@x>\r\n\r\n',
         b'Auth-SMTP-To: RCPT TO:<bad@x>\r\n\r\n' + request(
             2, b'Auth-SMTP-Helo: \r\nAuth-SMTP-From: MAIL FROM:<a@x>\r\n'
                b'Auth-SMTP-To: RCPT TO:<bob@x>\r\n')),
        (BACKEND_PART, b'', b'EHLO mx.test.example\r\n'
                            b'XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n'
                            b'MAIL FROM:<a@x>\r\nRCPT TO:<bob@x>\r\n')],
    # nginx 1.22 authenticates "AUTH EXTERNAL <initial response>" even when external is
    # not in smtp_auth (only the challenge form is checked); gmailproxy refuses both
    # forms, as smtp_auth (and the spec) say.
    'auth-external-ir-disabled': [
        (CLIENT_PART, b'235 2.0.0 OK\r\n250 2.0.0 Ok\r\n',
         b'500 5.5.1 Invalid command\r\n250 2.0.0 OK\r\n'),
        (AUTH_PART, request(1, b'', b'external', b'alice'), b''),
        (BACKEND_PART, b'EHLO mx.test.example\r\nXCLIENT ADDR=127.0.0.1 LOGIN=alice '
                       b'NAME=[UNAVAILABLE]\r\nNOOP\r\n', b'')],
}

# Waiting for session.authenticate to go on after a refused RCPT (issue 7 report).
PENDING = set()


def refuse(req):
    """The auth service's verdicts on recipients (smtp_auth none) named bad*."""
    to = req.get('Auth-SMTP-To') or ''
    if 'bad-wait' in to:
        return http_response([('Auth-Status', 'No such user'), ('Auth-Wait', '1'),
                              ('Auth-Error-Code', '550 5.1.1')])
    if 'bad' in to:
        return http_response([('Auth-Status', 'No such user')])
    return None


USERS = {'alice': {'password': 'secret'}, 'odd user+x': {'password': 'pw'},
         'carol': {'password': 'x', 'status': 'Try later', 'error_code': '451 4.3.0'},
         'dave': {'password': 'x', 'status': 'Invalid login or password', 'wait': 1}}


@pytest.fixture(scope='module')
def both(tmp_path_factory):
    """Per proxy: its own auth service and backend (so both run at once), and one port
    per SERVERS entry; started once for all scripts."""
    ports = free_ports(2 * len(SERVERS))
    ports = {'nginx': dict(zip(SERVERS, ports)),
             'gmailproxy': dict(zip(SERVERS, ports[len(SERVERS):]))}
    sides, started = {}, []
    try:
        for proxy, extra in (('nginx', ''), ('gmailproxy', 'auth_http_keepalive off;')):
            backend = FakeBackend('smtp')
            auth = RecordingAuthServer(users=USERS, ports={'smtp': backend.port},
                                       relay=lambda req: True).start()
            auth.responder = refuse
            started += [auth, backend]
            servers = ''.join(SERVER % (ports[proxy][name], SERVERS[name])
                              for name in SERVERS)
            text = MAIL % {'auth': auth.url, 'extra': extra, 'servers': servers}
            if proxy == 'nginx':
                server = Nginx(text)
            else:
                server = GmailProxy('events { }\n' + text,
                                    tmp_path_factory.mktemp('gmailproxy'))
            started.append(server)
            server.start(list(ports[proxy].values()))
            sides[proxy] = (ports[proxy], auth, backend)
        yield sides
    finally:
        for thing in reversed(started):
            thing.stop()


def run(side, script):
    ports, auth, backend = side
    auth.requests.clear()
    backend.received = b''
    backend.replies = dict(script.replies)
    # settled: a final reply line (``NNN text``) and SETTLE seconds more, or script.quiet
    client = exchange(ports[script.server], script.chunks,
                      lambda got: SETTLE if _FINAL.search(got) else script.quiet,
                      greeting=not script.early)
    time.sleep(0.05)
    return client, b''.join(auth.requests), backend.received


WAITING = pytest.mark.xfail(strict=True, reason='needs the session.authenticate '
                            'change for refused RCPTs; then empty PENDING')


@pytest.mark.parametrize('name', [pytest.param(name, marks=WAITING) if name in PENDING
                                  else name for name in sorted(SCRIPTS)])
def test_same_as_nginx(both, name):
    script = SCRIPTS[name]
    jobs = {proxy: gevent.spawn(run, side, script) for proxy, side in both.items()}
    gevent.joinall(list(jobs.values()), timeout=30, raise_error=True)
    expected = list(jobs['nginx'].value)
    for part, nginx_bytes, ours in DIFFERENT.get(name, ()):
        assert nginx_bytes in expected[part], 'nginx no longer differs here'
        expected[part] = expected[part].replace(nginx_bytes, ours)
    got = jobs['gmailproxy'].value
    for part, label in enumerate(('client received', 'auth sent', 'backend sent')):
        assert got[part] == expected[part], label
