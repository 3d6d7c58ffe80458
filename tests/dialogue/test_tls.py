"""TLS with an in-process proxy (ssl.md): implicit TLS, STARTTLS for IMAP/POP3/SMTP, the
injection defence, ``starttls only``, ALPN, session resumption, client certificates and
the ``Auth-SSL*`` headers the auth service receives."""
import hashlib
import socket
import ssl

import pytest

from tests.support.certs import PKI
from tests.support.net import Client

TIMEOUT = 5.0


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp('pki'))


def conf(pki, proto, directives='', listen='', server_directives=''):
    cert, key = pki.server_files('rsa')
    return '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    ssl_certificate %s;
    ssl_certificate_key %s;
    %s
    server { listen 127.0.0.1:{port}%s; protocol %s; %s }
}
''' % (cert, key, directives, listen, proto, server_directives)


def tls_connect(proxy, ctx, server_hostname='localhost', session=None) -> Client:
    sock = socket.create_connection(('127.0.0.1', proxy.port), timeout=TIMEOUT)
    sock = ctx.wrap_socket(sock, server_hostname=server_hostname, session=session)
    return Client('127.0.0.1', proxy.port, timeout=TIMEOUT, sock=sock)


# --- IMAP --------------------------------------------------------------------------------

def test_imap_starttls_capabilities_and_login(mailproxy, backends, auth, pki):
    proxy = mailproxy(conf(pki, 'imap', 'starttls on; imap_id off;'))
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN STARTTLS\r\n'
             b'a1 OK completed\r\n')
    c.send(b'a2 STARTTLS\r\n')
    c.expect(b'a2 OK completed\r\n')
    c.starttls(pki.client_context(), server_hostname='localhost')
    assert c.sock.version() in ('TLSv1.2', 'TLSv1.3')
    c.send(b'a3 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\na3 OK completed\r\n')
    c.send(b'a4 STARTTLS\r\n')
    c.expect(b'a4 BAD invalid command\r\n')
    c.send(b'a5 LOGIN alice secret\r\n')
    c.expect(b'a5 OK')
    req = auth.parsed[0]
    assert req.get('Auth-SSL') == 'on'
    assert req.get('Auth-SSL-Protocol') == c.sock.version()
    assert req.get('Auth-SSL-Cipher') == c.sock.cipher()[0]
    assert req.get('Auth-SSL-Verify') is None
    assert b'Auth-SSL: on\r\nAuth-SSL-Protocol: ' in auth.requests[0]
    log = proxy.wait_log(r'client logged in')
    assert 'client: 127.0.0.1 using starttls, server: ' in log


def test_imap_implicit_tls(mailproxy, backends, auth, pki):
    proxy = mailproxy(conf(pki, 'imap', 'imap_id off; starttls on;', listen=' ssl'))
    c = tls_connect(proxy, pki.client_context())
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\na1 OK completed\r\n')
    c.send(b'a2 STARTTLS\r\n')
    c.expect(b'a2 BAD invalid command\r\n')
    c.send(b'a3 LOGIN alice secret\r\n')
    c.expect(b'a3 OK')
    c.send(b'a4 NOOP\r\n')
    c.expect(b'a4 OK')
    assert auth.parsed[0].get('Auth-SSL') == 'on'
    assert 'using starttls' not in proxy.log_text()


def test_imap_starttls_only_refuses_credentials(mailproxy, backends, auth, pki):
    proxy = mailproxy(conf(pki, 'imap', 'starttls only; imap_id off; max_errors 10;'))
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS STARTTLS LOGINDISABLED\r\n'
             b'a1 OK completed\r\n')
    for line in (b'a2 LOGIN alice secret', b'a3 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==',
                 b'a4 AUTHENTICATE PLAIN', b'a5 AUTHENTICATE LOGIN'):
        c.send(line + b'\r\n')
        c.expect(line.split(b' ')[0] + b' BAD invalid command\r\n')
    c.send(b'a6 NOOP\r\n')
    c.expect(b'a6 OK completed\r\n')
    c.send(b'a7 STARTTLS\r\n')
    c.expect(b'a7 OK completed\r\n')
    c.starttls(pki.client_context(), server_hostname='localhost')
    c.send(b'a8 CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\na8 OK completed\r\n')
    c.send(b'a9 LOGIN alice secret\r\n')
    c.expect(b'a9 OK')
    assert len(auth.requests) == 1


def test_imap_starttls_injection(mailproxy, backends, auth, pki):
    """STARTTLS and a command in one packet: the command is thrown away, never answered
    (neither in plaintext nor inside TLS) and never reaches auth or the backend."""
    proxy = mailproxy(conf(pki, 'imap', 'starttls on; imap_id off;'))
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 STARTTLS\r\na2 LOGIN alice secret\r\n')
    c.expect(b'a1 OK completed\r\n')
    c.starttls(pki.client_context(), server_hostname='localhost')
    c.send(b'a3 NOOP\r\n')
    c.expect(b'a3 OK completed\r\n')
    assert c.silent(0.3)
    assert auth.requests == []
    assert backends['imap'].received == b''


def test_imap_starttls_plaintext_after_reply_breaks_handshake(mailproxy, backends, pki):
    """Bytes sent after STARTTLS that the proxy had not read yet go to the TLS layer."""
    proxy = mailproxy(conf(pki, 'imap', 'starttls on;'))
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 STARTTLS\r\n')
    c.expect(b'a1 OK completed\r\n')
    c.send(b'a2 LOGIN alice secret\r\n')
    assert c.recv_all_until_close(TIMEOUT)[:1] in (b'', b'\x15')   # nothing, or an alert
    proxy.wait_log(r'SSL_do_handshake\(\) failed \(SSL: error:[0-9A-F]+:SSL routines::'
                   r'[a-z ]+\) while in starttls state, client: 127\.0\.0\.1 using starttls')
    assert backends['imap'].received == b''


def test_handshake_failure_closes_without_reply(mailproxy, backends, pki):
    proxy = mailproxy(conf(pki, 'imap', '', listen=' ssl'))
    c = proxy.client()
    c.send(b'a1 CAPABILITY\r\n')
    data = c.recv_all_until_close(TIMEOUT)
    assert b'OK' not in data and b'BAD' not in data
    proxy.wait_log(r'\[info\] .*SSL_do_handshake\(\) failed \(SSL: error:0A00010B:SSL '
                   r'routines::wrong version number\) while SSL handshaking, '
                   r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+')


def test_handshake_bounded_by_timeout(mailproxy, backends, pki):
    proxy = mailproxy(conf(pki, 'imap', 'timeout 300ms;', listen=' ssl'))
    c = proxy.client()
    assert c.recv_all_until_close(3.0) == b''
    proxy.wait_log(r'client timed out \(110: Connection timed out\) while SSL handshaking')


# --- ALPN ---------------------------------------------------------------------------------

@pytest.mark.parametrize('alpn, ok', [(None, True), (['imap'], True),
                                      (['h2', 'imap'], True), (['unknown'], False),
                                      (['pop3'], False)])
def test_alpn(mailproxy, backends, pki, alpn, ok):
    proxy = mailproxy(conf(pki, 'imap', '', listen=' ssl'))
    ctx = pki.client_context(alpn=alpn)
    if ok:
        c = tls_connect(proxy, ctx)
        c.expect(b'* OK IMAP4 ready\r\n')
        assert c.sock.selected_alpn_protocol() == (alpn and 'imap')
    else:
        with pytest.raises(ssl.SSLError, match='NO_APPLICATION_PROTOCOL|no application'):
            tls_connect(proxy, ctx)


# --- certificates and parameters ----------------------------------------------------------

def test_rsa_and_ecdsa_pairs_in_one_server(mailproxy, backends, pki):
    rsa, rsa_key = pki.server_files('rsa')
    ec, ec_key = pki.server_files('ecdsa')
    proxy = mailproxy('''
mail {
    error_log {log} info; auth_http {auth};
    ssl_certificate %s; ssl_certificate_key %s;
    ssl_certificate %s; ssl_certificate_key %s;
    server { listen 127.0.0.1:{port} ssl; protocol imap; }
}''' % (rsa, rsa_key, ec, ec_key))
    for ciphers, algorithm in (('ECDHE-RSA-AES128-GCM-SHA256', 'RSA'),
                               ('ECDHE-ECDSA-AES128-GCM-SHA256', 'ECDSA')):
        ctx = pki.client_context(max_version=ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(ciphers)
        c = tls_connect(proxy, ctx)
        c.expect(b'* OK IMAP4 ready\r\n')
        assert c.sock.cipher()[0] == ciphers, algorithm


def test_inline_data_certificate(mailproxy, backends, pki):
    cert, key = pki.server_files('ecdsa')
    data = lambda p: '"data:%s"' % p.read_text()     # noqa: E731
    proxy = mailproxy('''
mail {
    error_log {log} info; auth_http {auth};
    server { listen 127.0.0.1:{port} ssl; protocol imap;
             ssl_certificate %s; ssl_certificate_key %s; }
}''' % (data(cert), data(key)))
    c = tls_connect(proxy, pki.client_context())
    c.expect(b'* OK IMAP4 ready\r\n')


def test_protocols_and_ciphers(mailproxy, backends, pki):
    proxy = mailproxy(conf(pki, 'imap', 'ssl_protocols TLSv1.2; ssl_prefer_server_ciphers on;'
                           ' ssl_ciphers ECDHE-RSA-AES256-GCM-SHA384;', listen=' ssl'))
    c = tls_connect(proxy, pki.client_context())
    c.expect(b'* OK IMAP4 ready\r\n')
    assert c.sock.version() == 'TLSv1.2'
    assert c.sock.cipher()[0] == 'ECDHE-RSA-AES256-GCM-SHA384'
    ctx = pki.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(ssl.SSLError):
        tls_connect(proxy, ctx)


def test_ssl_conf_command_and_curve(mailproxy, backends, pki):
    proxy = mailproxy(conf(pki, 'imap', 'ssl_ecdh_curve secp384r1:X25519;'
                           ' ssl_conf_command Protocol -TLSv1.3;', listen=' ssl'))
    c = tls_connect(proxy, pki.client_context())
    c.expect(b'* OK IMAP4 ready\r\n')
    assert c.sock.version() == 'TLSv1.2'


def test_sni_picks_certificate_by_name(mailproxy, backends, pki):
    a, a_key = pki.issue_server('a', 'a.example.org')
    b, b_key = pki.issue_server('b', 'b.example.org', '*.mail.example.org')
    proxy = mailproxy('''
mail {
    error_log {log} info; auth_http {auth};
    ssl_certificate %s; ssl_certificate_key %s;
    ssl_certificate %s; ssl_certificate_key %s;
    server { listen 127.0.0.1:{port} ssl; protocol imap; }
}''' % (a, a_key, b, b_key))
    for name in ('a.example.org', 'b.example.org', 'imap.mail.example.org'):
        c = tls_connect(proxy, pki.client_context(), server_hostname=name)  # verifies name
        c.expect(b'* OK IMAP4 ready\r\n')


# --- session resumption ---------------------------------------------------------------------

def _resumed(proxy, pki, version):
    ctx = pki.client_context(max_version=version)
    first = tls_connect(proxy, ctx)
    first.expect(b'* OK IMAP4 ready\r\n')       # the TLS 1.3 ticket arrives with it
    first.send(b'a1 LOGOUT\r\n')
    first.expect(b'* BYE\r\na1 OK completed\r\n')
    assert first.closed()                         # the proxy ended this TLS session
    session = first.sock.session
    first.close()
    second = tls_connect(proxy, ctx, session=session)
    second.expect(b'* OK IMAP4 ready\r\n')
    return second.sock.session_reused


@pytest.mark.parametrize('version', [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize('directives, reused', [
    ('', True),                                                     # none + tickets
    ('ssl_session_cache builtin:100; ssl_session_tickets off;', True),
    ('ssl_session_cache shared:SSL:1m; ssl_session_tickets off;', True),
    ('ssl_session_cache none; ssl_session_tickets off;', False),
    ('ssl_session_cache off; ssl_session_tickets off;', False),
])
def test_session_resumption(mailproxy, backends, pki, version, directives, reused):
    proxy = mailproxy(conf(pki, 'imap', directives, listen=' ssl'))
    assert _resumed(proxy, pki, version) is reused


def test_session_ticket_key_file(mailproxy, backends, pki, tmp_path):
    key = tmp_path / 'ticket.key'
    key.write_bytes(bytes(range(80)))
    old = tmp_path / 'old.key'
    old.write_bytes(bytes(range(100, 148)))
    proxy = mailproxy(conf(pki, 'imap', 'ssl_session_ticket_key %s; ssl_session_ticket_key %s;'
                           % (key, old), listen=' ssl'))
    assert _resumed(proxy, pki, ssl.TLSVersion.TLSv1_2) is True
    assert _resumed(proxy, pki, ssl.TLSVersion.TLSv1_3) is True


# --- client certificates --------------------------------------------------------------------

def _cert_conf(pki, proto, mode, extra=''):
    ca = '' if mode == 'optional_no_ca' else 'ssl_client_certificate %s;' % pki.ca_file
    return conf(pki, proto, 'ssl_verify_client %s; %s auth_http_pass_client_cert on; %s'
                % (mode, ca, extra), listen=' ssl')


CERT_CASES = [
    # mode, client certificate, outcome. The trusted client's TLS stack sends its CA
    # along (OpenSSL builds the chain from its trust store), the untrusted one cannot.
    ('on', 'trusted', 'SUCCESS'),
    ('on', 'untrusted', 'cert_error'),
    ('on', None, 'cert_missing'),
    ('optional', 'trusted', 'SUCCESS'),
    ('optional', 'untrusted', 'cert_error'),
    ('optional', None, 'NONE'),
    ('optional_no_ca', 'trusted', 'FAILED:self-signed certificate in certificate chain'),
    ('optional_no_ca', 'untrusted', 'FAILED:unable to verify the first certificate'),
    ('optional_no_ca', None, 'NONE'),
]

SUBJECTS = {
    'trusted': (b'Auth-SSL-Subject: CN=client.example.com,OU=Mail Users,O=Example Org',
                b'Auth-SSL-Issuer: OU=Testing,O=Gmailproxy Test CA'),
    'untrusted': (b'Auth-SSL-Subject: CN=rogue.example,OU=Rogues,O=Rogue Org',
                  b'Auth-SSL-Issuer: OU=Elsewhere,O=Untrusted CA'),
}


@pytest.mark.parametrize('mode, client, outcome', CERT_CASES)
def test_client_certificate_imap(mailproxy, backends, auth, pki, mode, client, outcome):
    proxy = mailproxy(_cert_conf(pki, 'imap', mode))
    c = tls_connect(proxy, pki.client_context(client=client))
    if outcome == 'cert_error':
        assert c.recv_all_until_close() == b'* BYE SSL certificate error\r\n'
        proxy.wait_log(r'\[info\] .*client SSL certificate verify error: \(21:unable to verify '
                       r'the first certificate\) while SSL handshaking, client: ')
        assert auth.requests == []
        return
    if outcome == 'cert_missing':
        assert c.recv_all_until_close() == b'* BYE No required SSL certificate\r\n'
        proxy.wait_log(r'\[info\] .*client sent no required SSL certificate while SSL '
                       r'handshaking, client: ')
        assert auth.requests == []
        return
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 OK')
    check_auth_ssl_headers(auth.requests[0], c.sock, pki, client, outcome)


def check_auth_ssl_headers(raw: bytes, sock, pki, client, verify: str) -> None:
    """Every Auth-SSL* line, in nginx's order, at the end of the request."""
    expected = [b'Auth-SSL: on',
                b'Auth-SSL-Protocol: ' + sock.version().encode(),
                b'Auth-SSL-Cipher: ' + sock.cipher()[0].encode(),
                b'Auth-SSL-Verify: ' + verify.encode()]
    if client is not None:
        der = pki.client_der(client)
        expected += list(SUBJECTS[client])
        expected += [b'Auth-SSL-Serial: ' + _openssl_serial(der),
                     b'Auth-SSL-Fingerprint: ' + hashlib.sha1(der).hexdigest().encode(),
                     b'Auth-SSL-Cert: ' + _nginx_escape(pki.client_pem(client))]
        assert b'Auth-SSL-Cert: -----BEGIN%20CERTIFICATE-----%0AMII' in raw
    block = b''.join(line + b'\r\n' for line in expected)
    assert raw.endswith(b'\r\n' + block + b'\r\n'), raw      # last, no auth_http_header
    assert raw.count(b'\r\nAuth-SSL') == len(expected), raw


def _openssl_serial(der: bytes) -> bytes:
    """i2a_ASN1_INTEGER: the serial's bytes as upper-case hex pairs."""
    from cryptography import x509
    serial = x509.load_der_x509_certificate(der).serial_number
    return serial.to_bytes((serial.bit_length() + 7) // 8 or 1, 'big').hex().upper().encode()


def _nginx_escape(data: bytes) -> bytes:
    """NGX_ESCAPE_MAIL_AUTH: controls, space and % as %XX."""
    return b''.join(b'%%%02X' % c if c <= 0x20 or c == 0x25 else bytes([c]) for c in data)


# --- the three protocols side by side --------------------------------------------------------

SMTP_NAME = 'server_name mail.example.com;'
PLAIN_IR = b'AGFsaWNlAHNlY3JldA=='          # \0alice\0secret
PROTOCOLS = {
    'imap': dict(greeting=b'* OK IMAP4 ready\r\n', hello=[],
                 starttls=(b'a1 STARTTLS\r\n', b'a1 OK completed\r\n'),
                 noop=(b'a9 NOOP\r\n', b'a9 OK completed\r\n'),
                 login=[(b'a2 LOGIN alice secret\r\n', b'a2 OK')],
                 cert_error=b'* BYE SSL certificate error\r\n',
                 cert_missing=b'* BYE No required SSL certificate\r\n'),
    'pop3': dict(greeting=b'+OK POP3 ready\r\n', hello=[],
                 starttls=(b'STLS\r\n', b'+OK\r\n'),
                 noop=(b'NOOP\r\n', b'+OK\r\n'),
                 login=[(b'USER alice\r\n', b'+OK\r\n'), (b'PASS secret\r\n', b'+OK')],
                 cert_error=b'-ERR SSL certificate error\r\n',
                 cert_missing=b'-ERR No required SSL certificate\r\n'),
    'smtp': dict(greeting=b'220 mail.example.com ESMTP ready\r\n',
                 hello=[(b'EHLO client.example.com\r\n', b'250 ')],
                 starttls=(b'STARTTLS\r\n', b'220 2.0.0 Start TLS\r\n'),
                 noop=(b'NOOP\r\n', b'250 2.0.0 OK\r\n'),
                 login=[(b'EHLO client.example.com\r\n', b'250 '),
                        (b'AUTH PLAIN ' + PLAIN_IR + b'\r\n', b'235 2.0.0 OK\r\n')],
                 cert_error=b'421 4.7.1 SSL certificate error\r\n',
                 cert_missing=b'421 4.7.1 No required SSL certificate\r\n'),
}


def talk(c, steps):
    """Send each line and check the reply: exact when it ends in LF, else the start of
    the last line of a (possibly multi-line) reply."""
    for line, reply in steps:
        c.send(line)
        if reply.endswith(b'\n'):
            c.expect(reply)
        else:
            c.read_lines_until(reply)


@pytest.mark.parametrize('proto', ['pop3', 'smtp'])
def test_starttls_login(mailproxy, backends, auth, pki, proto):
    p = PROTOCOLS[proto]
    proxy = mailproxy(conf(pki, proto, 'starttls on; %s xclient off;' % SMTP_NAME))
    c = proxy.client(greeting=p['greeting'])
    talk(c, p['hello'] + [p['starttls']])
    c.starttls(pki.client_context(), server_hostname='localhost')
    talk(c, [p['noop']] + p['login'])
    assert auth.parsed[0].get('Auth-SSL') == 'on'
    assert auth.parsed[0].get('Auth-SSL-Protocol') == c.sock.version()
    proxy.wait_log('client logged in, client: 127.0.0.1 using starttls')


@pytest.mark.parametrize('proto', ['pop3', 'smtp'])
def test_implicit_tls_login(mailproxy, backends, auth, pki, proto):
    p = PROTOCOLS[proto]
    proxy = mailproxy(conf(pki, proto, '%s xclient off;' % SMTP_NAME, listen=' ssl'))
    c = tls_connect(proxy, pki.client_context())
    c.expect(p['greeting'])
    talk(c, p['login'])
    assert auth.parsed[0].get('Auth-SSL') == 'on'


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_starttls_injection(mailproxy, backends, auth, pki, proto):
    """Pipelined after STARTTLS in one packet, a credential command is discarded: no
    reply (in plaintext or in TLS), no auth request, nothing at the backend."""
    p = PROTOCOLS[proto]
    injected = {'imap': b'a2 LOGIN alice secret\r\n', 'pop3': b'USER alice\r\nPASS secret\r\n',
                'smtp': b'AUTH PLAIN ' + PLAIN_IR + b'\r\n'}[proto]
    proxy = mailproxy(conf(pki, proto, 'starttls on; %s' % SMTP_NAME))
    c = proxy.client(greeting=p['greeting'])
    talk(c, p['hello'])
    c.send(p['starttls'][0] + injected)
    c.expect(p['starttls'][1])
    c.starttls(pki.client_context(), server_hostname='localhost')
    talk(c, [p['noop']])
    assert c.silent(0.3)
    assert auth.requests == []
    assert backends[proto].received == b''


STARTTLS_ONLY = {
    'pop3': dict(capa=(b'CAPA\r\n', b'+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n'
                                    b'.\r\n'),
                 after=(b'CAPA\r\n', b'+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n'
                                     b'SASL PLAIN LOGIN\r\n.\r\n'),
                 refused=[b'USER alice\r\n', b'APOP alice 0123456789abcdef0123456789abcdef\r\n',
                          b'AUTH\r\n', b'AUTH PLAIN\r\n', b'AUTH PLAIN ' + PLAIN_IR + b'\r\n',
                          b'AUTH LOGIN\r\n', b'PASS secret\r\n'],
                 invalid=b'-ERR invalid command\r\n'),
    'smtp': dict(capa=(b'EHLO client.example.com\r\n',
                       b'250-mail.example.com\r\n250 STARTTLS\r\n'),
                 after=(b'EHLO client.example.com\r\n',
                        b'250-mail.example.com\r\n250 AUTH PLAIN LOGIN\r\n'),
                 refused=[b'AUTH PLAIN ' + PLAIN_IR + b'\r\n', b'AUTH PLAIN\r\n',
                          b'AUTH LOGIN\r\n', b'AUTH\r\n'],
                 invalid=b'500 5.5.1 Invalid command\r\n'),
}


@pytest.mark.parametrize('proto', ['pop3', 'smtp'])
def test_starttls_only_refuses_credentials(mailproxy, backends, auth, pki, proto):
    p, only = PROTOCOLS[proto], STARTTLS_ONLY[proto]
    proxy = mailproxy(conf(pki, proto, 'starttls only; max_errors 20; xclient off; %s'
                           % SMTP_NAME))
    c = proxy.client(greeting=p['greeting'])
    talk(c, [only['capa']])
    for line in only['refused']:
        c.send(line)
        c.expect(only['invalid'])
    talk(c, [p['noop'], p['starttls']])
    c.starttls(pki.client_context(), server_hostname='localhost')
    talk(c, [only['after']] + p['login'])
    assert len(auth.requests) == 1


@pytest.mark.parametrize('proto', ['pop3', 'smtp'])
@pytest.mark.parametrize('mode, client, outcome', [
    ('on', 'untrusted', 'cert_error'), ('on', None, 'cert_missing'),
    ('optional_no_ca', 'untrusted', 'FAILED:unable to verify the first certificate'),
    ('on', 'trusted', 'SUCCESS'), ('optional', None, 'NONE')])
def test_client_certificate(mailproxy, backends, auth, pki, proto, mode, client, outcome):
    p = PROTOCOLS[proto]
    proxy = mailproxy(_cert_conf(pki, proto, mode, SMTP_NAME + ' xclient off;'))
    c = tls_connect(proxy, pki.client_context(client=client))
    if outcome in ('cert_error', 'cert_missing'):
        assert c.recv_all_until_close() == p[outcome]
        assert auth.requests == []
        return
    c.expect(p['greeting'])
    talk(c, p['login'])
    check_auth_ssl_headers(auth.requests[0], c.sock, pki, client, outcome)


@pytest.mark.parametrize('proto', ['imap', 'pop3', 'smtp'])
def test_client_certificate_after_starttls(mailproxy, backends, auth, pki, proto):
    """The check runs after a STARTTLS handshake too; the reply goes out inside TLS."""
    p = PROTOCOLS[proto]
    proxy = mailproxy(conf(pki, proto, 'starttls on; ssl_verify_client on; '
                           'ssl_client_certificate %s; %s' % (pki.ca_file, SMTP_NAME)))
    c = proxy.client(greeting=p['greeting'])
    talk(c, p['hello'] + [p['starttls']])
    c.starttls(pki.client_context(client='untrusted'), server_hostname='localhost')
    assert c.recv_all_until_close() == p['cert_error']
    proxy.wait_log(r'client SSL certificate verify error: \(21:unable to verify the first '
                   r'certificate\) while in starttls state, client: 127\.0\.0\.1 using '
                   r'starttls, server: ')


# --- more client-certificate settings --------------------------------------------------------

def _openssl(*args, stdin=b''):
    import shutil
    import subprocess
    binary = shutil.which('openssl') or pytest.skip('openssl not found')
    done = subprocess.run([binary, *args], input=stdin, capture_output=True, timeout=TIMEOUT)
    return (done.stdout + done.stderr).decode('latin-1')


@pytest.mark.parametrize('directive, names', [
    ('ssl_client_certificate', 'Acceptable client certificate CA names\n'
                               'O = Gmailproxy Test CA, OU = Testing\n'),
    ('ssl_trusted_certificate', 'No client certificate CA names sent\n'),
])
def test_ca_names_sent_only_for_client_certificate(mailproxy, backends, pki, directive, names):
    proxy = mailproxy(conf(pki, 'imap', 'ssl_verify_client optional; %s %s;'
                           % (directive, pki.ca_file), listen=' ssl'))
    out = _openssl('s_client', '-connect', '127.0.0.1:%d' % proxy.port, '-tls1_2')
    assert names in out, out


def test_trusted_certificate_verifies(mailproxy, backends, auth, pki):
    proxy = mailproxy(conf(pki, 'imap', 'ssl_verify_client on; ssl_trusted_certificate %s;'
                           % pki.ca_file, listen=' ssl'))
    c = tls_connect(proxy, pki.client_context(client='trusted'))
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 OK')
    assert auth.parsed[0].get('Auth-SSL-Verify') == 'SUCCESS'


def test_crl_revokes(mailproxy, backends, pki, tmp_path):
    crl = pki.crl_file(revoke_trusted_client=True)
    proxy = mailproxy(conf(pki, 'imap', 'ssl_verify_client on; ssl_client_certificate %s; '
                           'ssl_crl %s;' % (pki.ca_file, crl), listen=' ssl'))
    c = tls_connect(proxy, pki.client_context(client='trusted'))
    assert c.recv_all_until_close() == b'* BYE SSL certificate error\r\n'
    proxy.wait_log(r'client SSL certificate verify error: \(23:certificate revoked\)')


@pytest.mark.parametrize('depth, outcome', [
    (0, b'* BYE SSL certificate error\r\n'), (1, b'* OK IMAP4 ready\r\n')])
def test_verify_depth(mailproxy, backends, pki, depth, outcome):
    """leaf <- intermediate <- trusted root: depth 1 (the default) allows one
    intermediate CA below the trust anchor (OpenSSL's counting)."""
    proxy = mailproxy(conf(pki, 'imap', 'ssl_verify_client on; ssl_client_certificate %s; '
                           'ssl_verify_depth %d;' % (pki.ca_file, depth), listen=' ssl'))
    ctx = pki.client_context()
    ctx.load_cert_chain(*pki.chained_client_files())
    c = tls_connect(proxy, ctx)
    c.expect(outcome)
    if depth == 0:
        # OpenSSL stops building the chain at the limit, short of the trust anchor
        proxy.wait_log(r'client SSL certificate verify error: \(20:unable to get local '
                       r'issuer certificate\)')


# --- PROXY protocol, then TLS -----------------------------------------------------------------

def test_proxy_header_and_client_hello_in_one_packet(mailproxy, backends, auth, pki):
    """The PROXY header is plaintext before the ClientHello; sent together, the
    handshake still gets every byte of the hello."""
    proxy = mailproxy(conf(pki, 'imap', 'set_real_ip_from 127.0.0.1;',
                           listen=' ssl proxy_protocol'))
    sock = socket.create_connection(('127.0.0.1', proxy.port), timeout=TIMEOUT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname='localhost')
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock.sendall(b'PROXY TCP4 192.0.2.7 127.0.0.1 5555 993\r\n' + outgoing.read())

    def until(step):
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, 'closed during the handshake'
                incoming.write(data)
    until(tls.do_handshake)
    sock.sendall(outgoing.read())
    assert until(lambda: tls.read(100)) == b'* OK IMAP4 ready\r\n'
    tls.write(b'a1 LOGIN alice secret\r\n')
    sock.sendall(outgoing.read())
    assert until(lambda: tls.read(100)).startswith(b'a1 OK')
    req = auth.parsed[0]
    assert req.get('Client-IP') == '192.0.2.7' and req.get('Auth-SSL') == 'on'
    sock.close()


def test_proxy_header_then_handshake_share_the_timeout(mailproxy, backends, pki):
    proxy = mailproxy(conf(pki, 'imap', 'timeout 400ms;', listen=' ssl proxy_protocol'))
    c = proxy.client()
    c.send(b'PROXY TCP4 192.0.2.7 127.0.0.1 5555 993\r\n')
    assert c.recv_all_until_close(3.0) == b''
    proxy.wait_log(r'client timed out \(110: Connection timed out\) while SSL handshaking')
