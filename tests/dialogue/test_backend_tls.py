"""TLS to the backend (backend_tls.py, beyond nginx) with an in-process proxy and a
scripted TLS backend: implicit TLS and STARTTLS for IMAP, POP3 and SMTP, the auth
answer's ``Auth-SSL-Backend``/``Auth-SSL-Backend-Name``, certificate verification (CA,
name, pin), client certificates, and every way a backend can fail it: never a fall-back
to plain text."""
import hashlib
import re
import socket
import ssl

import gevent
import pytest
from gevent.server import StreamServer

from tests.support.certs import PKI

TIMEOUT = 5.0
BIG = 300_000              # bytes of a POP3 message pumped through the TLS backend


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    pki = PKI(tmp_path_factory.mktemp('backend-pki'))
    pki.named = pki.issue_server('named', 'mail.example.com')
    pki.untrusted = pki.leaf_files('untrusted', pki.other_ca.issue_cert('127.0.0.1',
                                                                       'localhost'))
    return pki


def fingerprint(cert_path) -> str:
    der = ssl.PEM_cert_to_DER_cert(open(cert_path).read())
    return 'sha256:' + hashlib.sha256(der).hexdigest()


class TLSBackend:
    """A scripted IMAP/POP3/SMTP backend with implicit TLS (``mode='implicit'``) or
    STARTTLS (``'starttls'``). It refuses logins over plain text, records each line with
    whether it came over TLS (``lines``), the SNI names (``sni``) and the client
    certificates (``client_certs``). ``starttls_reply`` replaces the answer to
    STARTTLS/STLS (``b''``: the normal one); ``inject`` is sent right after it, in the
    same write, and ``late_inject`` after a pause."""

    GREETING = {'imap': b'* OK [CAPABILITY IMAP4rev1 STARTTLS] backend ready\r\n',
                'pop3': b'+OK backend ready\r\n', 'smtp': b'220 backend ESMTP\r\n'}

    def __init__(self, proto, mode, cert, ca_file=None, starttls_reply=None, inject=b'',
                 late_inject=b''):
        self.proto, self.mode = proto, mode
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*cert)
        if ca_file:
            self.ctx.verify_mode = ssl.CERT_OPTIONAL
            self.ctx.load_verify_locations(str(ca_file))
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name) and None
        self.starttls_reply, self.inject, self.late_inject = starttls_reply, inject, \
            late_inject
        self.lines, self.sni, self.client_certs, self.errors = [], [], [], []
        self.connections = 0
        self.server = StreamServer(('127.0.0.1', 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def stop(self):
        self.server.stop(timeout=1)

    def plain_lines(self):
        return [line for tls, line in self.lines if not tls]

    def tls_lines(self):
        return [line for tls, line in self.lines if tls]

    # --- one connection -------------------------------------------------------------

    def _handle(self, sock, addr):
        self.connections += 1
        self.sock, self.buf, self.tls = sock, b'', False
        try:
            with gevent.Timeout(TIMEOUT, False):
                if self.mode == 'implicit':
                    self._wrap()
                self.sock.sendall(self.GREETING[self.proto])
                while True:
                    line = self._line()
                    if line is None or getattr(self, '_' + self.proto)(line) is None:
                        return
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
        finally:
            self.sock.close()

    def _wrap(self):
        self.sock = self.ctx.wrap_socket(self.sock, server_side=True)
        self.tls = True
        self.client_certs.append(self.sock.getpeercert())

    def _line(self):
        while b'\n' not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b'\n')
        self.lines.append((self.tls, line + b'\n'))
        return line + b'\n'

    def _starttls(self, normal: bytes):
        self.sock.sendall((self.starttls_reply or normal) + self.inject)
        if self.starttls_reply:
            return True
        if self.late_inject:
            gevent.sleep(0.2)
            self.sock.sendall(self.late_inject)
        assert not self.buf, 'client sent bytes after STARTTLS: %r' % self.buf
        self._wrap()
        return True

    def _send(self, data):
        self.sock.sendall(data)
        return True

    def _imap(self, line):
        tag, _, rest = line.partition(b' ')
        word = rest.split(b' ', 1)[0].strip().upper()
        if word == b'STARTTLS' and not self.tls:
            return self._starttls(tag + b' OK Begin TLS negotiation now\r\n')
        if word == b'LOGIN':
            if not self.tls:
                return self._send(tag + b' NO [PRIVACYREQUIRED] TLS required\r\n')
            for _ in range(2):
                self.sock.sendall(b'+ OK\r\n')
                if self._line() is None:
                    return None
            return self._send(tag + b' OK [CAPABILITY IMAP4rev1] logged in over TLS\r\n')
        if word == b'LOGOUT':
            self.sock.sendall(b'* BYE bye\r\n' + tag + b' OK logged out\r\n')
            return None
        return self._send(tag + b' OK done\r\n')

    def _pop3(self, line):
        word = line.split(b' ', 1)[0].strip().upper()
        if word == b'STLS' and not self.tls:
            return self._starttls(b'+OK Begin TLS negotiation\r\n')
        if word == b'PASS' and not self.tls:
            return self._send(b'-ERR [AUTH] Plaintext authentication disallowed\r\n')
        if word == b'PASS':
            return self._send(b'+OK logged in over TLS\r\n')
        if word == b'RETR':
            body = b''.join(b'line %06d of a long message\r\n' % i
                            for i in range(BIG // 29))
            return self._send(b'+OK %d octets\r\n' % len(body) + body + b'.\r\n')
        if word == b'QUIT':
            self.sock.sendall(b'+OK bye\r\n')
            return None
        return self._send(b'+OK\r\n')

    def _smtp(self, line):
        word = line.split(b' ', 1)[0].strip().upper()
        if word == b'EHLO':
            ext = b'' if self.tls else b'250-STARTTLS\r\n'
            return self._send(b'250-backend\r\n' + ext + b'250 8BITMIME\r\n')
        if word == b'STARTTLS' and not self.tls:
            return self._starttls(b'220 2.0.0 Ready to start TLS\r\n')
        if word in (b'XCLIENT', b'AUTH', b'MAIL') and not self.tls:
            return self._send(b'530 5.7.0 Must issue a STARTTLS command first\r\n')
        if word == b'XCLIENT':
            return self._send(b'220 backend ESMTP\r\n')
        if word == b'AUTH':
            return self._send(b'235 2.7.0 Authentication successful\r\n')
        if word == b'QUIT':
            self.sock.sendall(b'221 2.0.0 Bye\r\n')
            return None
        return self._send(b'250 2.0.0 Ok\r\n')


@pytest.fixture
def tls_backend(request):
    made = []

    def make(*args, **kw):
        backend = TLSBackend(*args, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


def conf(proto, directives='', server=''):
    return '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    imap_id off;
    xclient off;
    server_name proxy.test.example;
    %s
    server { listen 127.0.0.1:{port}; protocol %s; %s }
}
''' % (directives, proto, server)


def trusting(pki, mode='starttls', more=''):
    return 'proxy_ssl %s; proxy_ssl_trusted_certificate %s; %s' % (mode, pki.ca_file, more)


def use(auth, backend, *headers, **entry):
    auth.users = {'alice': dict({'password': 'secret', 'port': backend.port,
                                 'headers': list(headers)}, **entry)}


LOGIN = {'imap': (b'* OK IMAP4 ready\r\n', b'a1 LOGIN alice secret\r\n'),
         'pop3': (b'+OK POP3 ready\r\n', b'USER alice\r\n', b'+OK\r\n', b'PASS secret\r\n'),
         'smtp': (b'220 proxy.test.example ESMTP ready\r\n', b'EHLO client.example\r\n',
                  b'250-proxy.test.example\r\n250 AUTH PLAIN LOGIN\r\n',
                  b'AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n')}
LOGGED_IN = {'imap': b'a1 OK [CAPABILITY IMAP4rev1] logged in over TLS\r\n',
             'pop3': b'+OK logged in over TLS\r\n',
             'smtp': b'235 2.0.0 OK\r\n'}
INTERNAL = {'imap': b'* BAD internal server error\r\n',
            'pop3': b'-ERR internal server error\r\n',
            'smtp': b'451 4.3.2 Internal server error\r\n'}


def login(proxy, proto):
    """Log in as alice; returns the client and the answer to the login."""
    c = proxy.client()
    steps = LOGIN[proto]
    c.expect(steps[0])
    for i in range(1, len(steps), 2):
        c.send(steps[i])
        if i + 1 < len(steps):
            c.expect(steps[i + 1])
    return c, c.readline()


def failed_login(proxy, proto):
    c, answer = login(proxy, proto)
    assert answer == INTERNAL[proto]
    assert c.closed()


# --- working TLS to the backend ------------------------------------------------------------

@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_starttls_to_backend(mailproxy, auth, tls_backend, pki, proto):
    be = tls_backend(proto, 'starttls', pki.server_files())
    use(auth, be)
    proxy = mailproxy(conf(proto, trusting(pki, more='proxy_smtp_auth on;')))
    c, answer = login(proxy, proto)
    assert answer == LOGGED_IN[proto]
    plain = be.plain_lines()
    if proto == 'imap':
        assert plain == [b'a1 STARTTLS\r\n']
        assert be.tls_lines()[0] == b'a1 LOGIN {5}\r\n'
        c.send(b'a2 NOOP\r\na3 LOGOUT\r\n')
        c.expect(b'a2 OK done\r\n* BYE bye\r\na3 OK logged out\r\n')
    elif proto == 'pop3':
        assert plain == [b'STLS\r\n']
        assert be.tls_lines() == [b'USER alice\r\n', b'PASS secret\r\n']
        c.send(b'QUIT\r\n')
        c.expect(b'+OK bye\r\n')
    else:
        assert plain == [b'EHLO proxy.test.example\r\n', b'STARTTLS\r\n']
        assert be.tls_lines() == [b'EHLO proxy.test.example\r\n',
                                  b'AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n']
        c.send(b'QUIT\r\n')
        c.expect(b'221 2.0.0 Bye\r\n')
    assert c.closed()
    assert be.sni == [None]          # an address: verified, not sent as SNI
    proxy.wait_log('client logged in')


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_implicit_tls_to_backend(mailproxy, auth, tls_backend, pki, proto):
    be = tls_backend(proto, 'implicit', pki.server_files('ecdsa'))
    use(auth, be)
    proxy = mailproxy(conf(proto, trusting(pki, 'on')))
    c, answer = login(proxy, proto)
    assert answer == LOGGED_IN[proto]
    assert be.plain_lines() == []
    c.close()


def test_pop3_big_message_pumped_from_tls_backend(mailproxy, auth, tls_backend, pki):
    be = tls_backend('pop3', 'starttls', pki.server_files())
    use(auth, be)
    proxy = mailproxy(conf('pop3', trusting(pki)))
    c, answer = login(proxy, 'pop3')
    assert answer == LOGGED_IN['pop3']
    c.send(b'RETR 1\r\n')
    head = c.readline()
    size = int(head.split()[1])
    body = c.read_until(b'\r\n.\r\n', timeout=10)
    assert len(body) == size + 3 and body.startswith(b'line 000000 of')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK bye\r\n')
    log = proxy.wait_log('proxied session done')
    assert 'bytes to client: %d' % (len(head) + len(body) + len(b'+OK bye\r\n')) in log


def test_smtp_starttls_then_xclient_over_tls(mailproxy, auth, tls_backend, pki):
    be = tls_backend('smtp', 'starttls', pki.server_files())
    use(auth, be)
    proxy = mailproxy(conf('smtp', trusting(pki)).replace('xclient off;', ''))
    c, answer = login(proxy, 'smtp')
    assert answer == b'235 2.0.0 OK\r\n'
    tls = be.tls_lines()
    assert tls[0] == b'EHLO proxy.test.example\r\n' and tls[1].startswith(b'XCLIENT ADDR=')
    c.close()


def test_answer_turns_backend_tls_on_per_login(mailproxy, auth, tls_backend, pki):
    """``proxy_ssl`` is off in the server; the auth answer asks for STARTTLS."""
    be = tls_backend('imap', 'starttls', pki.server_files())
    use(auth, be, ('Auth-SSL-Backend', 'starttls'))
    proxy = mailproxy(conf('imap', 'proxy_ssl_trusted_certificate %s;' % pki.ca_file))
    c, answer = login(proxy, 'imap')
    assert answer == LOGGED_IN['imap']
    assert be.plain_lines() == [b'a1 STARTTLS\r\n']


def test_answer_turns_backend_tls_off_per_login(mailproxy, auth, fake_backend, pki):
    be = fake_backend('imap')
    use(auth, be, ('Auth-SSL-Backend', 'off'))
    proxy = mailproxy(conf('imap', trusting(pki, 'on')))
    c, answer = login(proxy, 'imap')
    assert answer == b'a1 OK logged in\r\n'


def test_answer_implicit_tls_with_system_cas_refuses_test_ca(mailproxy, auth, tls_backend,
                                                            pki):
    """Without ``proxy_ssl_trusted_certificate`` the system's CAs are used (built on
    the first login that asks): the test CA is not among them."""
    be = tls_backend('pop3', 'implicit', pki.server_files())
    use(auth, be, ('Auth-SSL-Backend', 'on'))
    proxy = mailproxy(conf('pop3'))
    failed_login(proxy, 'pop3')
    proxy.wait_log(r'\[error\] .*upstream SSL certificate verify error: \(20:unable to get '
                   r'local issuer certificate\) while SSL handshaking to upstream')


def test_invalid_answer_mode(mailproxy, auth, fake_backend):
    be = fake_backend('imap')
    use(auth, be, ('Auth-SSL-Backend', 'maybe'))
    proxy = mailproxy(conf('imap'))
    failed_login(proxy, 'imap')
    proxy.wait_log(r'\[error\] .*auth http server sent invalid "Auth-SSL-Backend" value '
                   r'"maybe"')
    assert be.lines == []


def test_name_from_directive_and_answer_sent_as_sni(mailproxy, auth, tls_backend, pki):
    be = tls_backend('imap', 'implicit', pki.named)
    use(auth, be)
    proxy = mailproxy(conf('imap', trusting(pki, 'on', 'proxy_ssl_name mail.example.com;')))
    c, answer = login(proxy, 'imap')
    assert answer == LOGGED_IN['imap']
    use(auth, be, ('Auth-SSL-Backend-Name', 'mail.example.com'))
    proxy2 = mailproxy(conf('imap', trusting(pki, 'on')))
    c, answer = login(proxy2, 'imap')
    assert answer == LOGGED_IN['imap']
    assert be.sni == ['mail.example.com', 'mail.example.com']


def test_client_certificate_to_backend(mailproxy, auth, tls_backend, pki):
    be = tls_backend('imap', 'starttls', pki.server_files(), ca_file=pki.ca_file)
    use(auth, be)
    cert, key = pki.client_files('trusted')
    proxy = mailproxy(conf('imap', trusting(pki, more='proxy_ssl_certificate %s; '
                                                      'proxy_ssl_certificate_key %s;'
                                                      % (cert, key))))
    c, answer = login(proxy, 'imap')
    assert answer == LOGGED_IN['imap']
    subject = dict(pair[0] for pair in be.client_certs[0]['subject'])
    assert subject['commonName'] == 'client.example.com'


def test_pinned_certificate_without_verification(mailproxy, auth, tls_backend, pki):
    """A self-made certificate, accepted by its pin alone."""
    be = tls_backend('pop3', 'implicit', pki.untrusted)
    use(auth, be)
    proxy = mailproxy(conf('pop3', 'proxy_ssl on; proxy_ssl_verify off; '
                                   'proxy_ssl_fingerprint %s;' % fingerprint(pki.untrusted[0])))
    c, answer = login(proxy, 'pop3')
    assert answer == LOGGED_IN['pop3']


def test_verification_off_accepts_any_certificate(mailproxy, auth, tls_backend, pki):
    be = tls_backend('pop3', 'starttls', pki.untrusted)
    use(auth, be)
    proxy = mailproxy(conf('pop3', 'proxy_ssl starttls; proxy_ssl_verify off;'))
    c, answer = login(proxy, 'pop3')
    assert answer == LOGGED_IN['pop3']


# --- refused: wrong certificates -------------------------------------------------------------

def test_untrusted_certificate_refused(mailproxy, auth, tls_backend, pki):
    be = tls_backend('imap', 'starttls', pki.untrusted)
    use(auth, be)
    proxy = mailproxy(conf('imap', trusting(pki)))
    failed_login(proxy, 'imap')
    log = proxy.wait_log(r'upstream SSL certificate verify error')
    assert ('[error]' in log and 'upstream SSL certificate verify error: (20:unable to get '
            'local issuer certificate) while SSL handshaking to upstream, client: 127.0.0.1'
            in log and 'upstream: 127.0.0.1:%d' % be.port in log)
    assert be.tls_lines() == [] and be.plain_lines() == [b'a1 STARTTLS\r\n']


@pytest.mark.parametrize('proto', ['imap', 'smtp'])
def test_wrong_name_refused(mailproxy, auth, tls_backend, pki, proto):
    be = tls_backend(proto, 'implicit', pki.named)     # for mail.example.com only
    use(auth, be)
    proxy = mailproxy(conf(proto, trusting(pki, 'on')))
    failed_login(proxy, proto)
    proxy.wait_log(r'\[error\] .*upstream SSL certificate does not match "127.0.0.1" '
                   r'while SSL handshaking to upstream')
    assert be.tls_lines() == []


def test_wrong_answer_name_refused(mailproxy, auth, tls_backend, pki):
    be = tls_backend('pop3', 'starttls', pki.named)
    use(auth, be, ('Auth-SSL-Backend-Name', 'other.example.com'))
    proxy = mailproxy(conf('pop3', trusting(pki, more='proxy_ssl_name mail.example.com;')))
    failed_login(proxy, 'pop3')
    proxy.wait_log(r'upstream SSL certificate does not match "other.example.com"')
    assert be.sni == ['other.example.com']


def test_pin_mismatch_refused(mailproxy, auth, tls_backend, pki):
    """A certificate the CA vouches for, but not the pinned one."""
    be = tls_backend('imap', 'starttls', pki.server_files('rsa'))
    use(auth, be)
    pin = fingerprint(pki.server_files('ecdsa')[0])
    proxy = mailproxy(conf('imap', trusting(pki, more='proxy_ssl_fingerprint %s;' % pin)))
    failed_login(proxy, 'imap')
    actual = fingerprint(pki.server_files('rsa')[0])
    proxy.wait_log(r'\[error\] .*upstream SSL certificate does not match '
                   r'"proxy_ssl_fingerprint" \(%s\)' % actual)
    assert be.tls_lines() == []


def test_pin_of_several_matches(mailproxy, auth, tls_backend, pki):
    be = tls_backend('imap', 'starttls', pki.server_files('rsa'))
    use(auth, be)
    pins = ' '.join('proxy_ssl_fingerprint %s;' % fingerprint(pki.server_files(k)[0])
                    .upper().replace('SHA256', 'sha256') for k in ('ecdsa', 'rsa'))
    proxy = mailproxy(conf('imap', trusting(pki, more=pins)))
    c, answer = login(proxy, 'imap')
    assert answer == LOGGED_IN['imap']


# --- refused: STARTTLS failures and injection ----------------------------------------------

REFUSALS = {'imap': b'a1 BAD STARTTLS not available\r\n', 'pop3': b'-ERR no TLS here\r\n',
            'smtp': b'454 4.7.0 TLS not available\r\n'}


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_starttls_refused_by_backend(mailproxy, auth, tls_backend, pki, proto):
    be = tls_backend(proto, 'starttls', pki.server_files(), starttls_reply=REFUSALS[proto])
    use(auth, be)
    proxy = mailproxy(conf(proto, trusting(pki) + ' proxy_pass_error_message on;'))
    failed_login(proxy, proto)     # the internal error, not the backend's text
    first = REFUSALS[proto].decode().rstrip('\r\n')
    proxy.wait_log(r'\[error\] .*upstream sent invalid response to STARTTLS: "%s" while '
                   r'reading response from upstream' % first)
    assert len(be.plain_lines()) == (2 if proto == 'smtp' else 1)   # no login in plain


INJECTED = {'imap': b'* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n',
            'pop3': b'+OK injected\r\n', 'smtp': b'250 injected\r\n'}


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_bytes_after_starttls_answer_refused(mailproxy, auth, tls_backend, pki, proto):
    """CVE-2011-0411 turned around: what a backend (or a man in the middle) sends
    with its STARTTLS answer would be read as if it came through TLS."""
    be = tls_backend(proto, 'starttls', pki.server_files(), inject=INJECTED[proto])
    use(auth, be)
    proxy = mailproxy(conf(proto, trusting(pki)))
    failed_login(proxy, proto)
    proxy.wait_log(r'\[error\] .*upstream sent data after its STARTTLS response: "%s\\x0d'
                   r'\\x0a" while reading response from upstream'
                   % re.escape(INJECTED[proto][:-2].decode()))
    assert be.tls_lines() == []


def test_bytes_after_starttls_answer_in_a_later_packet_refused(mailproxy, auth, tls_backend,
                                                               pki):
    """Bytes that arrive after the answer was read end up in the TLS handshake."""
    be = tls_backend('imap', 'starttls', pki.server_files(), late_inject=INJECTED['imap'])
    use(auth, be)
    proxy = mailproxy(conf('imap', trusting(pki)))
    failed_login(proxy, 'imap')
    proxy.wait_log(r'\[error\] .*SSL_do_handshake\(\) failed \(SSL: .*\) while SSL '
                   r'handshaking to upstream')


def test_plain_backend_behind_implicit_tls_refused(mailproxy, auth, fake_backend, pki):
    be = fake_backend('imap')
    use(auth, be)
    proxy = mailproxy(conf('imap', trusting(pki, 'on')))
    failed_login(proxy, 'imap')
    proxy.wait_log(r'\[error\] .*SSL_do_handshake\(\) failed')


def test_backend_closing_in_handshake(mailproxy, auth, pki):
    """A backend that accepts and closes at once."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def close_all():
        while True:
            sock, _ = listener.accept()
            sock.close()
    closer = gevent.spawn(close_all)
    try:
        auth.users = {'alice': {'password': 'secret', 'port': port}}
        proxy = mailproxy(conf('pop3', trusting(pki, 'on')))
        failed_login(proxy, 'pop3')
        proxy.wait_log(r'\[error\] .*(upstream prematurely closed connection in SSL '
                       r'handshake|SSL_do_handshake\(\) failed)')
    finally:
        closer.kill()
        listener.close()


# --- configuration -------------------------------------------------------------------------

def load_error(tmp_path, directives):
    from gmailproxy.config.parser import load
    from gmailproxy.errors import ConfigError
    path = tmp_path / 'mail.conf'
    path.write_text('events { }\nmail { auth_http 127.0.0.1:9; %s\n'
                    'server { listen 127.0.0.1:1143; protocol imap; } }\n' % directives)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    return str(info.value), str(path)


def test_config_missing_ca_file(tmp_path):
    msg, path = load_error(tmp_path, 'proxy_ssl on;\n'
                           'proxy_ssl_trusted_certificate /nonexistent/ca.pem;')
    assert msg == ('SSL_CTX_load_verify_locations("/nonexistent/ca.pem") failed '
                   '(No such file or directory) in %s:3' % path)


def test_config_certificate_without_key(tmp_path, pki):
    cert, _ = pki.client_files('trusted')
    msg, path = load_error(tmp_path, 'proxy_ssl on;\nproxy_ssl_certificate %s;' % cert)
    assert msg == ('no "proxy_ssl_certificate_key" is defined for "%s" in %s:3'
                   % (cert, path))


@pytest.mark.parametrize('value', ['sha1:00', 'sha256:xyz', 'sha256:' + '0' * 62, 'abc'])
def test_config_bad_fingerprint(tmp_path, value):
    msg, path = load_error(tmp_path, 'proxy_ssl_fingerprint %s;' % value)
    assert msg == ('invalid value "%s" in "proxy_ssl_fingerprint" directive, it must be '
                   '"sha256:" and 64 hexadecimal digits in %s:2' % (value, path))


def test_config_bad_mode(tmp_path):
    msg, path = load_error(tmp_path, 'proxy_ssl yes;')
    assert msg == 'invalid value "yes" in %s:2' % path


def test_off_by_default(tmp_path):
    from gmailproxy.config.parser import load
    path = tmp_path / 'mail.conf'
    path.write_text('events { }\nmail { auth_http 127.0.0.1:9;\n'
                    'server { listen 127.0.0.1:1143; protocol imap; } }\n')
    server, = load(str(path)).servers
    assert server.proxy_ssl == 'off' and server.backend_tls is None
    assert server.proxy_ssl_verify is True
