"""gmailproxy.ssl: contexts built from configuration (ssl.md section 4), their error
messages, and the helpers that pick certificates and session caches."""
import socket
import ssl
import threading

import pytest
import trustme

from gmailproxy import ssl as tls
from gmailproxy.config.parser import load
from gmailproxy.errors import ConfigError
from tests.support.certs import PKI

T = 5.0


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp('pki'))


def server_conf(tmp_path, directives, listen='ssl'):
    path = tmp_path / 'mail.conf'
    path.write_text('''
events { }
mail {
    auth_http http://127.0.0.1:9/auth;
    server { listen 127.0.0.1:1143 %s; protocol imap; %s }
}
''' % (listen, directives))
    (conf,) = load(str(path)).servers
    return conf


def pair_directives(pki, kind='rsa'):
    cert, key = pki.server_files(kind)
    return 'ssl_certificate %s; ssl_certificate_key %s;' % (cert, key)


def handshake(ctx, client_ctx, server_hostname='localhost'):
    """One in-memory handshake between ``ctx`` (server) and ``client_ctx``; returns the
    client's SSLSocket-like view: (version, cipher, peer certificate DER)."""
    a, b = socket.socketpair()
    a.settimeout(T)
    b.settimeout(T)
    result = {}

    def serve():
        try:
            with ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b'hello')
        except (ssl.SSLError, OSError) as exc:
            result['server_error'] = exc
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            assert c.recv(5) == b'hello'
            return c.version(), c.cipher()[0], c.getpeercert(binary_form=True)
    finally:
        thread.join(T)


def test_context_serves_configured_pair(tmp_path, pki):
    conf = server_conf(tmp_path, pair_directives(pki, 'ecdsa'))
    assert conf.ssl_ctx is not None and conf.ssl_ctx.by_name == []
    version, _, der = handshake(conf.ssl_ctx.default, pki.client_context())
    assert version == 'TLSv1.3'
    assert der == ssl.PEM_cert_to_DER_cert(pki.servers['ecdsa'].cert_chain_pems[0].bytes()
                                           .decode())


def test_no_context_without_tls(tmp_path, pki):
    conf = server_conf(tmp_path, pair_directives(pki), listen='')
    assert conf.ssl_ctx is None


def test_starttls_builds_context(tmp_path, pki):
    conf = server_conf(tmp_path, pair_directives(pki) + ' starttls only;', listen='')
    assert conf.ssl_ctx is not None


def test_reload_reads_certificate_files_again(tmp_path, pki):
    """Each load builds fresh contexts from the files as they are now."""
    cert, key = tmp_path / 'c.pem', tmp_path / 'k.pem'
    for kind in ('rsa', 'ecdsa'):
        src_cert, src_key = pki.server_files(kind)
        cert.write_bytes(src_cert.read_bytes())
        key.write_bytes(src_key.read_bytes())
        conf = server_conf(tmp_path, 'ssl_certificate %s; ssl_certificate_key %s;'
                           % (cert, key))
        _, _, der = handshake(conf.ssl_ctx.default, pki.client_context())
        assert der == pki_der(pki, kind)


def pki_der(pki, kind):
    return ssl.PEM_cert_to_DER_cert(pki.servers[kind].cert_chain_pems[0].bytes().decode())


def test_session_id_context_depends_on_certificates(tmp_path, pki):
    def sid(kind):
        conf = server_conf(tmp_path, pair_directives(pki, kind))
        pairs = tls._pairs(conf, [b''])
        try:
            return tls._session_id_context(conf, pairs)
        finally:
            for pair in pairs:
                pair.free()
    assert sid('rsa') == sid('rsa') != sid('ecdsa')
    assert len(sid('rsa')) == 20


@pytest.mark.parametrize('words, expected', [
    (('none',), ('none', 0)),
    (('off',), ('off', 0)),
    (('builtin',), ('store', 0)),
    (('builtin:1000',), ('store', 1000)),
    (('shared:SSL:1m',), ('store', 4000)),
    (('builtin:50', 'shared:SSL:10m'), ('store', 50)),
])
def test_cache_kind(words, expected):
    assert tls._cache_kind(words) == expected


def test_sni_name_matching(tmp_path, pki):
    a, a_key = pki.issue_server('u-a', 'a.example.org')
    b, b_key = pki.issue_server('u-b', 'B.Example.org', '*.mail.example.org')
    conf = server_conf(tmp_path, 'ssl_certificate %s; ssl_certificate_key %s; '
                       'ssl_certificate %s; ssl_certificate_key %s;' % (a, a_key, b, b_key))
    server = conf.ssl_ctx
    (names_a, ctx_a), (names_b, ctx_b) = server.by_name
    assert names_a == {'a.example.org'}
    assert names_b == {'b.example.org', '*.mail.example.org'}
    assert server.for_name('A.EXAMPLE.ORG.') is ctx_a
    assert server.for_name('b.example.org') is ctx_b
    assert server.for_name('imap.mail.example.org') is ctx_b
    assert server.for_name('x.imap.mail.example.org') is None
    assert server.for_name('mail.example.org') is None
    assert server.for_name('c.example.org') is None


def test_same_names_stay_in_one_context(tmp_path, pki):
    """RSA + ECDSA for the same names: one context, as nginx builds it."""
    conf = server_conf(tmp_path, pair_directives(pki, 'rsa') + pair_directives(pki, 'ecdsa'))
    assert conf.ssl_ctx.by_name == []


def test_password_file_tries_each_passphrase(tmp_path, pki):
    from cryptography.hazmat.primitives import serialization
    leaf = pki.ca.issue_cert('localhost', key_type=trustme.KeyType.RSA)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = tmp_path / 'enc.key'
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b'right one')))
    cert = tmp_path / 'enc.pem'
    cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    passwords = tmp_path / 'passwords'
    passwords.write_text('wrong\nright one\n')
    base = 'ssl_certificate %s; ssl_certificate_key %s;' % (cert, encrypted)
    conf = server_conf(tmp_path, base + ' ssl_password_file %s;' % passwords)
    handshake(conf.ssl_ctx.default, pki.client_context())
    with pytest.raises(ConfigError, match=r'^cannot load certificate key "%s": '
                       r'PEM_read_bio_PrivateKey\(\) failed \(SSL: error:' % encrypted):
        server_conf(tmp_path, base)


def test_missing_certificate_file(tmp_path, pki):
    _, key = pki.server_files('rsa')
    missing = tmp_path / 'missing.pem'
    with pytest.raises(ConfigError) as e:
        server_conf(tmp_path, 'ssl_certificate %s; ssl_certificate_key %s;' % (missing, key))
    assert str(e.value) == (
        'cannot load certificate "%s": BIO_new_file() failed (SSL: error:80000002:system '
        'library::No such file or directory:calling fopen(%s, r) error:10000080:BIO '
        'routines::no such file)' % (missing, missing))


def test_key_does_not_match_certificate(tmp_path, pki):
    cert, _ = pki.server_files('rsa')
    _, other_rsa = pki.issue_server('other-rsa', 'other.example')
    _, ecdsa_key = pki.server_files('ecdsa')
    with pytest.raises(ConfigError) as e:
        server_conf(tmp_path, 'ssl_certificate %s; ssl_certificate_key %s;' % (cert, other_rsa))
    assert str(e.value) == ('SSL_CTX_use_PrivateKey("%s") failed (SSL: error:05800074:x509 '
                            'certificate routines::key values mismatch)' % cert)
    with pytest.raises(ConfigError) as e:
        server_conf(tmp_path, 'ssl_certificate %s; ssl_certificate_key %s;' % (cert, ecdsa_key))
    assert str(e.value) == ('SSL_CTX_check_private_key("%s") failed (SSL: error:0A0000B1:SSL '
                            'routines::no certificate assigned)' % cert)


@pytest.mark.parametrize('directive, message', [
    ('ssl_ciphers BOGUS;', 'SSL_CTX_set_cipher_list("BOGUS") failed (SSL: error:0A0000B9:SSL '
                           'routines::no cipher match)'),
    ('ssl_ecdh_curve bogus;', 'SSL_CTX_set1_curves_list("bogus") failed (SSL: '),
    # SSL_CONF_cmd queues no reason (nginx does not ask for them either)
    ('ssl_conf_command NoSuchCommand x;', 'SSL_CONF_cmd("NoSuchCommand", "x") failed'),
    ('ssl_conf_command Protocol bogus;', 'SSL_CONF_cmd("Protocol", "bogus") failed'),
])
def test_bad_parameters(tmp_path, pki, directive, message):
    with pytest.raises(ConfigError) as e:
        server_conf(tmp_path, pair_directives(pki) + directive)
    assert str(e.value).startswith(message), str(e.value)
    if message.endswith('failed'):
        assert str(e.value) == message


def test_ticket_key_size(tmp_path, pki):
    key = tmp_path / 'ticket.key'
    key.write_bytes(b'x' * 47)
    with pytest.raises(ConfigError, match=r'^"%s" must be 48 or 80 bytes$' % key):
        server_conf(tmp_path, pair_directives(pki) + 'ssl_session_ticket_key %s;' % key)


def test_inline_data_values(tmp_path, pki):
    cert, key = pki.server_files('rsa')
    conf = server_conf(tmp_path, 'ssl_certificate "data:%s"; ssl_certificate_key "data:%s";'
                       % (cert.read_text(), key.read_text()))
    assert handshake(conf.ssl_ctx.default, pki.client_context())[2] == pki_der(pki, 'rsa')


def test_protocol_range(tmp_path, pki):
    conf = server_conf(tmp_path, pair_directives(pki) + 'ssl_protocols TLSv1.2;')
    assert conf.ssl_ctx.default.maximum_version == ssl.TLSVersion.TLSv1_2
    assert handshake(conf.ssl_ctx.default, pki.client_context())[0] == 'TLSv1.2'


def test_prefer_server_ciphers(tmp_path, pki):
    off = server_conf(tmp_path, pair_directives(pki)).ssl_ctx.default
    on = server_conf(tmp_path, pair_directives(pki) + 'ssl_prefer_server_ciphers on;')
    assert not off.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert on.ssl_ctx.default.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_session_cache_settings(tmp_path, pki):
    """The knobs Python does not show, read back from OpenSSL."""
    def mode(conf):
        ptr = tls.ctx_pointer(conf.ssl_ctx.default)
        return (tls.lib().SSL_CTX_ctrl(ptr, 45, 0, None),            # GET_SESS_CACHE_MODE
                tls.lib().SSL_CTX_ctrl(ptr, 43, 0, None))            # GET_SESS_CACHE_SIZE
    d = pair_directives(pki)
    assert mode(server_conf(tmp_path, d)) == (0x202, 1)
    assert mode(server_conf(tmp_path, d + 'ssl_session_cache off;'))[0] == 0
    assert mode(server_conf(tmp_path, d + 'ssl_session_cache builtin:77;')) == (0x2, 77)
    tickets_off = server_conf(tmp_path, d + 'ssl_session_tickets off;').ssl_ctx.default
    assert tickets_off.options & ssl.OP_NO_TICKET and tickets_off.num_tickets == 0


def test_names_fall_back_to_common_name(tmp_path):
    """A certificate without subjectAltName is matched by its subject's CN."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'Old.Example.NET'),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Old')])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x0102)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / 'cn.pem', tmp_path / 'cn.key'
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    (pair,) = tls._pairs(server_conf(tmp_path, 'ssl_certificate %s; ssl_certificate_key %s;'
                                     % (cert_file, key_file)), [b''])
    try:
        assert pair.names == {'old.example.net'}
    finally:
        pair.free()
