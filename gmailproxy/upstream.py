"""Connecting to the backend and reading its login replies (proxy.md sections 1-3).

The session runs ``connect`` and the protocol's ``login_upstream`` under one ``timeout``
deadline, armed once, as nginx does.
"""
import logging
import socket

from . import backend_tls, errors, failover, log, realip
from .config import values
from .config.directives import D, MAIL_SERVER
from .log import printable
from .stream import UPSTREAM, LineStream, connect_socket, os_error_text

DIRECTIVES = [
    D('proxy', MAIL_SERVER, '1', values.flag, default=False),   # parsed, no effect (nginx)
    D('proxy_buffer', MAIL_SERVER, '1', values.size, default=values.page_size),
    D('proxy_timeout', MAIL_SERVER, '1', values.time_ms, default=24 * 3600.0),
    D('proxy_pass_error_message', MAIL_SERVER, '1', values.flag, default=False),
    D('xclient', MAIL_SERVER, '1', values.flag, default=True),
    D('proxy_smtp_auth', MAIL_SERVER, '1', values.flag, default=False),
    D('proxy_protocol', MAIL_SERVER, '1', values.choice('on', 'off', 'v2'), default='off'),
]


class Upstream:
    """The backend connection during login: a line stream plus reply checks."""
    __slots__ = ('sock', 'stream', 'name', 'tls')

    def __init__(self, sock, limit: int, name: str):
        self.sock = sock
        self.stream = LineStream(sock, limit, UPSTREAM)
        self.name = name
        self.tls = None                 # None, 'on' or 'starttls' (backend_tls.py)

    def send(self, s, data: bytes, action: str) -> None:
        s.action = action
        self.stream.send(data)

    def read_reply(self, s, multiline: bool = False) -> bytes:
        """One reply: a line of at least 4 bytes ending in CRLF; with ``multiline``
        (SMTP), continued while the 4th byte of the last line is ``-``."""
        s.action = 'reading response from upstream'
        stream = self.stream
        reply = stream.read_line()
        while len(reply) < 4 or not reply.endswith(b'\r\n'):
            reply += stream.read_line()
        if multiline:
            last = reply
            while len(last) >= 4 and last[3:4] == b'-':
                last = stream.read_line()
                reply += last
        return reply

    def check(self, s, reply: bytes, ok: bool) -> bytes:
        """Raise the nginx failure for a reply that failed its check (proxy.md section 3)."""
        if ok:
            return reply
        first = printable(reply.split(b'\n', 1)[0].rstrip(b'\r'))   # no forged log lines
        message = 'upstream sent invalid response: "%s"' % first
        if s.conf.proxy_pass_error_message:
            raise errors.UpstreamRejected(message, reply, level=logging.INFO)
        raise errors.UpstreamRejected(message, reply)


def connect(s) -> Upstream:
    """Connect to the first reachable backend the auth answer named (failover.py)."""
    conf = s.conf
    fo = conf.failover                  # None unless a failover directive is set
    last_error = None
    for sockaddr, family, name in s.auth.servers if fo is None else \
            failover.order(s.auth.servers, fo):
        if last_error is not None:
            s.error(last_error.message)     # each failed try, as nginx logs one
        s.upstream_name = name
        s.action = 'connecting to upstream'
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:              # EMFILE, ENFILE, ENOBUFS: nginx logs alert
            raise errors.UpstreamError(os_error_text('socket', exc),
                                       level=log.ALERT) from None
        s.upstream_sock = sock
        try:
            if fo is None:
                connect_socket(sock, sockaddr)
            else:
                failover.connect(s, connect_socket, sock, sockaddr, name)
        except OSError as exc:
            sock.close()
            last_error = errors.UpstreamError('connect() to %s failed (%d: %s)'
                                              % (name, exc.errno or 0, exc.strerror))
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        realip.send_backend_header(s, sock)     # proxy_protocol on|v2
        up = Upstream(sock, conf.proxy_buffer, name)
        if conf.proxy_ssl != 'off' or s.auth.tls:
            backend_tls.begin(s, up)    # sets up.tls; with "on", the TLS handshake
        return up
    raise last_error


def recv_error(exc: OSError) -> errors.UpstreamError:
    return errors.UpstreamError(os_error_text('recv', exc))
