"""TLS to the backend end to end: imaplib/poplib/smtplib -> gmailproxy (subprocess) ->
Dovecot with ``ssl = required`` over implicit TLS and STARTTLS, and Postfix with
``smtpd_tls_security_level = encrypt`` over STARTTLS; wrong certificates (untrusted CA,
wrong name, pin mismatch) and a man in the middle adding bytes after Dovecot's STARTTLS
answer are refused with the internal-error line.

Dovecot counts a connection from its own address, or from ``login_trusted_networks``,
as secure: the proxy reaches it at 127.0.0.2 (from 127.0.0.1) with no trusted
networks, so it refuses any login without TLS, and logs ``TLS`` for those with it.

One gmailproxy serves a server block per case; each block sends ``X-Backend: CASE`` to
the auth service, which answers with that case's backend address (and headers).
"""
import hashlib
import imaplib
import poplib
import re
import smtplib
import ssl
import time

import gevent
import pytest
from gevent.server import StreamServer

from tests.support import dump_on_failure
from tests.support.auth import RecordingAuthServer, http_response
from tests.support.backends import Dovecot, Postfix
from tests.support.certs import PKI
from tests.support.net import Client, free_port, free_ports

T = 10.0
HOST = '127.0.0.1'
MESSAGE = (b'From: alice@test.example\r\nTo: bob@test.example\r\nSubject: backend TLS\r\n'
           b'\r\nsent through the proxy to a TLS-only backend\r\n')

# case: (protocol, directives, backend port attribute, extra answer headers)
CASES = {
    'imap_starttls': ('imap', 'proxy_ssl starttls; {trust}', 'imap_port', []),
    'imap_tls': ('imap', 'proxy_ssl on; {trust}', 'imaps_port', []),
    'pop3_starttls': ('pop3', 'proxy_ssl starttls; {trust}', 'pop3_port', []),
    'pop3_tls': ('pop3', 'proxy_ssl on; {trust}', 'pop3s_port', []),
    'smtp_starttls': ('smtp', 'proxy_ssl starttls; {trust}', 'smtp_port', []),
    'imap_by_answer': ('imap', '{trust}', 'imaps_port', [('Auth-SSL-Backend', 'on'),
                                                         ('Auth-SSL-Backend-Name',
                                                          'localhost')]),
    'imap_named': ('imap', 'proxy_ssl starttls; {trust} proxy_ssl_name localhost;',
                   'imap_port', []),
    'imap_plain': ('imap', '', 'imap_port', []),
    'pop3_plain': ('pop3', '', 'pop3_port', []),
    'imap_untrusted': ('imap', 'proxy_ssl on; proxy_ssl_trusted_certificate {other_ca};',
                       'imaps_port', []),
    'imap_wrong_name': ('imap', 'proxy_ssl starttls; {trust} '
                                'proxy_ssl_name mail.example.com;', 'imap_port', []),
    'pop3_pin_mismatch': ('pop3', 'proxy_ssl on; {trust} proxy_ssl_fingerprint {bad_pin};',
                          'pop3s_port', []),
    'pop3_pin_only': ('pop3', 'proxy_ssl starttls; proxy_ssl_verify off; '
                              'proxy_ssl_fingerprint {pin};', 'pop3_port', []),
    'imap_injected': ('imap', 'proxy_ssl starttls; {trust}', 'injector_port', []),
    # failover.py: a refused and a silent backend before Dovecot's TLS port
    'imap_failover': ('imap', 'proxy_ssl on; {trust} proxy_connect_timeout 300ms; '
                              'proxy_backend_failures 1; proxy_backend_cooldown 30s;',
                      'failover', []),
}

CONF_HEAD = '''
events { }
mail {
    auth_http %(auth)s;
    auth_http_keepalive off;
    server_name proxy.test.example;
    imap_id off;
    xclient on;
'''
SERVER = '''    server { listen 127.0.0.1:%(port)d; protocol %(proto)s; %(directives)s
             auth_http_header X-Backend %(case)s; }
'''


def fingerprint(pem_path) -> str:
    der = ssl.PEM_cert_to_DER_cert(open(pem_path).read())
    return 'sha256:' + hashlib.sha256(der).hexdigest()


class TLSPostfix(Postfix):
    """Postfix with its TLS manager (smtpd disables TLS without one)."""

    def _master_cf(self) -> str:
        return super()._master_cf() + 'tlsmgr unix - - n 1000? 1 tlsmgr\n'


class Injector:
    """A man in the middle before Dovecot's IMAP port: it passes everything, but adds a
    line to Dovecot's answer to STARTTLS, in the same write."""
    INJECTED = b'* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n'

    def __init__(self, port):
        self.target = port
        self.injected = 0
        self.server = StreamServer((HOST, 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, client, addr):
        import socket
        backend = socket.create_connection(('127.0.0.2', self.target), timeout=T)
        try:
            with gevent.Timeout(T, False):
                cf, bf = client.makefile('rb'), backend.makefile('rb')
                client.sendall(bf.readline())                     # greeting
                line = cf.readline()
                backend.sendall(line)
                answer = bf.readline()
                if b'STARTTLS' in line.upper():
                    answer += self.INJECTED
                    self.injected += 1
                client.sendall(answer)
                while True:                                       # the rest, one way
                    data = cf.read1(65536)
                    if not data:
                        return
                    backend.sendall(data)
        except OSError:
            pass
        finally:
            backend.close()
            client.close()

    def stop(self):
        self.server.stop(timeout=1)


class Silent:
    """A port whose connects hang: a listener whose accept queue is full drops SYNs."""

    def __init__(self, host):
        import socket
        self.listener = socket.socket()
        self.listener.bind((host, 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(8):
            sock = socket.socket()
            sock.settimeout(0.3)
            self.fillers.append(sock)
            try:
                sock.connect((host, self.port))
            except OSError:
                return
        raise RuntimeError('could not fill the accept queue')

    def close(self):
        for sock in self.fillers + [self.listener]:
            sock.close()


class Stack:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def port(self, case):
        return self.ports[case]


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp('backend-tls-e2e')
    pki = PKI(folder / 'pki')
    cert, key = pki.issue_server('backend', 'localhost', '127.0.0.1', '127.0.0.2')
    dovecot = Dovecot(users={'alice': 'secret'}, ssl_cert=str(cert), ssl_key=str(key),
                      ssl='required', extra_conf='listen = 127.0.0.1, 127.0.0.2\n'
                                                 'login_trusted_networks =\n')
    postfix = TLSPostfix(mailboxes=('alice', 'bob'), extra_main_cf=(
        'smtpd_tls_cert_file = %s\nsmtpd_tls_key_file = %s\n'
        'smtpd_tls_security_level = encrypt\nsmtpd_tls_received_header = yes\n'
        % (cert, key)))
    auth = RecordingAuthServer(users={'alice': {'password': 'secret'}}).start()
    proxy = injector = silent = None
    from tests.support.proxyproc import GmailProxy
    try:
        dovecot.start()
        postfix.start()
        injector = Injector(dovecot.imap_port)      # 127.0.0.1 -> 127.0.0.2
        silent = Silent('127.0.0.2')
        dead = free_port('127.0.0.2')
        backends = {'imap_port': dovecot.imap_port, 'imaps_port': dovecot.imaps_port,
                    'pop3_port': dovecot.pop3_port, 'pop3s_port': dovecot.pop3s_port,
                    'smtp_port': postfix.port, 'injector_port': injector.port}

        def respond(req):
            case = req.get('X-Backend')
            headers = auth.answer(req)
            if headers[0] != ('Auth-Status', 'OK'):
                return None
            _, _, attr, extra = CASES[case]
            server = '127.0.0.1' if attr in ('smtp_port', 'injector_port') else '127.0.0.2'
            port = str(backends.get(attr))
            if attr == 'failover':
                server = '127.0.0.2, 127.0.0.2,127.0.0.2'
                port = '%d, %d, %s' % (dead, silent.port, dovecot.imaps_port)
            headers = [(n, port if n == 'Auth-Port' else server if n == 'Auth-Server'
                        else v) for n, v in headers]
            return http_response(headers + extra)
        auth.responder = respond

        ports = dict(zip(CASES, free_ports(len(CASES))))
        values = {'trust': 'proxy_ssl_trusted_certificate %s;' % pki.ca_file,
                  'other_ca': pki.other_ca_file, 'pin': fingerprint(cert),
                  'bad_pin': fingerprint(pki.server_files('ecdsa')[0])}
        text = CONF_HEAD % {'auth': auth.url} + ''.join(
            SERVER % {'port': ports[case], 'proto': proto, 'case': case,
                      'directives': directives.format(**values)}
            for case, (proto, directives, _, _) in CASES.items()) + '}\n'
        proxy = GmailProxy(text, folder / 'proxy')
        proxy.start(ports.values())
        yield Stack(pki=pki, dovecot=dovecot, postfix=postfix, auth=auth, proxy=proxy,
                    injector=injector, ports=ports, cert=cert, dead=dead,
                    silent=silent)
    finally:
        if proxy is not None:
            proxy.stop()
        if injector is not None:
            injector.stop()
        if silent is not None:
            silent.close()
        postfix.stop()
        dovecot.stop()
        auth.stop()


@pytest.fixture
def tls(stack, request):
    start = len(stack.proxy.log_text())
    yield stack
    dump_on_failure(request, 'gmailproxy log', stack.proxy.log_text()[start:])
    dump_on_failure(request, 'dovecot log', stack.dovecot.log_text()[-3000:])


# --- working ------------------------------------------------------------------------------

def dovecot_login_line(stack) -> str:
    lines = [l for l in stack.dovecot.log_text().splitlines() if ': Login: user=<alice>' in l]
    return lines[-1] if lines else ''


@pytest.mark.parametrize('case', ['imap_starttls', 'imap_tls', 'imap_by_answer',
                                  'imap_named'])
def test_imap_to_dovecot_ssl_required(tls, case):
    tls.dovecot.deliver('alice', MESSAGE)
    with imaplib.IMAP4(HOST, tls.port(case), timeout=T) as imap:
        assert imap.login('alice', 'secret')[0] == 'OK'
        typ, data = imap.select('INBOX')
        assert typ == 'OK' and int(data[0]) >= 1
        typ, data = imap.fetch(data[0], '(BODY[])')
        assert typ == 'OK' and data[0][1] == MESSAGE
    tls.proxy.wait_log('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d'
                       % tls.port(case))
    line = dovecot_login_line(tls)
    assert 'imap-login' in line and 'lip=127.0.0.2' in line and ', TLS, ' in line, line


@pytest.mark.parametrize('case', ['pop3_starttls', 'pop3_tls', 'pop3_pin_only'])
def test_pop3_to_dovecot_ssl_required(tls, case):
    tls.dovecot.deliver('alice', MESSAGE)
    pop = poplib.POP3(HOST, tls.port(case), timeout=T)
    try:
        assert pop.user('alice').startswith(b'+OK')
        assert pop.pass_('secret').startswith(b'+OK')
        count, _ = pop.stat()
        assert count >= 1
        _, lines, _ = pop.retr(count)
        assert b'\r\n'.join(lines) + b'\r\n' == MESSAGE
    finally:
        pop.quit()
    line = dovecot_login_line(tls)
    assert 'pop3-login' in line and ', TLS, ' in line, line


def test_smtp_starttls_to_postfix_tls_required(tls):
    before = len(tls.postfix.messages('bob'))
    with smtplib.SMTP(HOST, tls.port('smtp_starttls'), timeout=T) as smtp:
        smtp.ehlo('client.example')
        assert smtp.login('alice', 'secret')[0] == 235
        assert smtp.sendmail('alice@test.example', ['bob@test.example'], MESSAGE) == {}
    delivered = tls.postfix.wait_messages('bob', before + 1)[-1]
    assert b'sent through the proxy to a TLS-only backend' in delivered
    assert re.search(rb'\(using TLSv1\.[23] with cipher ', delivered), delivered


# --- refused --------------------------------------------------------------------------------

def imap_login(tls, case) -> bytes:
    with Client(HOST, tls.port(case), timeout=T) as c:
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN alice secret\r\n')
        answer = c.readline()
        assert c.closed()
    return answer


@pytest.mark.parametrize('case', ['imap_plain', 'pop3_plain'])
def test_plain_login_refused_by_dovecot(tls, case):
    """The control: without backend TLS, Dovecot (``ssl = required``) refuses."""
    with Client(HOST, tls.port(case), timeout=T) as c:
        if case == 'imap_plain':
            c.expect(b'* OK IMAP4 ready\r\n')
            c.send(b'a1 LOGIN alice secret\r\n')
            c.expect(b'* BAD internal server error\r\n')
        else:
            c.expect(b'+OK POP3 ready\r\n')
            c.send(b'USER alice\r\nPASS secret\r\n')
            c.expect(b'+OK\r\n-ERR internal server error\r\n')
    tls.proxy.wait_log('Plaintext authentication ')


@pytest.mark.parametrize('case, message', [
    ('imap_untrusted', 'upstream SSL certificate verify error: (20:unable to get local '
                       'issuer certificate) while SSL handshaking to upstream'),
    ('imap_wrong_name', 'upstream SSL certificate does not match "mail.example.com" while '
                        'SSL handshaking to upstream'),
    ('imap_injected', 'upstream sent data after its STARTTLS response: "* OK [CAPABILITY '
                      'IMAP4rev1 AUTH=PLAIN] injected\\x0d\\x0a" while reading response '
                      'from upstream'),
])
def test_imap_wrong_backend_refused(tls, case, message):
    assert imap_login(tls, case) == b'* BAD internal server error\r\n'
    log = tls.proxy.wait_log(message)
    assert '[error]' in log.split(message)[0].rsplit('\n', 1)[-1]
    if case == 'imap_injected':
        assert tls.injector.injected >= 1


def test_pop3_pin_mismatch_refused(tls):
    with Client(HOST, tls.port('pop3_pin_mismatch'), timeout=T) as c:
        c.expect(b'+OK POP3 ready\r\n')
        c.send(b'USER alice\r\nPASS secret\r\n')
        c.expect(b'+OK\r\n-ERR internal server error\r\n')
        assert c.closed()
    tls.proxy.wait_log('upstream SSL certificate does not match "proxy_ssl_fingerprint" '
                       '(%s)' % fingerprint(tls.cert))


# --- failover to a TLS backend (failover.py) ------------------------------------------------

def test_failover_past_refused_and_silent_backends_to_dovecot(tls):
    """The answer names a refused backend, a silent one, then Dovecot's TLS port: the
    first login gets there after ``proxy_connect_timeout``; both failed ones are then
    marked down and the next login goes straight to Dovecot."""
    start = len(tls.proxy.log_text())
    case = 'imap_failover'
    began = time.monotonic()
    with imaplib.IMAP4(HOST, tls.port(case), timeout=T) as imap:
        assert imap.login('alice', 'secret')[0] == 'OK'
    assert 0.3 <= time.monotonic() - began < 5
    log = tls.proxy.wait_log('client logged in', start=start)[start:]
    for text in ('[error] %s connect() to 127.0.0.2:%d failed (111: Connection refused) '
                 'while connecting to upstream' % ('%s', tls.dead),
                 '[error] %s connect() to 127.0.0.2:%d failed (110: Connection timed out) '
                 'while connecting to upstream' % ('%s', tls.silent.port),
                 '[warn] %s upstream 127.0.0.2:%d is marked down for 30s after 1 '
                 'failures' % ('%s', tls.dead),
                 '[warn] %s upstream 127.0.0.2:%d is marked down for 30s after 1 '
                 'failures' % ('%s', tls.silent.port)):
        assert re.search(re.escape(text).replace('%s', r'\S+ \*\d+'), log), (text, log)
    assert 'upstream: 127.0.0.2:%d\n' % tls.dovecot.imaps_port in log
    line = dovecot_login_line(tls)
    assert ', TLS, ' in line, line
    with imaplib.IMAP4(HOST, tls.port(case), timeout=T) as imap:
        assert imap.login('alice', 'secret')[0] == 'OK'
    log = tls.proxy.wait_log('client logged in', start=len(log) + start)[start:]
    assert log.count('client logged in') == 2
    assert log.count('connect() to 127.0.0.2') == 2      # both skipped this time
