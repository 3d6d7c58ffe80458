"""TLS (ssl.md): contexts built once per server block at load, implicit TLS, STARTTLS,
client certificates and the ``Auth-SSL*`` request headers.

Python's ``ssl`` module makes the contexts and gevent's ``SSLSocket`` carries the bytes.
What it does not expose goes through ctypes into the very libssl ``_ssl`` is linked with,
on the ``SSL_CTX``/``SSL`` pointers of Python's own objects: certificates, keys, CAs and
CRLs are loaded with nginx's OpenSSL calls (so errors carry OpenSSL's reason as nginx
prints it); session cache modes, the session-id context, a verify callback that never
fails the handshake, the client CA list, the fatal ALPN mismatch, ``SSL_CONF_cmd``,
ticket key files and RFC 2253 names likewise.

Beyond nginx: with certificates for different names in one server, the SNI name picks the
pair whose subjectAltName matches; ``finalize`` (run by the parser at every load and
reload) reads every file again.
"""
import ctypes
import hashlib
import logging
import os
import ssl
import warnings

import _ssl
import gevent.ssl

from . import errors, log
from .config import values
from .config.directives import D, MAIL_SERVER

DIRECTIVES = [
    D('starttls', MAIL_SERVER, '1', values.choice('on', 'off', 'only'), default='off'),
    D('ssl_certificate', MAIL_SERVER, '1', values.path_or_data, multi='append', default=()),
    D('ssl_certificate_key', MAIL_SERVER, '1', values.path_or_data, multi='append', default=()),
    D('ssl_password_file', MAIL_SERVER, '1', values.path),
    D('ssl_certificate_compression', MAIL_SERVER, '1', values.flag, default=False),
    D('ssl_dhparam', MAIL_SERVER, '1', values.path),
    D('ssl_ecdh_curve', MAIL_SERVER, '1', values.string, default='auto'),
    D('ssl_protocols', MAIL_SERVER, '1+',
      values.methods('SSLv2', 'SSLv3', 'TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3'),
      multi='extend', default=('TLSv1.2', 'TLSv1.3')),
    D('ssl_ciphers', MAIL_SERVER, '1', values.string, default='HIGH:!aNULL:!MD5'),
    D('ssl_prefer_server_ciphers', MAIL_SERVER, '1', values.flag, default=False),
    D('ssl_session_cache', MAIL_SERVER, '1+', values.ssl_session_cache, default=('none',)),
    D('ssl_session_tickets', MAIL_SERVER, '1', values.flag, default=True),
    D('ssl_session_ticket_key', MAIL_SERVER, '1', values.path, multi='append', default=()),
    D('ssl_session_timeout', MAIL_SERVER, '1', values.time_s, default=300.0),
    D('ssl_verify_client', MAIL_SERVER, '1',
      values.choice('on', 'off', 'optional', 'optional_no_ca'), default='off'),
    D('ssl_verify_depth', MAIL_SERVER, '1', values.number, default=1),
    D('ssl_client_certificate', MAIL_SERVER, '1', values.path),
    D('ssl_trusted_certificate', MAIL_SERVER, '1', values.path),
    D('ssl_crl', MAIL_SERVER, '1', values.path),
    D('ssl_conf_command', MAIL_SERVER, '2', values.pair, multi='append', default=()),
]

_log = logging.getLogger(__name__)

SESSION_CONTEXT = b'MAIL'            # nginx's session-id context for the mail module

# ngx_ssl_verify_error_optional: the "no trusted CA" errors optional_no_ca lets through.
OPTIONAL_NO_CA_ERRORS = frozenset((18, 19, 20, 21, 27))

_PROTOCOL_VERSIONS = (('TLSv1', ssl.TLSVersion.TLSv1, 'OP_NO_TLSv1'),
                      ('TLSv1.1', ssl.TLSVersion.TLSv1_1, 'OP_NO_TLSv1_1'),
                      ('TLSv1.2', ssl.TLSVersion.TLSv1_2, 'OP_NO_TLSv1_2'),
                      ('TLSv1.3', ssl.TLSVersion.TLSv1_3, 'OP_NO_TLSv1_3'))


# --- libssl through ctypes ------------------------------------------------------------

class _Lib:
    """The functions of the libssl/libcrypto that ``_ssl`` uses (dlsym on ``_ssl``'s own
    handle resolves through its dependencies, so both sides share one OpenSSL)."""

    SIGNATURES = {
        # name: (restype, argtypes)
        'SSL_CTX_ctrl': (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                         ctypes.c_void_p]),
        'SSL_CTX_callback_ctrl': (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int,
                                                  ctypes.c_void_p]),
        'SSL_CTX_get_options': (ctypes.c_uint64, [ctypes.c_void_p]),
        'SSL_CTX_set_timeout': (ctypes.c_long, [ctypes.c_void_p, ctypes.c_long]),
        'SSL_CTX_set_session_id_context': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p,
                                                          ctypes.c_uint]),
        'SSL_CTX_set_verify': (None, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]),
        'SSL_CTX_set_verify_depth': (None, [ctypes.c_void_p, ctypes.c_int]),
        'SSL_load_client_CA_file': (ctypes.c_void_p, [ctypes.c_char_p]),
        'SSL_CTX_set_client_CA_list': (None, [ctypes.c_void_p, ctypes.c_void_p]),
        'SSL_CTX_set_alpn_select_cb': (None, [ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_void_p]),
        'SSL_select_next_proto': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_char_p, ctypes.c_uint,
                                                 ctypes.c_void_p, ctypes.c_uint]),
        'SSL_CTX_remove_session': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        'SSL_get_session': (ctypes.c_void_p, [ctypes.c_void_p]),
        'SSL_get_SSL_CTX': (ctypes.c_void_p, [ctypes.c_void_p]),
        'SSL_shutdown': (ctypes.c_int, [ctypes.c_void_p]),
        'SSL_get_servername': (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int]),
        'SSL_get_verify_result': (ctypes.c_long, [ctypes.c_void_p]),
        'SSL_get1_peer_certificate': (ctypes.c_void_p, [ctypes.c_void_p]),
        'SSL_CONF_CTX_new': (ctypes.c_void_p, []),
        'SSL_CONF_CTX_set_flags': (ctypes.c_uint, [ctypes.c_void_p, ctypes.c_uint]),
        'SSL_CONF_CTX_set_ssl_ctx': (None, [ctypes.c_void_p, ctypes.c_void_p]),
        'SSL_CONF_cmd': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
        'SSL_CONF_CTX_finish': (ctypes.c_int, [ctypes.c_void_p]),
        'SSL_CONF_CTX_free': (None, [ctypes.c_void_p]),
        'X509_free': (None, [ctypes.c_void_p]),
        'X509_get_subject_name': (ctypes.c_void_p, [ctypes.c_void_p]),
        'X509_get_issuer_name': (ctypes.c_void_p, [ctypes.c_void_p]),
        'X509_get_serialNumber': (ctypes.c_void_p, [ctypes.c_void_p]),
        'X509_NAME_print_ex': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                              ctypes.c_ulong]),
        'i2a_ASN1_INTEGER': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        'X509_verify_cert_error_string': (ctypes.c_char_p, [ctypes.c_long]),
        'BIO_s_mem': (ctypes.c_void_p, []),
        'BIO_new': (ctypes.c_void_p, [ctypes.c_void_p]),
        'BIO_new_file': (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]),
        'BIO_new_mem_buf': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        'BIO_ctrl': (ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_void_p]),
        'PEM_read_bio_X509_AUX': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p,
                                                    ctypes.c_void_p, ctypes.c_void_p]),
        'PEM_read_bio_X509': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_void_p, ctypes.c_void_p]),
        'PEM_read_bio_PrivateKey': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p,
                                                      ctypes.c_void_p, ctypes.c_char_p]),
        'PEM_read_bio_Parameters': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
        'EVP_PKEY_free': (None, [ctypes.c_void_p]),
        'SSL_CTX_set0_tmp_dh_pkey': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        'i2d_X509': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        'X509_get_ext_d2i': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                               ctypes.c_void_p]),
        'OPENSSL_sk_num': (ctypes.c_int, [ctypes.c_void_p]),
        'OPENSSL_sk_value': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        'GENERAL_NAMES_free': (None, [ctypes.c_void_p]),
        'X509_NAME_get_index_by_NID': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int,
                                                      ctypes.c_int]),
        'X509_NAME_get_entry': (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        'X509_NAME_ENTRY_get_data': (ctypes.c_void_p, [ctypes.c_void_p]),
        'ASN1_STRING_get0_data': (ctypes.c_void_p, [ctypes.c_void_p]),
        'ASN1_STRING_length': (ctypes.c_int, [ctypes.c_void_p]),
        'SSL_CTX_use_certificate': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        'SSL_CTX_use_PrivateKey': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
        'SSL_CTX_check_private_key': (ctypes.c_int, [ctypes.c_void_p]),
        'SSL_CTX_set_cipher_list': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
        'SSL_CTX_load_verify_locations': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p,
                                                         ctypes.c_char_p]),
        'ERR_peek_last_error': (ctypes.c_ulong, []),
        'ERR_get_error_all': (ctypes.c_ulong, [ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_void_p]),
        'BIO_read': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
        'BIO_free': (ctypes.c_int, [ctypes.c_void_p]),
        'ERR_get_error': (ctypes.c_ulong, []),
        'ERR_clear_error': (None, []),
        'ERR_error_string_n': (None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
        'RAND_bytes': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        'EVP_aes_128_cbc': (ctypes.c_void_p, []),
        'EVP_aes_256_cbc': (ctypes.c_void_p, []),
        'EVP_sha256': (ctypes.c_void_p, []),
        'EVP_EncryptInit_ex': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_char_p, ctypes.c_void_p]),
        'EVP_DecryptInit_ex': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_char_p, ctypes.c_void_p]),
        'HMAC_Init_ex': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p]),
    }

    def __init__(self):
        handle = ctypes.CDLL(_ssl.__file__)
        for name, (restype, argtypes) in self.SIGNATURES.items():
            func = getattr(handle, name)
            func.restype, func.argtypes = restype, argtypes
            setattr(self, name, func)


_lib = None


def lib() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


# OpenSSL constants (ssl.h, x509.h, asn1.h)
NID_commonName = 13
NID_subject_alt_name = 85
GEN_DNS = 2
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
SSL_CTRL_CHAIN_CERT = 89
SSL_CTRL_SET_GROUPS_LIST = 92
ERR_TXT_STRING = 0x02
ERR_LIB_PEM = 9
PEM_R_NO_START_LINE = 108
BIO_CTRL_RESET = 1
SSL_SESS_CACHE_OFF = 0x0
SSL_SESS_CACHE_SERVER = 0x2
SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x200
SSL_VERIFY_PEER = 0x1
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2
OPENSSL_NPN_NEGOTIATED = 1
SSL_CONF_FLAG_FILE = 0x2
SSL_CONF_FLAG_SERVER = 0x8
SSL_CONF_FLAG_CERTIFICATE = 0x20
XN_FLAG_RFC2253 = 0x317 | 1 << 16 | 1 << 20 | 1 << 24
X509_V_OK = 0

_VERIFY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_ALPN_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p)
_TICKET_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


def _accept_any_certificate(ok, store):
    """ngx_ssl_verify_callback: the handshake never fails over the client certificate;
    the result is judged after it (ssl.md section 5)."""
    return 1


_verify_callback = _VERIFY_CB(_accept_any_certificate)


def ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` inside Python's context object (first field after the object
    header), checked against the options Python reports before it is used."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib().SSL_CTX_get_options(ptr) != ctx.options:
        raise RuntimeError('cannot find SSL_CTX in this Python build')
    return ptr


def ssl_pointer(sock) -> int:
    """The ``SSL *`` of a connected SSLSocket (after the weakref to its socket)."""
    sslobj = sock._sslobj
    ptr = ctypes.c_void_p.from_address(id(sslobj) + object.__basicsize__
                                       + ctypes.sizeof(ctypes.c_void_p)).value
    if not ptr or lib().SSL_get_SSL_CTX(ptr) != ctx_pointer(sslobj.context):
        raise RuntimeError('cannot find SSL in this Python build')
    return ptr


def openssl_errors() -> str:
    """OpenSSL's queued errors as nginx's ngx_ssl_error prints them:
    ``error:80000002:system library::No such file or directory:calling fopen(...)``."""
    L = lib()
    texts = []
    buf = ctypes.create_string_buffer(256)
    data, flags = ctypes.c_char_p(), ctypes.c_int()
    while True:
        code = L.ERR_get_error_all(None, None, None, ctypes.byref(data), ctypes.byref(flags))
        if not code:
            break
        L.ERR_error_string_n(code, buf, len(buf))
        text = buf.value.decode('latin-1')
        if data.value and flags.value & ERR_TXT_STRING:
            text += ':' + data.value.decode('latin-1')
        texts.append(text)
    return ' '.join(texts)


def _failed(what: str) -> errors.ConfigError:
    reason = openssl_errors()
    return errors.ConfigError('%s failed%s' % (what, ' (SSL: %s)' % reason if reason else ''))


# --- contexts -------------------------------------------------------------------------

class ServerTLS:
    """A server's contexts: ``default`` (every pair, as nginx loads them) and, when the
    pairs name different hosts, one context per name set for SNI."""
    __slots__ = ('default', 'by_name', 'keep')

    def __init__(self, default, by_name, keep):
        self.default = default
        self.by_name = by_name           # [(names, context)]
        self.keep = keep                 # ctypes callbacks the contexts point to

    def for_name(self, name: str):
        name = name.lower().rstrip('.')
        for names, ctx in self.by_name:
            if name in names:
                return ctx
        parent = name.partition('.')[2]
        for names, ctx in self.by_name:
            if parent and '*.' + parent in names:
                return ctx
        return None


def uses_tls(conf) -> bool:
    """nginx builds a context only for servers with ``listen ... ssl`` or ``starttls``."""
    return conf.starttls != 'off' or any(listen.ssl for listen in conf.listen)


def tls_required(s) -> bool:
    """``starttls only`` and no TLS yet: logins are refused, as nginx refuses them."""
    return s.conf.starttls == 'only' and not s.tls


def by_starttls(s, plain: bytes, offered: bytes, required: bytes) -> bytes:
    """The capability list that fits the session: TLS up (or ``starttls off``),
    STARTTLS offered (``on``), STARTTLS required (``only``)."""
    starttls = s.conf.starttls
    if s.tls or starttls == 'off':
        return plain
    return offered if starttls == 'on' else required


def finalize(conf) -> None:
    """Called by the parser for each server at every load (start, ``-t``, reload): the
    files are read again and a failure is a ConfigError with OpenSSL's reason."""
    conf.ssl_ctx = build(conf) if uses_tls(conf) else None


def build(conf) -> ServerTLS:
    passwords = _passwords(conf)
    pairs = _pairs(conf, passwords)
    keep = []
    try:
        sid = _session_id_context(conf, pairs)
        default = _context(conf, pairs, sid, keep)
        groups = {}
        for pair in pairs:
            groups.setdefault(pair.names, []).append(pair)
        if len(groups) == 1:
            return ServerTLS(default, [], keep)
        chooser = ServerTLS(default, [(names, _context(conf, group, sid, keep))
                                      for names, group in groups.items()], keep)
    finally:
        for pair in pairs:
            pair.free()

    def pick(sock, server_name, ctx):
        chosen = server_name and chooser.for_name(server_name)
        if chosen:
            sock.context = chosen
    default.sni_callback = pick
    return chooser


class _Pair:
    """A loaded certificate (with its chain) and key, as ngx_ssl_certificate reads them;
    contexts take their own references, ``free`` drops ours."""
    __slots__ = ('shown', 'x509', 'chain', 'pkey', 'der', 'names')

    def __init__(self, cert, key, passwords):
        self.shown = _shown(cert)
        self.x509, self.chain, self.pkey = None, [], None
        try:
            self.x509, self.chain = _read_certificates(cert)
            self.pkey = _read_key(key, passwords)
        except errors.ConfigError:
            self.free()
            raise
        self.der = _der(self.x509)
        self.names = _names(self.x509)

    def use(self, ptr) -> None:
        L = lib()
        L.ERR_clear_error()
        if L.SSL_CTX_use_certificate(ptr, self.x509) != 1:
            raise _failed('SSL_CTX_use_certificate("%s")' % self.shown)
        for x509 in self.chain:
            if L.SSL_CTX_ctrl(ptr, SSL_CTRL_CHAIN_CERT, 1, x509) != 1:
                raise _failed('SSL_CTX_add1_chain_cert("%s")' % self.shown)
        if L.SSL_CTX_use_PrivateKey(ptr, self.pkey) != 1:
            raise _failed('SSL_CTX_use_PrivateKey("%s")' % self.shown)
        if L.SSL_CTX_check_private_key(ptr) != 1:    # beyond nginx: a key of another type
            raise _failed('SSL_CTX_check_private_key("%s")' % self.shown)

    def free(self) -> None:
        L = lib()
        for x509 in [self.x509] + self.chain:
            if x509:
                L.X509_free(x509)
        if self.pkey:
            L.EVP_PKEY_free(self.pkey)
        self.x509, self.chain, self.pkey = None, [], None


def _pairs(conf, passwords) -> list:
    certs, keys = list(conf.ssl_certificate), list(conf.ssl_certificate_key)
    if not certs:
        raise errors.ConfigError('no "ssl_certificate" is defined for server')
    if len(keys) < len(certs):
        raise errors.ConfigError('no "ssl_certificate_key" is defined for certificate "%s"'
                                 % _shown(certs[len(keys)]))
    pairs = []
    try:
        for cert, key in zip(certs, keys):
            pairs.append(_Pair(cert, key, passwords))
    except errors.ConfigError:
        for pair in pairs:
            pair.free()
        raise
    return pairs


def _data(value) -> bytes | None:
    """The inline PEM of a ``data:...`` value, else None (a file name)."""
    if value.startswith('data:'):
        return value[5:].encode('latin-1')
    return None


def _shown(value) -> str:
    return 'data:...' if _data(value) is not None else value


class _Bio:
    """A read BIO on a file or a ``data:`` value (ngx_ssl_certificate's source)."""

    def __init__(self, value, what: str):
        L = lib()
        L.ERR_clear_error()
        data = _data(value)
        if data is not None:
            self.keep = ctypes.create_string_buffer(data, len(data))
            self.bio = L.BIO_new_mem_buf(self.keep, len(data))
        else:
            self.bio = L.BIO_new_file(value.encode(), b'r')
        if not self.bio:
            raise _failed('cannot load %s "%s": BIO_new_file()' % (what, _shown(value)))

    def __enter__(self):
        return self.bio

    def __exit__(self, *exc):
        lib().BIO_free(self.bio)


def _read_certificates(value):
    """The certificate, then every chain certificate after it in the same PEM."""
    L = lib()
    with _Bio(value, 'certificate') as bio:
        x509 = L.PEM_read_bio_X509_AUX(bio, None, None, None)
        if not x509:
            raise _failed('cannot load certificate "%s": PEM_read_bio_X509_AUX()'
                          % _shown(value))
        chain = []
        while True:
            extra = L.PEM_read_bio_X509(bio, None, None, None)
            if extra:
                chain.append(extra)
                continue
            code = L.ERR_peek_last_error()
            if (code >> 23) & 0xFF == ERR_LIB_PEM and code & 0x7FFFFF == PEM_R_NO_START_LINE:
                L.ERR_clear_error()          # the end of the file
                return x509, chain
            for cert in [x509] + chain:
                L.X509_free(cert)
            raise _failed('cannot load certificate "%s": PEM_read_bio_X509()'
                          % _shown(value))


def _read_key(value, passwords):
    """ngx_ssl_load_certificate_key: each passphrase in turn, never a terminal prompt."""
    L = lib()
    if value.startswith('engine:'):
        raise errors.ConfigError('cannot load certificate key "%s": engines are not supported'
                                 % value)
    with _Bio(value, 'certificate key') as bio:
        for i, password in enumerate(passwords):
            pkey = L.PEM_read_bio_PrivateKey(bio, None, None, password)
            if pkey:
                L.ERR_clear_error()
                return pkey
            if i + 1 < len(passwords):
                L.ERR_clear_error()
                L.BIO_ctrl(bio, BIO_CTRL_RESET, 0, None)
    raise _failed('cannot load certificate key "%s": PEM_read_bio_PrivateKey()'
                  % _shown(value))


def _der(x509) -> bytes:
    L = lib()
    size = L.i2d_X509(x509, None)
    buf = ctypes.create_string_buffer(size)
    L.i2d_X509(x509, ctypes.byref(ctypes.c_char_p(ctypes.addressof(buf))))
    return buf.raw


class _GeneralName(ctypes.Structure):
    _fields_ = [('type', ctypes.c_int), ('value', ctypes.c_void_p)]    # x509v3.h


def _names(x509) -> frozenset:
    """The lower-case host names a certificate is for: its DNS subjectAltNames, else
    its subject's CN (the names SNI is matched against)."""
    L = lib()
    names = []
    general = L.X509_get_ext_d2i(x509, NID_subject_alt_name, None, None)
    if general:
        for i in range(L.OPENSSL_sk_num(general)):
            entry = _GeneralName.from_address(L.OPENSSL_sk_value(general, i))
            if entry.type == GEN_DNS:
                names.append(_asn1_bytes(entry.value))
        L.GENERAL_NAMES_free(general)
    else:
        subject = L.X509_get_subject_name(x509)
        i = L.X509_NAME_get_index_by_NID(subject, NID_commonName, -1)
        if i >= 0:
            names.append(_asn1_bytes(L.X509_NAME_ENTRY_get_data(
                L.X509_NAME_get_entry(subject, i))))
    return frozenset(n.decode('latin-1').lower().rstrip('.') for n in names)


def _asn1_bytes(string) -> bytes:
    L = lib()
    return ctypes.string_at(L.ASN1_STRING_get0_data(string), L.ASN1_STRING_length(string))


def _read_file(path: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as exc:
        raise errors.ConfigError('open() "%s" failed (%d: %s)'
                                 % (path, exc.errno or 0, exc.strerror)) from None


def _passwords(conf) -> list:
    """``ssl_password_file``: one passphrase per line, each tried in turn (nginx). With
    none, an empty one: an encrypted key then fails instead of prompting a terminal."""
    if not conf.ssl_password_file:
        return [b'']
    data = _read_file(conf.ssl_password_file)
    return [line for line in data.replace(b'\r\n', b'\n').split(b'\n') if line] or [b'']


def _session_id_context(conf, pairs) -> bytes:
    """ngx_ssl_session_id_context: SHA-1 over "MAIL", each certificate's SHA-1 and the
    client CAs, so sessions never cross servers or outlive a certificate change."""
    md = hashlib.sha1(SESSION_CONTEXT)
    for pair in pairs:
        md.update(hashlib.sha1(pair.der).digest())
    if conf.ssl_verify_client != 'off' and conf.ssl_client_certificate:
        try:
            md.update(hashlib.sha1(_read_file(conf.ssl_client_certificate)).digest())
        except errors.ConfigError:
            pass                         # reported when the CA file is loaded
    return md.digest()


def _context(conf, pairs, sid, keep) -> ssl.SSLContext:
    """One SSL_CTX as ngx_mail_ssl_merge_conf builds it."""
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_RENEGOTIATION          # ngx_ssl_create
    ptr = ctx_pointer(ctx)
    L = lib()
    _set_protocols(ctx, conf.ssl_protocols)
    for pair in pairs:
        pair.use(ptr)
    L.ERR_clear_error()
    if L.SSL_CTX_set_cipher_list(ptr, conf.ssl_ciphers.encode()) != 1:
        raise _failed('SSL_CTX_set_cipher_list("%s")' % conf.ssl_ciphers)
    if conf.ssl_prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if conf.ssl_dhparam:
        _load_dhparam(ptr, conf.ssl_dhparam)
    if conf.ssl_ecdh_curve != 'auto':
        L.ERR_clear_error()
        if L.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_GROUPS_LIST, 0,
                          ctypes.c_char_p(conf.ssl_ecdh_curve.encode())) != 1:
            raise _failed('SSL_CTX_set1_curves_list("%s")' % conf.ssl_ecdh_curve)
    if conf.ssl_certificate_compression:
        _log.warning('"ssl_certificate_compression" ignored, not supported')
    _set_client_verify(ctx, ptr, conf)
    _set_sessions(ctx, ptr, conf, sid, keep)
    _set_alpn(ptr, conf.protocol)
    _conf_commands(ptr, conf.ssl_conf_command)
    return ctx


def _load_dhparam(ptr, path: str) -> None:
    """ngx_ssl_dhparam (OpenSSL 3): DH parameters enable the DHE ciphers."""
    L = lib()
    with _Bio(path, 'DH parameters') as bio:
        pkey = L.PEM_read_bio_Parameters(bio, None)
        if not pkey:
            raise _failed('PEM_read_bio_Parameters("%s")' % path)
        if L.SSL_CTX_set0_tmp_dh_pkey(ptr, pkey) != 1:          # set0: it owns pkey now
            L.EVP_PKEY_free(pkey)
            raise _failed('SSL_CTX_set0_tmp_dh_pkey("%s")' % path)


def _set_protocols(ctx, names) -> None:
    """``ssl_protocols``: the range as min/max, holes as SSL_OP_NO_* (SSLv2 and SSLv3
    do not exist in OpenSSL 3: naming only them leaves nothing to speak)."""
    enabled = [version for name, version, _ in _PROTOCOL_VERSIONS if name in names]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        if not enabled:
            for _, _, op in _PROTOCOL_VERSIONS:
                ctx.options |= getattr(ssl, op)
            return
        ctx.minimum_version, ctx.maximum_version = enabled[0], enabled[-1]
        for name, version, op in _PROTOCOL_VERSIONS:
            if enabled[0] < version < enabled[-1] and name not in names:
                ctx.options |= getattr(ssl, op)


def _set_client_verify(ctx, ptr, conf) -> None:
    """ngx_ssl_client_certificate, ngx_ssl_trusted_certificate, ngx_ssl_crl; the verify
    callback accepts everything, the verdict comes after the handshake."""
    mode = conf.ssl_verify_client
    if mode == 'off':
        return
    if mode != 'optional_no_ca' and not (conf.ssl_client_certificate
                                         or conf.ssl_trusted_certificate):
        raise errors.ConfigError('no ssl_client_certificate or ssl_trusted_certificate for '
                                 'ssl_verify_client')
    L = lib()
    L.SSL_CTX_set_verify(ptr, SSL_VERIFY_PEER, ctypes.cast(_verify_callback, ctypes.c_void_p))
    L.SSL_CTX_set_verify_depth(ptr, conf.ssl_verify_depth)
    for path in (conf.ssl_client_certificate, conf.ssl_trusted_certificate):
        if path:
            L.ERR_clear_error()
            if L.SSL_CTX_load_verify_locations(ptr, path.encode(), None) != 1:
                raise _failed('SSL_CTX_load_verify_locations("%s")' % path)
    if conf.ssl_client_certificate:
        names = L.SSL_load_client_CA_file(conf.ssl_client_certificate.encode())
        if not names:
            raise _failed('SSL_load_client_CA_file("%s")' % conf.ssl_client_certificate)
        L.SSL_CTX_set_client_CA_list(ptr, names)
        L.ERR_clear_error()          # the CA file's trailing "no start line" (nginx too)
    if conf.ssl_crl:
        L.ERR_clear_error()
        if L.SSL_CTX_load_verify_locations(ptr, conf.ssl_crl.encode(), None) != 1:
            raise _failed('X509_LOOKUP_load_file("%s")' % conf.ssl_crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def _set_sessions(ctx, ptr, conf, sid, keep) -> None:
    """ngx_ssl_session_cache + ngx_ssl_session_ticket_keys. ``off``: no session ids at
    all; ``none``: ids offered, never stored; builtin/shared: OpenSSL's store (shared is
    per process: sessions are not shared between worker processes)."""
    L = lib()
    L.SSL_CTX_set_timeout(ptr, int(conf.ssl_session_timeout))
    L.SSL_CTX_set_session_id_context(ptr, sid, len(sid))
    kind, size = _cache_kind(conf.ssl_session_cache)
    if kind == 'off':
        mode = SSL_SESS_CACHE_OFF
    elif kind == 'none':
        mode = SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_INTERNAL_STORE
        size = 1
    else:
        mode = SSL_SESS_CACHE_SERVER
    L.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_MODE, mode, None)
    if size:
        L.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    if not conf.ssl_session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        if kind in ('off', 'none'):
            ctx.num_tickets = 0       # TLS 1.3 would send stateful tickets nobody stores
    elif conf.ssl_session_ticket_key:
        _set_ticket_keys(ptr, [_ticket_key(k) for k in conf.ssl_session_ticket_key], keep)


def _cache_kind(words):
    """``ssl_session_cache`` words -> (``off``|``none``|``store``, entries or 0 for
    OpenSSL's default). ``shared:NAME:SIZE`` holds about 4000 sessions per megabyte."""
    if words[0] in ('off', 'none'):
        return words[0], 0
    entries = shared = 0
    for word in words:
        if word.startswith('builtin:'):
            entries = int(word[8:])
        elif word.startswith('shared:'):
            shared += values.parse_size(word.rsplit(':', 1)[1]) * 4000 // (1 << 20)
    return 'store', entries or shared


def _ticket_key(path) -> tuple:
    """A 48- or 80-byte ``ssl_session_ticket_key`` file: (name, hmac key, aes key, cipher)."""
    data = _read_file(path)
    L = lib()
    if len(data) == 80:
        return data[:16], data[16:48], data[48:80], L.EVP_aes_256_cbc()
    if len(data) == 48:
        return data[:16], data[32:48], data[16:32], L.EVP_aes_128_cbc()
    raise errors.ConfigError('"%s" must be 48 or 80 bytes' % path)


def _set_ticket_keys(ptr, keys, keep) -> None:
    """ngx_ssl_ticket_key_callback: the first key encrypts, every key decrypts; tickets
    under an older key are renewed."""
    L = lib()

    def callback(ssl_conn, name, iv, cipher_ctx, hmac_ctx, enc):
        try:
            if enc == 1:
                key_name, hmac_key, aes_key, cipher = keys[0]
                if L.RAND_bytes(iv, 16) != 1:
                    return -1
                ctypes.memmove(name, key_name, 16)
                if L.EVP_EncryptInit_ex(cipher_ctx, cipher, None, aes_key, iv) != 1:
                    return -1
                if L.HMAC_Init_ex(hmac_ctx, hmac_key, len(hmac_key), L.EVP_sha256(),
                                  None) != 1:
                    return -1
                return 1
            wanted = ctypes.string_at(name, 16)
            for i, (key_name, hmac_key, aes_key, cipher) in enumerate(keys):
                if key_name == wanted:
                    if L.HMAC_Init_ex(hmac_ctx, hmac_key, len(hmac_key), L.EVP_sha256(),
                                      None) != 1:
                        return -1
                    if L.EVP_DecryptInit_ex(cipher_ctx, cipher, None, aes_key, iv) != 1:
                        return -1
                    return 2 if i else 1
            return 0
        except Exception:
            return -1
    cb = _TICKET_CB(callback)
    keep.append(cb)
    L.SSL_CTX_callback_ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB,
                            ctypes.cast(cb, ctypes.c_void_p))


_alpn_callbacks = {}    # protocol -> callback; its closure holds the list OpenSSL points into


def _set_alpn(ptr, protocol: str) -> None:
    """ngx_mail_ssl_alpn_select: offer only the server's protocol; a client list without
    it is a fatal no_application_protocol alert; no ALPN at all is fine."""
    cb = _alpn_callbacks.get(protocol)
    if cb is None:
        wire = ctypes.create_string_buffer(bytes([len(protocol)]) + protocol.encode(),
                                           len(protocol) + 1)
        L = lib()

        def select(ssl_conn, out, outlen, client, client_len, arg):
            try:
                if L.SSL_select_next_proto(out, outlen, wire, len(wire), client,
                                           client_len) != OPENSSL_NPN_NEGOTIATED:
                    return SSL_TLSEXT_ERR_ALERT_FATAL
                return SSL_TLSEXT_ERR_OK
            except Exception:
                return SSL_TLSEXT_ERR_ALERT_FATAL
        cb = _alpn_callbacks[protocol] = _ALPN_CB(select)   # lives as long as the process
    lib().SSL_CTX_set_alpn_select_cb(ptr, ctypes.cast(cb, ctypes.c_void_p), None)


def _conf_commands(ptr, commands) -> None:
    """ngx_ssl_conf_commands: applied last, so they override the directives above."""
    if not commands:
        return
    L = lib()
    cctx = L.SSL_CONF_CTX_new()
    try:
        L.SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_FILE | SSL_CONF_FLAG_SERVER
                                 | SSL_CONF_FLAG_CERTIFICATE)
        L.SSL_CONF_CTX_set_ssl_ctx(cctx, ptr)
        for name, value in commands:
            L.ERR_clear_error()
            if L.SSL_CONF_cmd(cctx, name.encode(), value.encode()) <= 0:
                raise _failed('SSL_CONF_cmd("%s", "%s")' % (name, value))
        if L.SSL_CONF_CTX_finish(cctx) != 1:
            raise _failed('SSL_CONF_finish()')
    finally:
        L.SSL_CONF_CTX_free(cctx)


_error_codes = None


def _ssl_reason(exc) -> str:
    """An ssl.SSLError as OpenSSL's own string, ``error:0A00010B:SSL routines::...``."""
    global _error_codes
    if _error_codes is None:
        _error_codes = {(_ssl.lib_codes_to_names.get(lib_code), name): (lib_code, reason)
                        for (lib_code, reason), name in _ssl.err_codes_to_names.items()}
    code = _error_codes.get((getattr(exc, 'library', None), getattr(exc, 'reason', None)))
    if code is not None:
        buf = ctypes.create_string_buffer(256)
        lib().ERR_error_string_n((code[0] << 23) | code[1], buf, len(buf))
        return buf.value.decode('latin-1')
    return getattr(exc, 'strerror', None) or str(exc)


# --- sessions -------------------------------------------------------------------------

def accept(s) -> None:
    """Implicit TLS (``listen ... ssl``): handshake under the caller's ``timeout``,
    then the client certificate check; the greeting follows (ssl.md section 1)."""
    if s.stream.buf:
        # Bytes already read belong to the ClientHello; the PROXY reader must only take
        # its header (nginx peeks), or they are lost to OpenSSL.
        raise errors.TLSError('bytes read before the TLS handshake were lost',
                              level=log.ERROR)
    _handshake(s, 'SSL handshaking')


def starttls(s) -> None:
    """After the STARTTLS/STLS reply went out: forget every byte read after the command
    (CVE-2011-0411, CVE-2014-3556), then the handshake on the same socket."""
    s.stream.take_buffered()
    s.starttls_used = True
    _handshake(s, 'in starttls state')


def _handshake(s, action: str) -> None:
    previous, s.action = s.action, action
    server = getattr(s.conf, 'ssl_ctx', None)
    if server is None:
        raise errors.ProxyError('no SSL context for this server')
    try:
        sock = server.default.wrap_socket(s.sock, server_side=True,
                                          do_handshake_on_connect=False)
    except OSError as exc:
        raise errors.TLSError('SSL_set_fd() failed (%s)' % exc) from None
    s.sock = s.stream.sock = sock        # the raw socket is detached into the TLS one
    try:
        sock.do_handshake()
    except ssl.SSLEOFError:
        raise errors.TLSError('peer closed connection in SSL handshake') from None
    except ssl.SSLError as exc:
        raise errors.TLSError('SSL_do_handshake() failed (SSL: %s)' % _ssl_reason(exc)) \
            from None
    except OSError as exc:
        if not exc.errno:
            raise errors.TLSError('peer closed connection in SSL handshake') from None
        raise errors.TLSError('SSL_do_handshake() failed (%d: %s)'
                              % (exc.errno, os.strerror(exc.errno))) from None
    s.tls = True
    if s.track is not None:
        s.track.handshake(s)
    check_client_certificate(s)
    s.action = previous


def check_client_certificate(s) -> None:
    """ngx_mail_verify_cert: a failed verification (unless optional_no_ca lets it
    through) or a missing certificate with ``on`` ends the session with the protocol's
    certificate reply; the session is dropped from the cache first."""
    mode = s.conf.ssl_verify_client
    if mode == 'off':
        return
    L = lib()
    ptr = ssl_pointer(s.sock)
    rc = L.SSL_get_verify_result(ptr)
    if rc != X509_V_OK and not (mode == 'optional_no_ca' and rc in OPTIONAL_NO_CA_ERRORS):
        _forget_session(ptr)
        raise errors.ProxyError('client SSL certificate verify error: (%d:%s)'
                                % (rc, _verify_text(rc)), reply='cert_error',
                                level=log.INFO)
    if mode == 'on' and s.sock.getpeercert(binary_form=True) is None:
        _forget_session(ptr)
        raise errors.ProxyError('client sent no required SSL certificate',
                                reply='cert_missing', level=log.INFO)


def _forget_session(ptr) -> None:
    L = lib()
    session = L.SSL_get_session(ptr)
    if session:
        L.SSL_CTX_remove_session(L.SSL_get_SSL_CTX(ptr), session)


def _verify_text(rc: int) -> str:
    return (lib().X509_verify_cert_error_string(rc) or b'').decode('latin-1')


def close(s) -> None:
    """End TLS as nginx's ngx_ssl_shutdown does: one SSL_shutdown (close_notify, not
    waiting for the client's), then close. Without it OpenSSL drops the session from
    the cache when the connection is freed, and ids would never resume."""
    shutdown(s)
    s.sock.close()


def shutdown(s) -> None:
    """Send close_notify once (see close); the socket stays open for a lingering close."""
    sock = s.sock
    if getattr(sock, '_sslobj', None) is not None:
        try:
            ptr = ssl_pointer(sock)
        except (RuntimeError, ValueError):
            ptr = None
        if ptr:
            L = lib()
            L.SSL_shutdown(ptr)          # the socket is non-blocking: never waits
            L.ERR_clear_error()


# --- what auth_http learns --------------------------------------------------------------

def auth_headers(s) -> bytes:
    """The ``Auth-SSL*`` request lines (auth_http.md section 2, ssl.md section 6)."""
    from .auth_http import escape
    sock = s.sock
    lines = [b'Auth-SSL: on\r\n']
    version = sock.version()
    if version:
        lines.append(b'Auth-SSL-Protocol: %s\r\n' % version.encode())
    cipher = sock.cipher()
    if cipher:
        lines.append(b'Auth-SSL-Cipher: %s\r\n' % cipher[0].encode())
    if s.conf.ssl_verify_client == 'off':
        return b''.join(lines)
    der = sock.getpeercert(binary_form=True)
    if der is None:
        lines.append(b'Auth-SSL-Verify: NONE\r\n')
        return b''.join(lines)
    facts = client_certificate(sock)
    lines.append(b'Auth-SSL-Verify: %s\r\n' % facts['verify'])
    for name, key in ((b'Subject', 'subject'), (b'Issuer', 'issuer'), (b'Serial', 'serial')):
        if facts[key]:
            lines.append(b'Auth-SSL-%s: %s\r\n' % (name, facts[key]))
    lines.append(b'Auth-SSL-Fingerprint: %s\r\n' % hashlib.sha1(der).hexdigest().encode())
    if s.conf.auth_http_pass_client_cert:
        pem = ssl.DER_cert_to_PEM_cert(der).encode('ascii')
        lines.append(b'Auth-SSL-Cert: %s\r\n' % escape(pem))
    return b''.join(lines)


def client_certificate(sock) -> dict:
    """The client certificate as nginx's ngx_ssl_get_* report it: ``verify``
    (SUCCESS / FAILED:reason / NONE), ``subject``/``issuer`` (RFC 2253), ``serial``
    (upper-case hex), as bytes; empty bytes where there is nothing."""
    L = lib()
    ptr = ssl_pointer(sock)
    cert = L.SSL_get1_peer_certificate(ptr)
    if not cert:
        return {'verify': b'NONE', 'subject': b'', 'issuer': b'', 'serial': b''}
    try:
        rc = L.SSL_get_verify_result(ptr)
        verify = b'SUCCESS' if rc == X509_V_OK else b'FAILED:' + _verify_text(rc).encode()
        return {'verify': verify,
                'subject': _bio_text(lambda bio: L.X509_NAME_print_ex(
                    bio, L.X509_get_subject_name(cert), 0, XN_FLAG_RFC2253)),
                'issuer': _bio_text(lambda bio: L.X509_NAME_print_ex(
                    bio, L.X509_get_issuer_name(cert), 0, XN_FLAG_RFC2253)),
                'serial': _bio_text(lambda bio: L.i2a_ASN1_INTEGER(
                    bio, L.X509_get_serialNumber(cert)))}
    finally:
        L.X509_free(cert)


def server_name(sock) -> str | None:
    """The SNI name the client asked for, if any (for the PROXY v2 AUTHORITY TLV)."""
    name = lib().SSL_get_servername(ssl_pointer(sock), 0)     # TLSEXT_NAMETYPE_host_name
    return name.decode('ascii', 'replace') if name else None


def _bio_text(write) -> bytes:
    L = lib()
    bio = L.BIO_new(L.BIO_s_mem())
    if not bio:
        return b''
    try:
        if write(bio) < 0:
            return b''
        buf = ctypes.create_string_buffer(8192)
        n = L.BIO_read(bio, buf, len(buf))
        return buf.raw[:max(n, 0)]
    finally:
        L.BIO_free(bio)
