"""TLS to the backend (beyond nginx, whose backend connection is always plain text).

Off by default. ``proxy_ssl on`` wraps the backend connection in TLS right after the
connect (and after a PROXY header, which goes first in plain text): the backend's TLS
port (993/995/465). ``proxy_ssl starttls`` upgrades after the backend's greeting:
IMAP ``STARTTLS``, POP3 ``STLS``, SMTP ``EHLO`` + ``STARTTLS`` (the protocol's usual
HELO/EHLO follows over TLS, RFC 3207 section 4.2).

The auth answer may choose per login (its ``Auth-SSL-Backend*`` headers win over the
server's directives):

* ``Auth-SSL-Backend: off|on|starttls``: the mode for this login;
* ``Auth-SSL-Backend-Name: NAME``: the name to verify and to send as SNI.

The name checked against the backend certificate (and sent as SNI unless it is an
address) is ``Auth-SSL-Backend-Name``, else ``proxy_ssl_name``, else the backend's
address as the auth answer gave it (it must then be in the certificate's
subjectAltName as an IP address). Verification (``proxy_ssl_verify``, on by default)
uses ``proxy_ssl_trusted_certificate``, or the system's CA store without one. Each
``proxy_ssl_fingerprint sha256:HEX`` pins a certificate: the backend's must be one of
them (with ``proxy_ssl_verify off``, the pin alone is the check).

Anything that goes wrong ends the session with the internal-error line and an error
log line: a refused STARTTLS, a failed handshake, a certificate that does not verify or
match, and bytes the backend sent after its STARTTLS answer (they would be taken as
coming from inside TLS: CVE-2011-0411 turned around). There is no fall-back to plain
text.
"""
import hashlib
import ssl

import gevent.ssl

from . import errors, log
from .config import values
from .config.directives import D, MAIL_SERVER

MODES = ('off', 'on', 'starttls')


def _fingerprint(args, ctx) -> bytes:
    """``sha256:HEX`` (colons allowed, any case): the 32 bytes of the digest."""
    algo, _, digest = args[0].partition(':')
    try:
        raw = bytes.fromhex(digest.replace(':', ''))
    except ValueError:
        raw = b''
    if algo.lower() != 'sha256' or len(raw) != 32:
        raise ValueError('invalid value "%s" in "%s" directive, it must be "sha256:" '
                         'and 64 hexadecimal digits' % (args[0], ctx.name))
    return raw


DIRECTIVES = [
    D('proxy_ssl', MAIL_SERVER, '1', values.choice(*MODES), default='off'),
    D('proxy_ssl_verify', MAIL_SERVER, '1', values.flag, default=True),
    D('proxy_ssl_trusted_certificate', MAIL_SERVER, '1', values.path),
    D('proxy_ssl_name', MAIL_SERVER, '1', values.string),
    D('proxy_ssl_certificate', MAIL_SERVER, '1', values.path),
    D('proxy_ssl_certificate_key', MAIL_SERVER, '1', values.path),
    D('proxy_ssl_fingerprint', MAIL_SERVER, '1', _fingerprint, multi='append', default=()),
]

ANSWER_MODE = b'auth-ssl-backend'            # answer headers, lower-cased
ANSWER_NAME = b'auth-ssl-backend-name'
_HOSTNAME_MISMATCH = (62, 64)                # X509_V_ERR_HOSTNAME/IP_ADDRESS_MISMATCH


class BackendTLS:
    """A server's client-side context and what to check beyond it."""
    __slots__ = ('context', 'pins', 'name')

    def __init__(self, context, pins, name):
        self.context = context
        self.pins = pins                 # frozenset of sha256 digests; empty: no pin
        self.name = name                 # proxy_ssl_name or None


def finalize(conf) -> None:
    """Build the context at load (files are read now, errors are configuration errors)
    when a server uses backend TLS; otherwise on the first login that asks for it."""
    used = (conf.proxy_ssl != 'off' or conf.proxy_ssl_trusted_certificate
            or conf.proxy_ssl_certificate or conf.proxy_ssl_fingerprint)
    conf.backend_tls = build(conf) if used else None


def build(conf) -> BackendTLS:
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if conf.proxy_ssl_verify:
        trusted = conf.proxy_ssl_trusted_certificate
        if trusted:
            _load(conf, 'proxy_ssl_trusted_certificate',
                  lambda: ctx.load_verify_locations(cafile=trusted),
                  'SSL_CTX_load_verify_locations("%s")' % trusted)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = conf.proxy_ssl_certificate, conf.proxy_ssl_certificate_key
    if cert or key:
        if not cert or not key:
            missing = 'proxy_ssl_certificate' if key else 'proxy_ssl_certificate_key'
            file, line = conf.where('proxy_ssl_certificate' if cert else
                                    'proxy_ssl_certificate_key')
            raise errors.ConfigError('no "%s" is defined for "%s"'
                                     % (missing, cert or key), file, line)
        _load(conf, 'proxy_ssl_certificate', lambda: ctx.load_cert_chain(cert, key),
              'cannot load certificate "%s" with key "%s"' % (cert, key))
    return BackendTLS(ctx, frozenset(conf.proxy_ssl_fingerprint), conf.proxy_ssl_name)


def _load(conf, directive, call, what) -> None:
    try:
        call()
    except (OSError, ssl.SSLError) as exc:
        file, line = conf.where(directive)
        reason = getattr(exc, 'reason', None) or exc.strerror or str(exc)
        raise errors.ConfigError('%s failed (%s)' % (what, reason), file, line) from None


# --- per login ------------------------------------------------------------------------

def mode(s) -> str:
    """The login's mode: the auth answer's ``Auth-SSL-Backend``, else ``proxy_ssl``."""
    answer = s.auth.tls
    value = answer.get(ANSWER_MODE) if answer else None
    if value is None:
        return s.conf.proxy_ssl
    text = value.decode('latin-1').strip().lower()
    if text not in MODES:
        raise errors.AuthServiceError('auth http server sent invalid "Auth-SSL-Backend" '
                                      'value "%s"' % value.decode('latin-1'))
    return text


def begin(s, up) -> None:
    """Right after the connect (upstream.connect calls this when ``proxy_ssl`` is not
    off or the answer has ``Auth-SSL-Backend*`` headers): ``up.tls`` becomes the
    login's mode; with ``on``, the TLS handshake now, before the greeting."""
    tls = mode(s)
    if tls != 'off':
        up.tls = tls
        if tls == 'on':
            handshake(s, up)


def starttls(s, up) -> None:
    """Each protocol's ``login_upstream`` calls this right after the backend greeting
    was checked, when ``up.tls == 'starttls'``."""
    proto = s.proto.NAME
    if proto == 'imap':
        tag = s.tag or b'1 '
        up.send(s, tag + b'STARTTLS\r\n', 'sending STARTTLS to upstream')
        answer = up.read_reply(s)
        while answer.startswith(b'* '):
            answer = up.read_reply(s)
        ok = answer.startswith(tag + b'OK')
    elif proto == 'pop3':
        up.send(s, b'STLS\r\n', 'sending STLS to upstream')
        answer = up.read_reply(s)
        ok = answer.startswith(b'+OK')
    else:
        up.send(s, b'EHLO ' + s.conf.server_name.encode() + b'\r\n',
                'sending EHLO to upstream')
        answer = up.read_reply(s, multiline=True)
        if answer.startswith(b'250'):
            up.send(s, b'STARTTLS\r\n', 'sending STARTTLS to upstream')
            answer = up.read_reply(s, multiline=True)
        ok = answer.startswith(b'220')
    if not ok:
        first = answer.split(b'\n', 1)[0].rstrip(b'\r').decode('latin-1')
        raise errors.UpstreamError('upstream sent invalid response to STARTTLS: "%s"'
                                   % first)
    if up.stream.buf:
        raise errors.UpstreamError('upstream sent data after its STARTTLS response: "%s"'
                                   % log.printable(up.stream.buf, 64))
    handshake(s, up)


def handshake(s, up) -> None:
    """TLS on the backend socket, under the session's backend ``timeout``; the
    certificate checks; then every later read and write (login, pump) goes through it."""
    settings = s.conf.backend_tls
    if settings is None:
        settings = s.conf.backend_tls = build(s.conf)     # asked for by the auth answer
    answer = s.auth.tls
    name = (answer.get(ANSWER_NAME) if answer else None)
    name = name.decode('latin-1').strip() if name else settings.name
    if not name:
        name = up.name.rsplit(':', 1)[0].strip('[]')
    s.action = 'SSL handshaking to upstream'
    try:
        sock = settings.context.wrap_socket(up.sock, server_hostname=name,
                                            do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        raise errors.UpstreamError('SSL_set_fd() failed (%s)' % exc) from None
    s.upstream_sock = up.sock = up.stream.sock = sock
    try:
        sock.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _HOSTNAME_MISMATCH:
            raise errors.UpstreamError('upstream SSL certificate does not match "%s"'
                                       % name) from None
        raise errors.UpstreamError('upstream SSL certificate verify error: (%d:%s)'
                                   % (exc.verify_code, exc.verify_message)) from None
    except ssl.SSLEOFError:
        raise errors.UpstreamError('upstream prematurely closed connection in SSL '
                                   'handshake') from None
    except ssl.SSLError as exc:
        raise errors.UpstreamError('SSL_do_handshake() failed (SSL: %s)'
                                   % (exc.reason or exc)) from None
    except OSError as exc:
        if not exc.errno:
            raise errors.UpstreamError('upstream prematurely closed connection in SSL '
                                       'handshake') from None
        raise errors.UpstreamError('SSL_do_handshake() failed (%d: %s)'
                                   % (exc.errno, exc.strerror)) from None
    if settings.pins:
        digest = hashlib.sha256(sock.getpeercert(binary_form=True) or b'').digest()
        if digest not in settings.pins:
            raise errors.UpstreamError('upstream SSL certificate does not match '
                                       '"proxy_ssl_fingerprint" (sha256:%s)'
                                       % digest.hex())


