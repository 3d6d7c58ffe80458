"""TLS end to end: real clients (imaplib, poplib, smtplib, ``openssl s_client``, ``curl``)
-> gmailproxy (subprocess) with STARTTLS and implicit-TLS servers -> Dovecot / Postfix.

Certificates are made at test time (tests.support.certs); the clients verify the proxy's
certificate against the test CA, by IP address (127.0.0.1 is in the certificate).
"""
import imaplib
import poplib
import shutil
import smtplib
import subprocess

import pytest

from tests.support import dump_on_failure
from tests.support.auth import RecordingAuthServer
from tests.support.backends import Dovecot, Postfix
from tests.support.certs import PKI
from tests.support.net import free_ports
from tests.support.proxyproc import GmailProxy

T = 10.0
HOST = '127.0.0.1'
MESSAGE = (b'From: alice@test.example\r\nTo: bob@test.example\r\nSubject: over TLS\r\n\r\n'
           b'sent through the proxy\r\n')
NAMES = ('imap', 'imaps', 'pop3', 'pop3s', 'smtp', 'smtps')

CONF = '''
events { }
mail {
    auth_http %(auth)s;
    server_name mx.test.example;
    ssl_certificate %(cert)s;
    ssl_certificate_key %(key)s;
    server { listen 127.0.0.1:%(imap)d;        protocol imap; starttls on; }
    server { listen 127.0.0.1:%(imaps)d ssl;   protocol imap; }
    server { listen 127.0.0.1:%(pop3)d;        protocol pop3; starttls only; }
    server { listen 127.0.0.1:%(pop3s)d ssl;   protocol pop3; }
    server { listen 127.0.0.1:%(smtp)d;        protocol smtp; starttls on; }
    server { listen 127.0.0.1:%(smtps)d ssl;   protocol smtp; }
}
'''


class Stack:
    """One gmailproxy serving the six listeners, its auth service and backends."""

    def __init__(self, pki, auth, dovecot, postfix, proxy, ports):
        self.pki, self.auth, self.dovecot, self.postfix = pki, auth, dovecot, postfix
        self.proxy, self.ports = proxy, ports
        self.ca = str(pki.ca_file)

    def context(self):
        return self.pki.client_context()


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tls-e2e')
    pki = PKI(folder / 'pki')
    auth = RecordingAuthServer(users={'alice': {'password': 'secret'}}).start()
    dovecot = Dovecot(users={'alice': 'secret', 'bob': 'hunter2'})
    postfix = Postfix(mailboxes=('alice', 'bob'))
    proxy = None
    try:
        dovecot.start()
        postfix.start()
        auth.ports = {'imap': dovecot.imap_port, 'pop3': dovecot.pop3_port,
                      'smtp': postfix.port}
        ports = dict(zip(NAMES, free_ports(len(NAMES))))
        cert, key = pki.server_files('rsa')
        proxy = GmailProxy(CONF % dict(auth=auth.url, cert=cert, key=key, **ports),
                           folder / 'proxy')
        proxy.start(ports.values())
        yield Stack(pki, auth, dovecot, postfix, proxy, ports)
    finally:
        if proxy is not None:
            proxy.stop()
        postfix.stop()
        dovecot.stop()
        auth.stop()


@pytest.fixture
def tls(stack, request):
    """The stack, with the proxy log printed if the test fails."""
    start = len(stack.proxy.log_text())
    del stack.auth.requests[:], stack.auth.parsed[:]
    yield stack
    dump_on_failure(request, 'gmailproxy log', stack.proxy.log_text()[start:])


def last_auth(stack):
    (req,) = stack.auth.parsed[-1:]
    return req


# --- Python's clients ---------------------------------------------------------------------

def test_imaplib_imap4_ssl(tls):
    tls.dovecot.deliver('alice', MESSAGE)
    with imaplib.IMAP4_SSL(HOST, tls.ports['imaps'], ssl_context=tls.context(),
                           timeout=T) as imap:
        assert imap.login('alice', 'secret')[0] == 'OK'
        typ, data = imap.select('INBOX')
        assert typ == 'OK' and int(data[0]) >= 1
    req = last_auth(tls)
    assert req.get('Auth-SSL') == 'on' and req.get('Auth-SSL-Protocol') == 'TLSv1.3'


def test_imaplib_starttls(tls):
    with imaplib.IMAP4(HOST, tls.ports['imap'], timeout=T) as imap:
        assert 'STARTTLS' in imap.capabilities
        assert imap.starttls(ssl_context=tls.context())[0] == 'OK'
        assert 'STARTTLS' not in imap.capabilities
        assert imap.login('alice', 'secret')[0] == 'OK'
        assert imap.select('INBOX')[0] == 'OK'
    assert last_auth(tls).get('Auth-SSL') == 'on'
    tls.proxy.wait_log('client logged in, client: 127.0.0.1 using starttls, server: '
                       '127.0.0.1:%d' % tls.ports['imap'])


def test_poplib_pop3_ssl(tls):
    tls.dovecot.deliver('alice', MESSAGE)
    pop = poplib.POP3_SSL(HOST, tls.ports['pop3s'], context=tls.context(), timeout=T)
    try:
        assert pop.user('alice').startswith(b'+OK')
        assert pop.pass_('secret').startswith(b'+OK')
        count, _ = pop.stat()
        assert count >= 1
    finally:
        pop.quit()
    assert last_auth(tls).get('Auth-SSL') == 'on'


def test_poplib_stls_with_starttls_only(tls):
    pop = poplib.POP3(HOST, tls.ports['pop3'], timeout=T)
    try:
        assert pop.capa() == {'TOP': [], 'UIDL': [], 'STLS': []}
        with pytest.raises(poplib.error_proto, match='invalid command'):
            pop.user('alice')
        assert pop.stls(context=tls.context()).startswith(b'+OK')
        assert 'USER' in pop.capa()
        assert pop.user('alice').startswith(b'+OK')
        assert pop.pass_('secret').startswith(b'+OK')
        pop.stat()
    finally:
        pop.quit()
    assert last_auth(tls).get('Auth-SSL') == 'on'


def test_smtplib_smtp_ssl(tls):
    with smtplib.SMTP_SSL(HOST, tls.ports['smtps'], context=tls.context(),
                          timeout=T) as smtp:
        smtp.ehlo('client.example')
        assert smtp.login('alice', 'secret')[0] == 235
        assert smtp.sendmail('alice@test.example', ['bob@test.example'], MESSAGE) == {}
    assert b'sent through the proxy' in tls.postfix.wait_messages('bob', 1)[-1]
    assert last_auth(tls).get('Auth-SSL') == 'on'


def test_smtplib_starttls(tls):
    before = len(tls.postfix.messages('bob'))
    with smtplib.SMTP(HOST, tls.ports['smtp'], timeout=T) as smtp:
        smtp.ehlo('client.example')
        assert smtp.has_extn('starttls')
        assert smtp.starttls(context=tls.context())[0] == 220
        smtp.ehlo('client.example')
        assert not smtp.has_extn('starttls')
        assert smtp.login('alice', 'secret')[0] == 235
        assert smtp.sendmail('alice@test.example', ['bob@test.example'], MESSAGE) == {}
    assert len(tls.postfix.wait_messages('bob', before + 1)) == before + 1
    assert last_auth(tls).get('Auth-SSL') == 'on'


# --- openssl s_client ---------------------------------------------------------------------

def s_client(stack, port, starttls, commands: bytes) -> str:
    openssl = shutil.which('openssl')
    if openssl is None:
        pytest.skip('openssl not found')
    argv = [openssl, 's_client', '-connect', '%s:%d' % (HOST, port), '-CAfile', stack.ca,
            '-verify_return_error', '-verify_ip', HOST, '-crlf', '-ign_eof']
    if starttls:
        argv += ['-starttls', starttls]
    done = subprocess.run(argv, input=commands, capture_output=True, timeout=T)
    out = done.stdout.decode('latin-1')
    assert done.returncode == 0, out + done.stderr.decode('latin-1')
    assert 'Verify return code: 0 (ok)' in out, out
    return out


@pytest.mark.parametrize('name, starttls, commands, answer', [
    ('imap', 'imap', b'a1 LOGIN alice secret\na2 LOGOUT\n', 'a1 OK'),
    ('imaps', None, b'a1 LOGIN alice secret\na2 LOGOUT\n', 'a1 OK'),
    ('pop3', 'pop3', b'USER alice\nPASS secret\nQUIT\n', '+OK Logged in.'),
    ('pop3s', None, b'USER alice\nPASS secret\nQUIT\n', '+OK Logged in.'),
    ('smtp', 'smtp', b'EHLO client.example\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\nQUIT\n',
     '235 2.0.0 OK'),
    ('smtps', None, b'EHLO client.example\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\nQUIT\n',
     '235 2.0.0 OK'),
])
def test_openssl_s_client(tls, name, starttls, commands, answer):
    out = s_client(tls, tls.ports[name], starttls, commands)
    assert answer in out, out
    assert last_auth(tls).get('Auth-SSL') == 'on'


def test_openssl_s_client_alpn_mismatch_is_fatal(tls):
    openssl = shutil.which('openssl') or pytest.skip('openssl not found')
    address = '%s:%d' % (HOST, tls.ports['imaps'])
    done = subprocess.run([openssl, 's_client', '-connect', address, '-alpn', 'unknown'],
                          input=b'', capture_output=True, timeout=T)
    text = (done.stdout + done.stderr).decode('latin-1')
    assert 'no application protocol' in text, text
    assert '* OK IMAP4 ready' not in text


# --- curl --------------------------------------------------------------------------------

def curl(stack, url: str, *args: str) -> str:
    binary = shutil.which('curl')
    if binary is None:
        pytest.skip('curl not found')
    done = subprocess.run([binary, '--silent', '--show-error', '--ssl-reqd', '--cacert',
                           stack.ca, '--max-time', str(int(T)), '-u', 'alice:secret', url,
                           *args], capture_output=True, timeout=T + 5)
    assert done.returncode == 0, done.stderr.decode('latin-1')
    return done.stdout.decode('latin-1')


@pytest.mark.parametrize('name, scheme', [('imap', 'imap'), ('imaps', 'imaps')])
def test_curl_imap(tls, name, scheme):
    out = curl(tls, '%s://%s:%d/' % (scheme, HOST, tls.ports[name]))
    assert 'INBOX' in out
    assert last_auth(tls).get('Auth-SSL') == 'on'


@pytest.mark.parametrize('name, scheme', [('pop3', 'pop3'), ('pop3s', 'pop3s')])
def test_curl_pop3(tls, name, scheme):
    tls.dovecot.deliver('alice', MESSAGE)
    out = curl(tls, '%s://%s:%d/' % (scheme, HOST, tls.ports[name]))
    assert out.split()[0] == '1'                        # LIST: "1 <size>" ...
    assert last_auth(tls).get('Auth-SSL') == 'on'


@pytest.mark.parametrize('name, scheme', [('smtp', 'smtp'), ('smtps', 'smtps')])
def test_curl_smtp(tls, name, scheme, tmp_path):
    before = len(tls.postfix.messages('bob'))
    mail = tmp_path / 'mail.eml'
    mail.write_bytes(MESSAGE)
    curl(tls, '%s://%s:%d' % (scheme, HOST, tls.ports[name]), '--mail-from',
         'alice@test.example', '--mail-rcpt', 'bob@test.example', '--upload-file', str(mail))
    assert len(tls.postfix.wait_messages('bob', before + 1)) == before + 1
    assert last_auth(tls).get('Auth-SSL') == 'on'
