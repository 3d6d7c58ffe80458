"""The auth_http client (auth_http.md): nginx's request, httptools for the response.

Beyond nginx: idle connections to the auth service are kept and reused
(``auth_http_keepalive``; ``off`` restores one connection per login), ``https://`` URLs,
and ``Auth-Server`` may be a host name (resolved with ``resolver``).
"""
import re
import socket

import dns.name
import dns.rdatatype
import gevent
import httptools

from . import errors, log, realip, resolver
from . import ssl as tls
from .config import values
from .config.directives import D, MAIL_SERVER
from .stream import connect_socket, os_error_text, send_all

DIRECTIVES = [
    D('auth_http', MAIL_SERVER, '1', values.auth_http_url, multi='last'),
    D('auth_http_timeout', MAIL_SERVER, '1', values.time_ms, default=60.0),
    D('auth_http_header', MAIL_SERVER, '2', values.pair, multi='append', default=()),
    D('auth_http_pass_client_cert', MAIL_SERVER, '1', values.flag, default=False),
    # Beyond nginx: idle keep-alive connections kept per auth server; 0/off = one per login.
    D('auth_http_keepalive', MAIL_SERVER, '1', values.number_or_off, default=32),
]

MAX_ATOI = 2 ** 63 - 1          # NGX_MAX_INT_T_VALUE
MAX_WAIT = 2 ** 31              # seconds; longer than any session lives anyway
RESPONSE_LIMIT = 1024          # nginx's buffer for the status line and headers
WAIT_WITHOUT_DELAY = 1.0       # WAIT with no positive Auth-Wait: retry after this (nginx: 0)

_ESCAPE = re.compile(rb'[\x00-\x20%]')
_HEADER_NAME = re.compile(rb'[A-Za-z0-9][A-Za-z0-9-]*\Z')


def escape(value: bytes) -> bytes:
    """nginx's NGX_ESCAPE_MAIL_AUTH: controls, space and ``%`` as upper-case ``%XX``."""
    if not _ESCAPE.search(value):
        return value
    return _ESCAPE.sub(lambda m: b'%%%02X' % m.group()[0], value)


class AuthResult:
    __slots__ = ('servers', 'login', 'passwd', 'wait', 'error_code', 'user_and_pass', 'tls')

    def __init__(self, servers, login, passwd, user_and_pass=False, tls=None):
        self.servers = servers          # [(sockaddr, name for logs)], tried in order
        self.login = login
        self.passwd = passwd
        self.tls = tls                  # {b'auth-ssl-backend...': value} (backend_tls.py)
        self.user_and_pass = user_and_pass  # the answer had Auth-User and Auth-Pass


def build_request(s, url) -> bytes:
    """The request exactly as nginx builds it (auth_http.md section 2)."""
    conf = s.conf
    method = s.auth_method
    lines = [b'GET ', url.uri, b' HTTP/1.1\r\n' if conf.auth_http_keepalive else b' HTTP/1.0\r\n',
             b'Host: ', url.host_header, b'\r\n',
             b'Auth-Method: ', method.encode(), b'\r\n',
             b'Auth-User: ', escape(s.login or b''), b'\r\n',
             b'Auth-Pass: ', escape(s.passwd or b''), b'\r\n']
    if s.salt and method in ('apop', 'cram-md5'):
        lines += [b'Auth-Salt: ', s.salt, b'\r\n']
    lines += [b'Auth-Protocol: ', s.proto.NAME.encode(), b'\r\n',
              b'Auth-Login-Attempt: ', b'%d' % s.login_attempt, b'\r\n',
              b'Client-IP: ', s.client_ip.encode(), b'\r\n',
              realip.client_port_header(s)]          # beyond nginx, off by default
    if s.client_host:
        lines += [b'Client-Host: ', s.client_host, b'\r\n']
    info = s.proxy_info
    if info is not None and info.src_addr is not None:
        lines += [b'Proxy-Protocol-Addr: ', info.src_addr.encode(), b'\r\n',
                  b'Proxy-Protocol-Port: ', b'%d' % info.src_port, b'\r\n',
                  b'Proxy-Protocol-Server-Addr: ', info.dst_addr.encode(), b'\r\n',
                  b'Proxy-Protocol-Server-Port: ', b'%d' % info.dst_port, b'\r\n']
    if method == 'none':
        lines += [b'Auth-SMTP-Helo: ', s.helo or b'', b'\r\n',
                  b'Auth-SMTP-From: ', s.mail_from or b'', b'\r\n',
                  b'Auth-SMTP-To: ', s.rcpt_to or b'', b'\r\n']
    if s.tls:
        lines.append(tls.auth_headers(s))
    for name, value in conf.auth_http_header:
        lines += [name.encode('utf-8', 'surrogateescape'), b': ', value.encode('utf-8', 'surrogateescape'), b'\r\n']
    lines.append(b'\r\n')
    return b''.join(lines)


def authenticate(s) -> AuthResult:
    """Ask the auth service; return the backend, or raise AuthFailed / AuthServiceError."""
    url = s.conf.auth_http
    while True:
        headers = exchange(s, url, build_request(s, url))
        result = interpret(s, url, headers)
        if result is not None:
            return result


def interpret(s, url, headers) -> AuthResult | None:
    """Apply nginx's outcome rules (auth_http.md section 5); None means WAIT: ask again."""
    error = code = None
    wait_status = False
    wait = 0
    servers, ports = [], []
    login = passwd = tls = None
    for name, value in headers:
        name = name.lower()
        if name == b'auth-status':
            if value == b'OK':
                continue
            if value == b'WAIT':
                wait_status = True
            else:
                error = value
        elif name == b'auth-server':
            servers += value.split(b',')            # a comma list: failover.py
        elif name == b'auth-port':
            ports += value.split(b',')
        elif name == b'auth-user':
            login = value
        elif name == b'auth-pass':
            passwd = value
        elif name == b'auth-wait':
            # nginx's ngx_atoi: digits that fit, else ignored; capped so a timer can hold it
            if value.isdigit() and int(value) <= MAX_ATOI:
                wait = min(int(value), MAX_WAIT)
        elif name == b'auth-error-code':
            code = value
        elif name.startswith(b'auth-ssl-backend'):  # backend_tls.py
            tls = tls or {}
            tls[name] = value
    if error is not None:
        raise errors.AuthFailed(error.decode('utf-8', 'replace'), wait=wait, error_code=code)
    if wait_status:
        gevent.sleep(wait if wait > 0 else WAIT_WITHOUT_DELAY)
        return None
    where = url.addr_text
    if not servers or not ports:
        raise errors.AuthServiceError('auth http server %s did not send server or port' % where)
    if login is not None:
        s.login = login
    if passwd is not None:
        s.passwd = passwd
    elif s.auth_method in ('apop', 'cram-md5'):
        s.passwd = None             # the client's digest is no password (nginx)
    if s.passwd is None and s.proto.NAME != 'smtp':
        raise errors.AuthServiceError('auth http server %s did not send password' % where)
    if len(ports) == 1 < len(servers):
        ports *= len(servers)                   # one port for every server listed
    targets = []
    for server, port in zip(servers, ports):
        targets.append(backend_address(s, where, server.strip(), port.strip()))
    return AuthResult(targets, s.login, s.passwd, tls=tls,
                      user_and_pass=login is not None and passwd is not None)


def backend_address(s, where, server: bytes, port: bytes):
    """``(sockaddr, family, 'server:port')``. Beyond nginx, a host name is resolved with
    the configured ``resolver`` (its first address); without one it is refused as nginx
    refuses it."""
    text = server.decode('latin-1')
    try:
        family = socket.AF_INET6 if ':' in text else socket.AF_INET
        socket.inet_pton(family, text)
    except OSError:
        family = None
        if s.conf.resolver is not None and _HOST_NAME.match(server):
            family, text = _resolve(s, text)
    if family is None:
        raise errors.AuthServiceError('auth http server %s sent invalid server address:"%s"'
                                      % (where, server.decode('latin-1')))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.AuthServiceError('auth http server %s sent invalid server port:"%s"'
                                      % (where, port.decode('latin-1')))
    return (text, int(port)), family, '%s:%s' % (text, port.decode('latin-1'))


_HOST_NAME = re.compile(rb'(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
                        rb'(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z')


def _resolve(s, name: str):
    """``(family, address)`` of a backend host name, or ``(None, name)``."""
    lookup = resolver.get(s.conf.resolver).lookup
    for rdtype, family in ((dns.rdatatype.A, socket.AF_INET),
                           (dns.rdatatype.AAAA, socket.AF_INET6)):
        code, addrs = lookup(dns.name.from_text(name), rdtype, s.conf.resolver_timeout)
        if not code and addrs:
            return family, str(addrs[0])
    return None, name


class _Parsed:
    __slots__ = ('headers', 'headers_done', 'complete', 'keep_alive', 'parser', 'status')

    def __init__(self):
        self.headers = []
        self.headers_done = self.complete = self.keep_alive = self.status = False
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, status):
        self.status = True          # the status line is in: what fails now is a header

    def on_header(self, name, value):
        self.headers.append((name, value.rstrip(b' ')))   # nginx trims trailing spaces

    def on_headers_complete(self):
        self.headers_done = True
        # llhttp forgets this once the message is complete: ask now.
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self):
        self.complete = True


_idle: dict[tuple, list] = {}


def exchange(s, url, request: bytes):
    """Send one request and return its headers, under ``auth_http_timeout``."""
    keepalive = s.conf.auth_http_keepalive
    key = (url.family, url.sockaddr, url.tls)
    pool = _idle.setdefault(key, [])
    timed_out = errors.AuthServiceError('auth http server %s timed out (110: Connection timed out)'
                                        % url.addr_text)
    with gevent.Timeout(s.conf.auth_http_timeout, timed_out):
        while pool:
            sock = pool.pop()
            try:
                return _roundtrip(url, sock, request, keepalive, pool, reused=True)
            except _Stale:
                sock.close()
        sock = _connect(url)
        try:
            return _roundtrip(url, sock, request, keepalive, pool, reused=False)
        except _Stale:
            raise errors.AuthServiceError('auth http server %s sent invalid response'
                                          % url.addr_text) from None


class _Stale(Exception):
    """A reused keep-alive connection that the server had closed before we wrote."""


def _connect(url):
    try:
        sock = socket.socket(url.family, socket.SOCK_STREAM)
    except OSError as exc:                  # EMFILE, ENFILE, ENOBUFS: nginx logs alert
        raise errors.AuthServiceError(os_error_text('socket', exc),
                                      level=log.ALERT) from None
    try:
        connect_socket(sock, url.sockaddr)
    except OSError as exc:
        sock.close()
        raise errors.AuthServiceError('connect() to %s failed (%d: %s)'
                                      % (url.addr_text, exc.errno or 0, exc.strerror)) from None
    if url.tls:
        sock = url.tls.wrap_socket(sock, server_hostname=url.server_hostname)
    return sock


def _roundtrip(url, sock, request, keepalive, pool, reused):
    parsed = _Parsed()
    parser = parsed.parser
    received = 0
    try:
        send_all(sock, request)
        while not parsed.headers_done:
            data = sock.recv(RESPONSE_LIMIT)
            if not data:
                if received == 0 and reused:
                    raise _Stale()
                raise errors.AuthServiceError('auth http server %s sent invalid response'
                                              % url.addr_text)
            received += len(data)
            parser.feed_data(data)
            if not parsed.headers_done and received >= RESPONSE_LIMIT:
                raise errors.AuthServiceError('auth http server %s sent too large response'
                                              % url.addr_text)
    except OSError as exc:
        sock.close()
        if received == 0 and reused:
            raise _Stale() from None
        raise errors.AuthServiceError(os_error_text('recv', exc)) from None
    except httptools.HttpParserError:
        sock.close()
        what = 'invalid header in response' if parsed.status else 'invalid response'
        raise errors.AuthServiceError('auth http server %s sent %s'
                                      % (url.addr_text, what)) from None
    except BaseException:
        sock.close()
        raise
    for name, _ in parsed.headers:
        if not _HEADER_NAME.match(name):
            sock.close()
            raise errors.AuthServiceError('auth http server %s sent invalid header in response'
                                          % url.addr_text)
    if keepalive and parsed.complete and parsed.keep_alive and len(pool) < keepalive:
        pool.append(sock)
    else:
        sock.close()
    return parsed.headers
