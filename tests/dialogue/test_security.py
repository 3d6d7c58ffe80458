"""Security tests (issue 11), each named after what it guards, through the in-process
proxy. Already covered elsewhere and not repeated here:

* STARTTLS command injection, one packet, all three protocols:
  tests/dialogue/test_tls.py::test_starttls_injection and ::test_imap_starttls_injection;
  plaintext after the STARTTLS reply breaking the handshake:
  ::test_imap_starttls_plaintext_after_reply_breaks_handshake.
* ``starttls only`` refusing the ordinary credential commands:
  test_tls.py::test_imap_starttls_only_refuses_credentials, ::test_starttls_only_refuses_
  credentials (POP3, SMTP); here only the bypass attempts those do not try.
* CR/LF in SASL credentials: test_imap.py::test_crlf_in_sasl_credentials_refused (one
  AUTHENTICATE PLAIN), test_pop3.py::test_crlf_in_sasl_credentials_refused (four); here
  the other mechanisms, IMAP literals, and SMTP.
* CVE-2025-53859: test_smtp.py::test_failed_auth_credentials_not_reused_by_mail (AUTH
  PLAIN); here every mechanism and an abandoned AUTH LOGIN.
"""
import re
import socket
import time

import gevent
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.auth import b64
from tests.support.certs import PKI
from tests.support.faults import (FaultAuth, Scripted, answer, backend,  # noqa: F401
                                  no_leaks, scripted)
from tests.support.fake_backend import FakeBackend
from tests.support.net import Client

PASSWORD = b'Pw-7f3k9Q_zX'
CONF = '''
mail {
    error_log {log} %(level)s;
    auth_http {auth};
    auth_http_keepalive off;
    auth_http_timeout 1s;
    timeout 2s;
    server_name mx.example.com;
    %(directives)s
    server { listen 127.0.0.1:{port}%(listen)s; protocol %(proto)s; %(server)s }
}
'''
GREETING = {'imap': b'* OK IMAP4 ready\r\n', 'pop3': b'+OK POP3 ready',
            'smtp': b'220 mx.example.com ESMTP ready\r\n'}
INVALID = {'imap': b'BAD invalid command\r\n', 'pop3': b'-ERR invalid command\r\n',
           'smtp': b'500 5.5.1 Invalid command\r\n'}


def conf(proto, directives='', level='info', listen='', server=''):
    return CONF % dict(proto=proto, directives=directives, level=level, listen=listen,
                       server=server)


@pytest.fixture
def backends(backends, auth):
    """The shared backends (conftest.py), with every SMTP relay allowed."""
    auth.relay = lambda req: True
    return backends


def greeted(proxy, proto) -> Client:
    return proxy.client(greeting=GREETING[proto])


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp('pki'))


def tls_directives(pki, extra=''):
    cert, key = pki.server_files('rsa')
    return 'ssl_certificate %s; ssl_certificate_key %s; %s' % (cert, key, extra)


# --- STARTTLS ------------------------------------------------------------------------

def test_starttls_injection_of_smtp_relay_commands(mailproxy, backends, auth, pki):
    """With ``smtp_auth none`` a MAIL/RCPT pipelined behind STARTTLS is discarded, like
    AUTH is (test_tls.py): no relay request, no backend connection, no reply."""
    proxy = mailproxy(conf('smtp', tls_directives(pki, 'starttls on; smtp_auth none;')))
    c = greeted(proxy, 'smtp')
    c.send(b'EHLO x\r\n')
    c.read_lines_until(b'250 ')
    c.send(b'STARTTLS\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n')
    c.expect(b'220 2.0.0 Start TLS\r\n')
    c.starttls(pki.client_context(), server_hostname='localhost')
    c.send(b'NOOP\r\n')
    c.expect(b'250 2.0.0 OK\r\n')
    assert c.silent(0.3)
    c.send(b'RCPT TO:<b@y>\r\n')          # the MAIL before TLS is forgotten too
    c.expect(b'503 5.5.1 Bad sequence of commands\r\n')
    assert auth.requests == [] and backends['smtp'].connections == 0


BYPASS = {
    'imap': [b'a1 login alice secret\r\n', b'a2 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n', b'a3 LOGIN "alice" "secret"\r\n',
             b'a4 authenticate plain ' + b64(b'\0alice\0secret') + b'\r\n',
             b'a5 AUTHENTICATE CRAM-MD5\r\n', b'a6 AUTHENTICATE EXTERNAL =\r\n',
             b'a7 AUTHENTICATE XOAUTH2 ' + b64(b'user=alice\x01auth=Bearer t\x01\x01') + b'\r\n'],
    'pop3': [b'user alice\r\n', b'PASS secret\r\n', b'apop alice 0123456789abcdef0123456789abcdef\r\n',
             b'AUTH CRAM-MD5\r\n', b'AUTH EXTERNAL =\r\n', b'auth plain ' + b64(b'\0alice\0secret') + b'\r\n'],
    'smtp': [b'auth plain ' + b64(b'\0alice\0secret') + b'\r\n', b'AUTH LOGIN ' + b64(b'alice') + b'\r\n',
             b'AUTH CRAM-MD5\r\n', b'AUTH EXTERNAL =\r\n', b'AuTh PlAiN\r\n'],
}
AUTH_ALL = ('imap_auth plain login cram-md5 external; pop3_auth plain apop cram-md5 external; '
            'smtp_auth plain login cram-md5 external;')


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_starttls_only_bypass_attempts_refused(mailproxy, backends, auth, pki, proto):
    """Lower case, literals, every mechanism (also those only enabled here), a mechanism
    never offered: all refused before TLS, nothing reaches the auth service."""
    proxy = mailproxy(conf(proto, tls_directives(pki, 'starttls only; max_errors 50; '
                                                 + AUTH_ALL)))
    c = greeted(proxy, proto)
    if proto == 'smtp':
        c.send(b'EHLO x\r\n')
        c.read_lines_until(b'250 ')
    for line in BYPASS[proto]:
        c.send(line)
        tag = line.split(b' ')[0] + b' ' if proto == 'imap' else b''
        c.expect(tag + INVALID[proto])
    assert auth.requests == []
    assert backends[proto].connections == 0


def test_starttls_only_not_bypassed_by_proxy_protocol_ssl_tlv(mailproxy, backends, auth, pki):
    """A PROXY v2 header claiming the client used TLS (SSL TLV) does not make the
    session TLS: ``starttls only`` still refuses LOGIN."""
    from gmailproxy import proxy_protocol
    proxy = mailproxy(conf('imap', tls_directives(pki, 'starttls only; imap_id off;'),
                           listen=' proxy_protocol'))
    c = proxy.client()
    c.send(proxy_protocol.build_v2(('192.0.2.1', 40000), ('127.0.0.1', 143),
                                   {'version': 'TLSv1.3', 'cn': 'alice', 'sni': 'x'}))
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS STARTTLS LOGINDISABLED\r\n'
             b'a1 OK completed\r\n')
    c.send(b'a2 LOGIN alice secret\r\n')
    c.expect(b'a2 BAD invalid command\r\n')
    assert auth.requests == []


# --- CR/LF in credentials ------------------------------------------------------------

CRLF_SCRIPTS = {
    'imap': [
        b'1 AUTHENTICATE PLAIN\r\n' + b64(b'\0alice\r\n2 DELETE INBOX\0secret') + b'\r\n',
        b'1 AUTHENTICATE LOGIN ' + b64(b'alice\n2 DELETE INBOX') + b'\r\n',
        b'1 AUTHENTICATE LOGIN\r\n' + b64(b'alice') + b'\r\n' + b64(b'secret\r\n2 DELETE x')
        + b'\r\n',
        b'1 LOGIN {18}\r\nalice\r\n2 LOGOUT\r\n x\r\n',
        b'1 LOGIN alice {19}\r\nsecret\r\n2 DELETE x\r\n',
        b'1 LOGIN alice "sec\\\rret"\r\n',
    ],
    'pop3': [
        b'AUTH LOGIN\r\n' + b64(b'alice') + b'\r\n' + b64(b'secret\r\nDELE 1') + b'\r\n',
        b'USER alice\rDELE 1\r\n',
        b'USER alice\r\nPASS sec\rret\r\n',
    ],
    'smtp': [
        b'AUTH PLAIN ' + b64(b'\0alice\0secret\r\nRCPT TO:<x@y>') + b'\r\n',
        b'AUTH PLAIN\r\n' + b64(b'\0alice\nMAIL FROM:<x>\0secret') + b'\r\n',
        b'AUTH LOGIN ' + b64(b'alice\r\nDATA') + b'\r\n',
        b'AUTH LOGIN\r\n' + b64(b'alice') + b'\r\n' + b64(b'secret\r\nQUIT') + b'\r\n',
        b'AUTH EXTERNAL ' + b64(b'alice\r\nRSET') + b'\r\n',
    ],
}


@pytest.mark.parametrize('proto, script', [(p, s) for p, scripts in CRLF_SCRIPTS.items()
                                           for s in scripts])
def test_crlf_in_decoded_credentials_never_reaches_backend(mailproxy, backends, auth, proto,
                                                           script):
    """Refused as an invalid command: no auth request, no backend connection."""
    proxy = mailproxy(conf(proto, AUTH_ALL))
    c = greeted(proxy, proto)
    c.send(script)
    c.read_lines_until((b'1 ' if proto == 'imap' else b'') + INVALID[proto][:4])
    quit = {'imap': b'9 LOGOUT\r\n', 'pop3': b'QUIT\r\n', 'smtp': b'QUIT\r\n'}[proto]
    c.send(quit)
    c.read_lines_until({'imap': b'9 OK', 'pop3': b'+OK', 'smtp': b'221'}[proto])
    assert auth.requests == []
    assert backends[proto].connections == 0


# --- auth_http escaping --------------------------------------------------------------

@pytest.mark.parametrize('proto, lines, user, password', [
    ('imap', [b'a1 LOGIN "al ice%" {7}\r\n', b'p w%\x00\xc3\xa9\r\n'],
     b'al%20ice%25', b'p%20w%25%00\xc3\xa9'),
    ('imap', [b'a1 AUTHENTICATE PLAIN ' + b64(b'\0al ice%\0p w%\x00\xc3\xa9') + b'\r\n'],
     b'al%20ice%25', b'p%20w%25%00\xc3\xa9'),
    ('pop3', [b'USER al ice%\r\n', b'PASS p w%\xc3\xa9\r\n'], b'al%20ice%25',
     b'p%20w%25\xc3\xa9'),
    ('smtp', [b'AUTH PLAIN ' + b64(b'\0al ice%\0p w%\x00\xc3\xa9\t\x7f') + b'\r\n'],
     b'al%20ice%25', b'p%20w%25%00\xc3\xa9%09\x7f'),
])
def test_auth_http_escapes_user_and_password(mailproxy, backends, auth, proto, lines, user,
                                             password):
    """Space, %, NUL and controls as upper-case %XX; bytes >= 0x7F as they are
    (auth_http.md section 2). CR and LF never get this far (tests above)."""
    auth.responder = lambda req: (b'HTTP/1.0 200 OK\r\nAuth-Status: Invalid login\r\n\r\n')
    proxy = mailproxy(conf(proto))
    c = greeted(proxy, proto)
    for line in lines:
        c.send(line)
        gevent.sleep(0.05)
    c.recv_all_until_close(timeout=5)
    request = auth.wait_requests(1)[0]
    assert b'\r\nAuth-User: ' + user + b'\r\n' in request, request
    assert b'\r\nAuth-Pass: ' + password + b'\r\n' in request, request


# --- CVE-2025-53859: stale credentials -----------------------------------------------

@pytest.mark.parametrize('failed', [
    b'AUTH LOGIN\r\n' + b64(b'alice') + b'\r\n' + b64(b'guess') + b'\r\n',
    b'AUTH LOGIN ' + b64(b'alice') + b'\r\n' + b64(b'guess') + b'\r\n',
    b'AUTH CRAM-MD5\r\n',       # answered with the digest below
    b'AUTH EXTERNAL ' + b64(b'alice') + b'\r\n',
])
def test_failed_auth_then_mail_sends_no_stale_credentials(mailproxy, backends, auth, failed):
    """CVE-2025-53859: after a failed AUTH (any mechanism; Auth-Wait keeps the session),
    MAIL/RCPT with ``smtp_auth none`` asks with empty Auth-User/Auth-Pass and XCLIENT
    carries no LOGIN=."""
    auth.users = {'alice': {'password': 'x', 'status': 'Invalid login or password',
                            'wait': 1}}
    proxy = mailproxy(conf('smtp', 'smtp_auth plain login cram-md5 external none;'))
    c = greeted(proxy, 'smtp')
    c.send(failed)
    if failed == b'AUTH CRAM-MD5\r\n':
        challenge = c.readline()
        assert challenge.startswith(b'334 ')
        c.send(b64(b'alice 0123456789abcdef0123456789abcdef') + b'\r\n')
    c.read_lines_until(b'535 ', timeout=5)
    c.send(b'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n')
    c.expect(b'250 2.0.0 OK\r\n250 2.1.5 Ok\r\n')
    second = auth.parsed[-1]
    assert second.get('Auth-Method') == 'none'
    assert second.get('Auth-User') == '' and second.get('Auth-Pass') == ''
    assert b'guess' not in auth.requests[-1] and b'alice' not in auth.requests[-1]
    assert not any(b'LOGIN=' in line for line in backends['smtp'].lines)


def test_abandoned_auth_login_leaves_no_credentials(mailproxy, backends, auth):
    """AUTH LOGIN cut off after the user name (an invalid password line) sets nothing:
    the relay request that follows carries no user name."""
    proxy = mailproxy(conf('smtp', 'smtp_auth login none;'))
    c = greeted(proxy, 'smtp')
    c.send(b'AUTH LOGIN ' + b64(b'alice') + b'\r\n')
    c.expect(b'334 UGFzc3dvcmQ6\r\n')
    c.send(b'*not base64*\r\n')
    c.expect(b'500 5.5.1 Invalid command\r\n')
    c.send(b'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n')
    c.expect(b'250 2.0.0 OK\r\n250 2.1.5 Ok\r\n')
    assert auth.parsed[0].get('Auth-User') == '' and auth.parsed[0].get('Auth-Pass') == ''
    assert not any(b'LOGIN=' in line for line in backends['smtp'].lines)


# --- IMAP literals -------------------------------------------------------------------

@pytest.mark.parametrize('line, reply, closes', [
    (b'a1 LOGIN {99999999999}\r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {4294967295}\r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {' + b'9' * 200 + b'}\r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {99999999999+}\r\n', b'a1 BAD invalid command\r\n', True),
    (b'a1 LOGIN {4294967295+}\r\n', b'a1 BAD invalid command\r\n', True),
    (b'a1 LOGIN {-1}\r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {-1+}\r\n', b'a1 BAD invalid command\r\n', True),
    (b'a1 LOGIN {0x10}\r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {5}x\r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {5} \r\n', b'a1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {5}\r\nalicexyz secret\r\n', b'+ OK\r\na1 BAD invalid command\r\n', False),
    (b'a1 LOGIN {5}\r\nalice\rsecret\r\n', b'+ OK\r\na1 BAD invalid command\r\n', False),
])
def test_imap_literal_absurd_negative_or_unterminated_refused(mailproxy, backends, auth, line,
                                                              reply, closes):
    """Refused at once (no wait for the announced bytes, nothing allocated for them);
    a refused LITERAL+ closes the session, since its bytes would follow unasked."""
    proxy = mailproxy(conf('imap', 'imap_id off;'))
    c = greeted(proxy, 'imap')
    began = time.monotonic()
    c.send(line)
    c.expect(reply, timeout=3)
    assert time.monotonic() - began < 1.5
    if closes:
        assert c.closed(timeout=3)
    else:
        c.send(b'a2 NOOP\r\n')
        c.expect(b'a2 OK completed\r\n')
    assert auth.requests == []


def test_imap_literals_summing_past_the_buffer_close(mailproxy, backends, auth):
    """Each literal fits, together they do not: too long command, session closed."""
    proxy = mailproxy(conf('imap', 'imap_id off; imap_client_buffer 1k;'))
    c = greeted(proxy, 'imap')
    c.send(b'a1 LOGIN {600}\r\n')
    c.expect(b'+ OK\r\n')
    c.send(b'u' * 600 + b' {600}\r\n')
    data = c.recv_all_until_close(timeout=3)
    assert data == b'a1 BAD invalid command\r\n', data
    proxy.wait_log(r'\[info\] .*client sent too long command ".*" while in auth state')
    assert auth.requests == []


# --- pipelining after the login ------------------------------------------------------

PIPELINES = {
    'imap': dict(login=b'a1 LOGIN alice secret\r\n',
                 after=b'a2 CAPABILITY\r\na3 NOOP\r\na4 ID NIL\r\na5 LOGOUT\r\n',
                 replies={'CAPABILITY': b'* CAPABILITY BACKEND\r\n{tag} OK backend\r\n',
                          'NOOP': b'{tag} OK backend noop\r\n', 'ID': b'{tag} OK backend id\r\n'},
                 expected=b'a1 OK logged in\r\n* CAPABILITY BACKEND\r\na2 OK backend\r\n'
                          b'a3 OK backend noop\r\na4 OK backend id\r\n* BYE bye\r\n'
                          b'a5 OK logged out\r\n',
                 lines=[b'a2 CAPABILITY\r\n', b'a3 NOOP\r\n', b'a4 ID NIL\r\n',
                        b'a5 LOGOUT\r\n']),
    'pop3': dict(login=b'USER alice\r\nPASS secret\r\n',
                 after=b'CAPA\r\nNOOP\r\nSTAT\r\nQUIT\r\n',
                 replies={'PASS': b'+OK backend pass\r\n', 'CAPA': b'+OK backend capa\r\n.\r\n',
                          'NOOP': b'+OK backend noop\r\n', 'STAT': b'+OK 0 0\r\n',
                          'QUIT': b'+OK backend bye\r\n'},
                 expected=b'+OK\r\n+OK backend pass\r\n+OK backend capa\r\n.\r\n'
                          b'+OK backend noop\r\n+OK 0 0\r\n+OK backend bye\r\n',
                 lines=[b'CAPA\r\n', b'NOOP\r\n', b'STAT\r\n', b'QUIT\r\n']),
    'smtp': dict(login=b'EHLO x\r\nAUTH PLAIN ' + b64(b'\0alice\0secret') + b'\r\n',
                 after=b'EHLO y\r\nNOOP\r\nRSET\r\nQUIT\r\n',
                 replies={'NOOP': b'250 backend noop\r\n', 'RSET': b'250 backend rset\r\n',
                          'QUIT': b'221 backend bye\r\n'},
                 expected=b'250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n235 2.0.0 OK\r\n'
                          b'250-backend\r\n250 8BITMIME\r\n250 backend noop\r\n'
                          b'250 backend rset\r\n221 backend bye\r\n',
                 lines=[b'EHLO y\r\n', b'NOOP\r\n', b'RSET\r\n', b'QUIT\r\n']),
}


@pytest.mark.parametrize('split', [False, True], ids=['one-packet', 'during-backend-login'])
@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_pipelined_commands_after_login_reach_backend_in_order(mailproxy, auth, proto, split):
    """Commands behind the authenticating one — also those the proxy answers itself
    before login (CAPABILITY, NOOP, ID, CAPA, EHLO) — go to the backend in order and
    only the backend answers them; sent while the backend login is still going on, they
    wait in the socket and are relayed the same way."""
    p = PIPELINES[proto]
    be = FakeBackend(proto, p['replies'])
    if split:
        delay = Scripted(lambda sock: _delayed_relay(sock, be.port))
        port = delay.port
    else:
        port = be.port
    auth.users = {'alice': {'password': 'secret', 'port': port}}
    auth.ports = {proto: port}
    try:
        proxy = mailproxy(conf(proto, 'imap_id on; xclient off;'))
        c = greeted(proxy, proto)
        if split:
            c.send(p['login'])
            gevent.sleep(0.1)              # the backend login is held up 0.3 s
            c.send(p['after'])
        else:
            c.send(p['login'] + p['after'])
        got = c.recv_all_until_close(timeout=5)
        assert got == p['expected'], got
        assert be.lines[-len(p['lines']):] == p['lines'], be.lines
    finally:
        be.stop()
        if split:
            delay.stop()


def _delayed_relay(sock, port):
    """A TCP relay to ``port`` that holds the backend's greeting back 0.3 s."""
    up = socket.create_connection(('127.0.0.1', port), timeout=5)
    gevent.sleep(0.3)

    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    workers = [gevent.spawn(pipe, sock, up), gevent.spawn(pipe, up, sock)]
    gevent.joinall(workers, timeout=10)
    up.close()


# --- nobody reaches a backend without the auth service's OK ------------------------------

STATUS = st.sampled_from([b'OK', b'OK ', b'ok', b' OK', b'Invalid login', b'OKAY', b'',
                          b'WAIT\x00', b'0', b'OK\t'])
HEADER = st.one_of(
    st.tuples(st.just(b'Auth-Status'), STATUS),
    st.tuples(st.sampled_from([b'Auth-Server', b'AUTH-SERVER', b'auth-server']),
              st.sampled_from([b'127.0.0.1', b'::1', b'localhost', b'', b'127.0.0.1 '])),
    st.tuples(st.just(b'Auth-Port'), st.sampled_from([b'{port}', b'0', b'x', b''])),
    st.tuples(st.sampled_from([b'Auth-Wait', b'Auth-Error-Code', b'Auth-User', b'X-Other']),
              st.sampled_from([b'0', b'x', b'bob', b'451 4.3.0'])),
)


def verdict(headers) -> bool:
    """nginx's rule (auth_http.md section 4-5): no rejecting Auth-Status, a usable
    Auth-Server and Auth-Port (the last of each when repeated, servers paired in order)."""
    statuses = [v.strip(b' ') for n, v in headers if n.lower() == b'auth-status']
    if any(s != b'OK' for s in statuses):
        return False
    servers = [v.rstrip(b' ') for n, v in headers if n.lower() == b'auth-server']
    ports = [v for n, v in headers if n.lower() == b'auth-port']
    return bool(servers) and bool(ports)


def test_no_backend_connection_without_auth_status_ok(mailproxy):
    """Property over scripted auth answers (hypothesis, one proxy for all examples):
    the proxy connects to a backend only when the answer carries no rejecting
    Auth-Status and names a backend — i.e. only after ``Auth-Status: OK``, or after no
    Auth-Status at all, which nginx takes as success (auth_http.md section 4); and a
    clean OK always connects."""
    be = FakeBackend('imap')
    fault = FaultAuth()
    proxy = mailproxy(conf('imap', 'imap_id off;'), auth=fault.url)

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(headers=st.lists(HEADER, max_size=6))
    def prop(headers):
        raw = b'HTTP/1.0 200 OK\r\n' + b''.join(
            n + b': ' + v.replace(b'{port}', b'%d' % be.port) + b'\r\n' for n, v in headers)
        fault.route(b'alice', answer(raw + b'\r\n'))
        before = be.connections
        c = proxy.client()
        try:
            c.expect(b'* OK IMAP4 ready\r\n')
            c.send(b'a1 LOGIN alice secret\r\n')
            got = c.readline(timeout=5)
        except EOFError:
            got = b''
        finally:
            c.close()
        gevent.sleep(0.02)
        connected = be.connections > before
        if connected:
            assert verdict(headers), raw
        statuses = [v for n, v in headers if n.lower() == b'auth-status']
        servers = [v for n, v in headers if n.lower() == b'auth-server']
        ports = [v for n, v in headers if n.lower() == b'auth-port']
        if (all(v == b'OK' for v in statuses) and servers and ports
                and set(servers) == {b'127.0.0.1'} and set(ports) == {b'{port}'}):
            assert connected and got == b'a1 OK logged in\r\n', (raw, got)

    try:
        prop()
    finally:
        fault.stop()
        be.stop()


# --- what the logs never contain -------------------------------------------------------

SECRET_B64 = [b64(PASSWORD), b64(b'\0alice\0' + PASSWORD), b64(b'alice\0' + PASSWORD)]


def _forms():
    out = [PASSWORD, PASSWORD.replace(b'_', b'%5F')]
    for blob in SECRET_B64:
        text = blob.rstrip(b'=')
        out += [text[i:i + 12] for i in range(0, max(len(text) - 12, 1), 4)]
    return out


LEAK_SESSIONS = {
    'imap': [
        [b'a1 LOGIN alice ' + PASSWORD + b'\r\n'],
        [b'a1 LOGIN alice {%d}\r\n' % len(PASSWORD), PASSWORD + b'\r\n'],
        [b'a1 AUTHENTICATE PLAIN ' + b64(b'\0alice\0' + PASSWORD) + b'\r\n'],
        [b'a1 AUTHENTICATE PLAIN\r\n', b64(b'\0alice\0' + PASSWORD) + b'\r\n'],
        [b'a1 AUTHENTICATE LOGIN\r\n', b64(b'alice') + b'\r\n', b64(PASSWORD) + b'\r\n'],
        [b'a1 LOGIN alice ' + PASSWORD + b'x' * 5000 + b'\r\n'],
        [b'a1 LOGIN alice ' + PASSWORD + b' ' + b'x' * 5000 + b'\r\n'],
        [b'a1 AUTHENTICATE PLAIN\r\n', b64(b'\0alice\0' + PASSWORD)[:-3] + b'!!\r\n'],
        [b'a1 LOGIN alice ' + PASSWORD + b'\r\na2 NOOP\r\n'],
    ],
    'pop3': [
        [b'USER alice\r\n', b'PASS ' + PASSWORD + b'\r\n'],
        [b'USER alice\r\n', b'PASS ' + PASSWORD + b'x' * 300 + b'\r\n'],
        [b'AUTH PLAIN ' + b64(b'\0alice\0' + PASSWORD) + b'\r\n'],
        [b'AUTH PLAIN\r\n', b64(b'\0alice\0' + PASSWORD) + b'A' * 300 + b'\r\n'],
        [b'AUTH LOGIN\r\n', b64(b'alice') + b'\r\n', b64(PASSWORD) + b'!\r\n'],
    ],
    'smtp': [
        [b'EHLO x\r\n', b'AUTH PLAIN ' + b64(b'\0alice\0' + PASSWORD) + b'\r\n'],
        [b'EHLO x\r\n', b'AUTH LOGIN\r\n', b64(b'alice') + b'\r\n',
         b64(PASSWORD) + b'A' * 5000 + b'\r\n'],
        [b'EHLO x\r\n', b'AUTH PLAIN ' + b64(b'\0alice\0' + PASSWORD) + b'\r\nMAIL FROM:<a>\r\n'],
        [b'EHLO x\r\n', b'MAIL FROM:<a>\r\nAUTH PLAIN ' + b64(b'\0alice\0' + PASSWORD)
         + b'\r\n'],
        [b'EHLO x\r\n', b'AUTH PLAIN ' + b64(b'\0alice\0' + PASSWORD) + b'x' * 5000 + b'\r\n'],
    ],
}
OUTCOMES = {
    'accepted': {'password': PASSWORD.decode()},
    'rejected': {'password': 'other'},
    'backend-rejects': {'password': PASSWORD.decode()},
}


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
@pytest.mark.parametrize('outcome', list(OUTCOMES))
def test_password_absent_from_logs_at_debug(mailproxy, auth, fake_backend, proto, outcome):
    """Every login path, also the failing ones (too long, invalid base64, rejected by the
    auth service or by the backend with ``proxy_pass_error_message``), with ``error_log
    ... debug``: neither the password nor its base64 (or any 12 characters of it)
    appears in the log."""
    replies = {}
    if outcome == 'backend-rejects':
        replies = {'imap': {'LOGIN': b'{tag} NO [AUTHENTICATIONFAILED] bad\r\n'},
                   'pop3': {'PASS': b'-ERR [AUTH] bad\r\n'},
                   'smtp': {'XCLIENT': b'550 no\r\n'}}[proto]
    be = fake_backend(proto, replies)
    auth.users = {'alice': dict(OUTCOMES[outcome])}
    auth.ports = {proto: be.port}
    proxy = mailproxy(conf(proto, 'proxy_pass_error_message off; xclient on;',
                           level='debug'))
    quit = {'imap': b'a9 LOGOUT\r\n', 'pop3': b'QUIT\r\n', 'smtp': b'QUIT\r\n'}[proto]
    for session in LEAK_SESSIONS[proto]:
        c = greeted(proxy, proto)
        try:
            for line in session + [quit]:
                c.send(line)
                gevent.sleep(0.02)
            try:
                c.recv_all_until_close(timeout=2)
            except TimeoutError:
                pass
        except OSError:
            pass
        finally:
            c.close()
    gevent.sleep(0.2)
    text = proxy.log_text().encode('utf-8', 'replace')
    for form in _forms():
        assert form not in text, 'found %r in the log:\n%s' % (form, text.decode()[-3000:])
    if outcome == 'backend-rejects':
        assert b'upstream sent invalid response' in text


@pytest.mark.parametrize('lines', [
    [b'a1 AUTHENTICATE PLAIN\r\n', b64(b'\0alice\0' + PASSWORD) + b'A' * 5000 + b'\r\n'],
    [b'a1 AUTHENTICATE PLAIN\r\n', b64(b'\0alice\0' + PASSWORD) + b' ' + b'A' * 5000],
    [b'a1 AUTHENTICATE LOGIN\r\n', b64(b'alice') + b'\r\n', b64(PASSWORD) + b'A' * 5000],
], ids=['plain', 'plain-with-space', 'login-password'])
def test_imap_too_long_sasl_response_not_logged(mailproxy, auth, lines):
    proxy = mailproxy(conf('imap', level='debug'))
    c = greeted(proxy, 'imap')
    for line in lines:
        c.send(line)
        gevent.sleep(0.02)
    data = c.recv_all_until_close(timeout=3)
    assert data.endswith(b'a1 BAD invalid command\r\n'), data
    text = proxy.wait_log('client sent too long command').encode()
    for form in _forms():
        assert form not in text, 'found %r in the log:\n%s' % (form, text.decode()[-3000:])


# --- hostile auth service ------------------------------------------------------------------

def test_auth_server_pointing_at_the_proxy_is_bounded(mailproxy, no_leaks):
    """An Auth-Server naming the proxy itself makes it log in to itself, again and
    again, each link waiting for the next: the chain grows until ``worker_connections``
    is full (nginx's alert), then the link refused at accept fails and the failure runs
    back down the chain as internal-error replies. The first client gets its internal
    error, nothing is left behind, nothing ends in our own "internal error"."""
    fault = FaultAuth()
    text = 'events { worker_connections 64; }\n' + conf('imap', 'imap_id off;')
    proxy = mailproxy(text, auth=fault.url)
    fault.good_port = proxy.port            # everyone: OK, to the proxy itself
    try:
        no_leaks.mark()
        c = greeted(proxy, 'imap')
        c.send(b'a1 LOGIN alice secret\r\n')
        got = c.recv_all_until_close(timeout=5)
        c.close()
        assert got == b'* BAD internal server error\r\n', got
        no_leaks.check()
        assert len(fault.requests) <= 64, len(fault.requests)
        log_text = proxy.log_text()
        assert 'internal error' not in log_text
        assert '64 worker_connections are not enough' in log_text
    finally:
        fault.stop()


def test_backend_reply_cannot_forge_log_lines(mailproxy, scripted):
    be = scripted(backend([b'-ERR x\r2026/01/01 00:00:00 [info] 1#1: *9 client logged in\x1b[2J'
                           b'\x00\r\n']))
    fault = FaultAuth(be.port)
    proxy = mailproxy(conf('pop3'), auth=fault.url)
    try:
        c = greeted(proxy, 'pop3')
        c.send(b'USER alice\r\nPASS secret\r\n')
        c.recv_all_until_close(timeout=5)
        proxy.wait_log('upstream sent invalid response')
        with open(proxy.log_path, 'rb') as f:      # bytes: text mode turns CR into LF
            raw = f.read()
        line = [l for l in raw.split(b'\n') if b'upstream sent invalid' in l][0]
        assert not re.search(rb'[\x00-\x1f\x7f]', line), line
    finally:
        fault.stop()

