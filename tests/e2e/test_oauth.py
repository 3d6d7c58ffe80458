"""XOAUTH2 and OAUTHBEARER end to end: curl --oauth2-bearer and raw clients ->
gmailproxy (subprocess) -> real Dovecot (IMAP, POP3), a checking SMTP backend and a
real Postfix.

The auth service (a RecordingAuthServer responder) checks the token. Dovecot checks the
replayed token too: with the xoauth2/oauthbearer mechanisms, Dovecot 2.3 verifies the
token as the password of a passdb, so a passwd-file where carol's password is her token
stands in for an OAuth introspection server. The SMTP backend is an in-process server
that accepts only the expected ``AUTH XOAUTH2 <b64>``/``AUTH OAUTHBEARER <b64>``.
"""
import shutil
import socket
import subprocess

import gevent
import pytest

from tests.support.auth import RecordingAuthServer, b64, http_response
from tests.support.backends import Dovecot
from tests.support.fake_backend import LineServer
from tests.support.net import Client, free_ports
from tests.support.proxyproc import GmailProxy

TOKEN = 'ya29.carol-T0ken_e2e'             # carol's; Dovecot's passwd-file has it too
FALLBACK = 'ya29.bob-for-alice'            # answered with Auth-User/Auth-Pass alice
USERS = {'alice': 'secret', 'carol': TOKEN}
SERVERS = {      # name: (protocol, directives)
    'imap_xoauth2': ('imap', 'imap_auth xoauth2;'),
    'imap_both': ('imap', 'imap_auth xoauth2 oauthbearer; '
                          'imap_capabilities IMAP4rev1 SASL-IR;'),
    'pop3_xoauth2': ('pop3', 'pop3_auth xoauth2;'),
    'pop3_both': ('pop3', 'pop3_auth xoauth2 oauthbearer;'),
    'smtp_xoauth2': ('smtp', 'smtp_auth xoauth2; proxy_smtp_auth on; xclient off;'),
    'smtp_both': ('smtp', 'smtp_auth xoauth2 oauthbearer; proxy_smtp_auth on; '
                          'xclient off;'),
    'smtp_xclient': ('smtp', 'smtp_auth xoauth2;'),
}
CURL_TIMEOUT = 20


CAROL_XOAUTH2 = b64(b'user=carol\x01auth=Bearer ya29.carol-T0ken_e2e\x01\x01')
CAROL_BEARER = b64(b'n,a=carol,\x01auth=Bearer ya29.carol-T0ken_e2e\x01\x01')
XOAUTH2_ERROR = b64(b'{"status":"401","schemes":"bearer","scope":"mail"}')
BEARER_ERROR = b64(b'{"status":"invalid_token","scope":"mail"}')


class SmtpBackend(LineServer):
    """Accepts carol's token only (else the XOAUTH2 error dialogue and 535), then
    MAIL/RCPT/DATA; keeps the lines and the messages."""

    def __init__(self):
        self.messages: list[bytes] = []
        super().__init__()

    def greeting(self) -> bytes:
        return b'220 backend ESMTP\r\n'

    def answer(self, sock, f, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb in (b'EHLO', b'HELO'):
            return b'250-backend\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n'
        if verb == b'AUTH':
            if line in (b'AUTH XOAUTH2 ' + CAROL_XOAUTH2 + b'\r\n',
                        b'AUTH OAUTHBEARER ' + CAROL_BEARER + b'\r\n'):
                return b'235 2.7.0 Accepted\r\n'
            return b'535 5.7.8 Username and Password not accepted\r\n'
        if verb in (b'MAIL', b'RCPT'):
            return b'250 2.1.0 Ok\r\n'
        if verb == b'DATA':
            sock.sendall(b'354 go ahead\r\n')
            body = b''
            while True:
                data = f.readline(65536)
                if data in (b'.\r\n', b''):
                    break
                body += data
            self.messages.append(body)
            return b'250 2.0.0 queued\r\n'
        if verb == b'QUIT':
            sock.sendall(b'221 2.0.0 bye\r\n')
            return None                     # ends the connection
        return b'502 5.5.2 unknown\r\n'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Dovecot, the SMTP backend, the auth service and one gmailproxy process with a
    server per case (``world.ports[name]``); ``world.backends['smtp_xclient']`` may be
    pointed at a Postfix by a test."""
    if shutil.which('curl') is None:
        pytest.skip('curl not installed')
    dovecot = Dovecot(users=USERS, auth_mechanisms='plain login xoauth2 oauthbearer')
    dovecot.start()
    smtp = SmtpBackend()
    auth = RecordingAuthServer().start()
    names = list(SERVERS)
    ports = dict(zip(names, free_ports(len(names))))
    by_protocol = {'imap': dovecot.imap_port, 'pop3': dovecot.pop3_port,
                   'smtp': smtp.port}
    backends = {name: by_protocol[proto] for name, (proto, _) in SERVERS.items()}

    def responder(req):
        """Checks the token: carol's is replayed, FALLBACK gets alice's password."""
        method = req.get('Auth-Method')
        user, token = req.unescaped('Auth-User'), req.unescaped('Auth-Pass')
        server = [('Auth-Status', 'OK'), ('Auth-Server', '127.0.0.1'),
                  ('Auth-Port', str(backends[req.get('X-Server')]))]
        if method not in ('xoauth2', 'oauthbearer'):
            return http_response([('Auth-Status', 'Invalid login or password')])
        if token == TOKEN and user in ('carol', ''):
            named = [] if user else [('Auth-User', 'carol')]   # OAUTHBEARER without
            return http_response(server + named)
        if token == FALLBACK:
            return http_response(server + [('Auth-User', 'alice'),
                                           ('Auth-Pass', 'secret')])
        return http_response([('Auth-Status', 'Invalid login or password')])

    auth.responder = responder
    conf = 'events { }\nmail {\n    auth_http %s;\n    server_name proxy.example;\n' \
           '    oauth_scope mail;\n' % auth.url
    for name, (proto, directives) in SERVERS.items():
        conf += ('    server { listen 127.0.0.1:%d; protocol %s; %s '
                 'auth_http_header X-Server %s; }\n' % (ports[name], proto, directives,
                                                         name))
    proxy = GmailProxy(conf + '}\n', tmp_path_factory.mktemp('oauth-proxy'))
    proxy.start(list(ports.values()))
    world = type('World', (), {})()
    world.dovecot, world.smtp, world.auth, world.proxy = dovecot, smtp, auth, proxy
    world.ports, world.backends = ports, backends
    yield world
    proxy.stop()
    auth.stop()
    smtp.server.stop(timeout=1)
    dovecot.stop()


def curl(url: str, user: str, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['curl', '-sS', '--max-time', '10', '-u', user + ':',
                           '--oauth2-bearer', token, url, *args],
                          capture_output=True, timeout=CURL_TIMEOUT)


def oauth_requests(world) -> list:
    return [(r.get('Auth-Method'), r.unescaped('Auth-User'), r.unescaped('Auth-Pass'),
             r.get('Auth-Protocol')) for r in world.auth.parsed]


def wait_log(read, text: str, timeout: float = 5.0) -> str:
    with gevent.Timeout(timeout, AssertionError('%r not in:\n%s' % (text, read()))):
        while text not in read():
            gevent.sleep(0.05)
    return read()


# --- curl --oauth2-bearer, token replayed to a backend that checks it -----------------

@pytest.mark.parametrize('server, mechanism', [('imap_xoauth2', 'XOAUTH2'),
                                               ('imap_both', 'OAUTHBEARER')])
def test_curl_imap_token_replayed_to_dovecot(world, server, mechanism):
    """curl takes OAUTHBEARER when both are offered; with SASL-IR it sends an initial
    response, without it answers the empty challenge."""
    before = len(world.auth.parsed)
    done = curl('imap://127.0.0.1:%d/' % world.ports[server], 'carol', TOKEN)
    assert done.returncode == 0, done.stderr
    assert b'INBOX' in done.stdout
    assert oauth_requests(world)[before:] == [
        (mechanism.lower(), 'carol', TOKEN, 'imap')]
    wait_log(world.dovecot.log_text, 'imap-login: Info: Login: user=<carol>, method=%s'
             % mechanism)


@pytest.mark.parametrize('server, mechanism', [('pop3_xoauth2', 'XOAUTH2'),
                                               ('pop3_both', 'OAUTHBEARER')])
def test_curl_pop3_token_replayed_to_dovecot(world, server, mechanism):
    before = len(world.auth.parsed)
    done = curl('pop3://127.0.0.1:%d/' % world.ports[server], 'carol', TOKEN)
    assert done.returncode == 0, done.stderr
    assert oauth_requests(world)[before:] == [
        (mechanism.lower(), 'carol', TOKEN, 'pop3')]
    wait_log(world.dovecot.log_text, 'pop3-login: Info: Login: user=<carol>, method=%s'
             % mechanism)


@pytest.mark.parametrize('server, line', [
    ('smtp_xoauth2', b'AUTH XOAUTH2 ' + CAROL_XOAUTH2 + b'\r\n'),
    ('smtp_both', b'AUTH OAUTHBEARER ' + CAROL_BEARER + b'\r\n'),
])
def test_curl_smtp_token_replayed_to_checking_backend(world, tmp_path, server, line):
    msg = tmp_path / 'msg.eml'
    msg.write_bytes(b'Subject: %s\r\n\r\nhello\r\n' % server.encode())
    before = len(world.smtp.messages)
    done = curl('smtp://127.0.0.1:%d' % world.ports[server], 'carol', TOKEN,
                '--mail-from', 'carol@example.com', '--mail-rcpt', 'bob@example.com',
                '-T', str(msg))
    assert done.returncode == 0, done.stderr
    assert line in world.smtp.lines
    assert world.smtp.messages[before:] == [b'Subject: %s\r\n\r\nhello\r\n'
                                           % server.encode()]
    method = 'oauthbearer' if b'OAUTHBEARER' in line else 'xoauth2'
    assert oauth_requests(world)[-1] == (method, 'carol', TOKEN, 'smtp')


# --- Auth-User + Auth-Pass in the answer: the normal login to real servers ---------

@pytest.mark.parametrize('scheme, server', [('imap', 'imap_xoauth2'),
                                            ('pop3', 'pop3_xoauth2')])
def test_curl_answer_with_login_and_password_logs_in_to_dovecot(world, scheme, server):
    before = len(world.dovecot.log_text())
    done = curl('%s://127.0.0.1:%d/' % (scheme, world.ports[server]), 'bob', FALLBACK)
    assert done.returncode == 0, done.stderr
    assert oauth_requests(world)[-1] == ('xoauth2', 'bob', FALLBACK, scheme)
    log = wait_log(world.dovecot.log_text, 'Login: user=<alice>')
    assert '%s-login: Info: Login: user=<alice>, method=PLAIN' % scheme in log[before:]
    proxy_log = world.proxy.wait_log('login: "alice", upstream: 127.0.0.1:%d'
                                     % world.backends[server])
    assert FALLBACK not in proxy_log and TOKEN not in proxy_log


def test_curl_smtp_answer_with_login_reaches_postfix_in_xclient(world, make_postfix,
                                                               tmp_path):
    postfix = make_postfix()
    world.backends['smtp_xclient'] = postfix.port
    msg = tmp_path / 'msg.eml'
    msg.write_bytes(b'Subject: via xclient\r\n\r\nhello\r\n')
    done = curl('smtp://127.0.0.1:%d' % world.ports['smtp_xclient'], 'bob', FALLBACK,
                '--mail-from', 'alice@test.example', '--mail-rcpt', 'bob@test.example',
                '-T', str(msg))
    assert done.returncode == 0, done.stderr
    assert b'via xclient' in postfix.wait_messages('bob', 1, timeout=15)[0]
    assert 'sasl_username=alice' in postfix.log_text()


# --- refusals, byte for byte, and against Dovecot's own -------------------------------

def test_curl_refused_token_is_login_denied(world):
    done = curl('imap://127.0.0.1:%d/' % world.ports['imap_xoauth2'], 'carol',
                'expired')
    assert done.returncode == 67, (done.returncode, done.stderr)      # LOGIN_DENIED
    assert oauth_requests(world)[-1] == ('xoauth2', 'carol', 'expired', 'imap')


def dialogue(port: int, lines: list, greeting: bytes) -> bytes:
    """Send ``lines`` one by one after the greeting; all that comes back, to close."""
    with Client('127.0.0.1', port) as c:
        c.expect(greeting)
        got = b''
        for line in lines[:-1]:
            c.send(line)
            got += c.readline()
        c.send(lines[-1])
        return got + c.recv_all_until_close(timeout=5)


BAD_XOAUTH2 = b64(b'user=carol\x01auth=Bearer expired\x01\x01')
BAD_BEARER = b64(b'n,a=carol,\x01auth=Bearer expired\x01\x01')


@pytest.mark.parametrize('server, lines, expected', [
    ('imap_xoauth2', [b'a AUTHENTICATE XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n', b'\r\n'],
     b'+ ' + XOAUTH2_ERROR + b'\r\na NO Invalid login or password\r\n'),
    ('imap_both', [b'a AUTHENTICATE OAUTHBEARER ' + BAD_BEARER + b'\r\n', b'AQ==\r\n'],
     b'+ ' + BEARER_ERROR + b'\r\na NO Invalid login or password\r\n'),
    ('pop3_both', [b'AUTH XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n', b'\r\n'],
     b'+ ' + XOAUTH2_ERROR + b'\r\n-ERR Invalid login or password\r\n'),
    ('pop3_both', [b'AUTH OAUTHBEARER ' + BAD_BEARER + b'\r\n', b'AQ==\r\n'],
     b'+ ' + BEARER_ERROR + b'\r\n-ERR Invalid login or password\r\n'),
    ('smtp_both', [b'AUTH XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n', b'\r\n'],
     b'334 ' + XOAUTH2_ERROR + b'\r\n535 5.7.8 Invalid login or password\r\n'),
    ('smtp_both', [b'AUTH OAUTHBEARER ' + BAD_BEARER + b'\r\n', b'AQ==\r\n'],
     b'334 ' + BEARER_ERROR + b'\r\n535 5.7.8 Invalid login or password\r\n'),
])
def test_refusal_bytes(world, server, lines, expected):
    greeting = {'imap': b'* OK IMAP4 ready\r\n', 'pop3': b'+OK POP3 ready\r\n',
                'smtp': b'220 proxy.example ESMTP ready\r\n'}[SERVERS[server][0]]
    assert dialogue(world.ports[server], lines, greeting) == expected


@pytest.mark.parametrize('proto, lines', [
    ('imap', [b'a AUTHENTICATE XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n']),
    ('pop3', [b'AUTH XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n']),
])
def test_error_challenge_same_as_dovecots(world, proto, lines):
    """With ``oauth_scope mail`` the XOAUTH2 error challenge is the very line Dovecot
    sends for a refused token."""
    port = {'imap': world.dovecot.imap_port, 'pop3': world.dovecot.pop3_port}[proto]
    with socket.create_connection(('127.0.0.1', port), timeout=5) as sock:
        c = Client(sock=sock)
        c.readline()
        c.send(lines[0])
        dovecot_line = c.readline()
    server = {'imap': 'imap_xoauth2', 'pop3': 'pop3_xoauth2'}[proto]
    greeting = {'imap': b'* OK IMAP4 ready\r\n', 'pop3': b'+OK POP3 ready\r\n'}[proto]
    with Client('127.0.0.1', world.ports[server]) as c:
        c.expect(greeting)
        c.send(lines[0])
        assert c.readline() == dovecot_line == b'+ ' + XOAUTH2_ERROR + b'\r\n'
