"""A client session: the pipeline from accept to pump, and the mapping of errors to replies.

One greenlet per connection runs ``handle`` top to bottom:
greeting -> dialogue (``proto.serve``) -> auth -> backend connect + login -> pump.
"""
import itertools
import logging
import socket

import gevent

from . import auth, errors, limits, log, metrics, oauth, proxy, realip, upstream
from . import ssl as tls
from .protocols import PROTOCOLS
from .stream import CLIENT, LineStream

_conn_ids = itertools.count(1)    # server.run replaces it with log.ConnectionCounter()
LINGER = 1.0            # seconds to drain a client's input before closing
_log = logging.getLogger(__name__)


class Session:
    """Lasting per-connection state; parser state lives in the protocol's locals."""
    __slots__ = ('sock', 'stream', 'peer', 'client_ip', 'local', 'listen', 'conf', 'proto',
                 'conn_id', 'logger', 'action', 'tls', 'starttls_used',
                 'login', 'passwd', 'auth_method', 'salt', 'tag', 'errors', 'login_attempt',
                 'helo', 'esmtp', 'mail_from', 'rcpt_to', 'client_host',
                 'upstream_name', 'upstream_sock', 'auth', 'proxy_info', 'extra', 'track')

    def __init__(self, sock, peer, local, listen):
        conf = listen.server
        self.sock = sock
        self.peer = peer
        self.local = local
        self.client_ip = peer_ip(peer)
        self.listen = listen
        self.conf = conf
        self.proto = PROTOCOLS[conf.protocol]
        self.conn_id = next(_conn_ids)
        self.logger = conf.logger
        self.action = 'sending client greeting line'
        self.tls = False
        self.starttls_used = False
        self.login = self.passwd = self.salt = self.tag = None
        self.auth_method = 'plain'
        self.errors = self.login_attempt = 0
        self.helo = self.mail_from = self.rcpt_to = None
        self.esmtp = False
        self.client_host = None
        self.upstream_name = None
        self.upstream_sock = None
        self.auth = None
        self.proxy_info = None
        self.extra = None
        self.track = None               # limits.Track when conf.tracked
        self.stream = LineStream(sock, self.proto.client_buffer(conf), CLIENT)

    def __repr__(self) -> str:
        return '<Session *%d %s login=%r passwd=...>' % (self.conn_id, self.client_ip,
                                                         self.login)

    def info(self, msg: str) -> None:
        log.session_line(self, log.INFO, msg)

    def error(self, msg: str) -> None:
        log.session_line(self, log.ERROR, msg)

    def send(self, data: bytes) -> None:
        self.stream.send(data)

    def ask(self, challenge: bytes) -> bytes:
        """Send a continuation/challenge and read the client's one-line answer."""
        self.stream.send(challenge)
        return self.stream.read_line()

    def invalid(self, exc: errors.BadCommand) -> None:
        """Count an invalid command against ``max_errors`` (common.md section 3)."""
        if exc.message:
            self.info(exc.message)
        self.errors += 1
        if self.errors >= self.conf.max_errors:
            self.info('client sent too many invalid commands')
            self.send(self.proto.reply(self, 'invalid'))
            raise errors.TooManyErrors()
        self.send(self.proto.reply(self, 'invalid'))


def peer_ip(peer) -> str:
    if isinstance(peer, tuple):
        return peer[0]
    return 'unix:'


def peer_text(peer) -> str:
    if isinstance(peer, tuple):
        if ':' in peer[0]:
            return '[%s]:%d' % (peer[0], peer[1])
        return '%s:%d' % (peer[0], peer[1])
    return 'unix:'


def handle(sock, peer, listen, local=None) -> None:
    """The StreamServer handler; returning closes the client socket. ``local``: the
    socket's own address when the caller already asked the kernel for it."""
    try:
        if local is None:
            local = sock.getsockname()
        if isinstance(peer, tuple):     # TCP, not a unix socket
            # Each reply is one send already; Nagle would only hold back the last reply
            # before a close, which a reset can then destroy.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    s = Session(sock, peer, local, listen)
    if s.logger.isEnabledFor(log.INFO):
        s.logger.info('*%d client %s connected to %s', s.conn_id, peer_text(peer),
                      listen.addr_text)
    if s.conf.tracked:
        limits.begin(s)               # limits, metrics, access log (issue 12)
    try:
        run(s)
    except errors.ProxyError as exc:
        fail(s, exc)
        linger(s, sock)
    except gevent.GreenletExit:
        raise
    except Exception:
        log.session_line(s, log.ALERT, 'internal error', exc_info=True)
        _try_send(s, s.proto.reply(s, 'internal'))
    finally:
        if s.sock is not sock:
            tls.close(s)              # close_notify; an unshut TLS session leaves the cache
        if s.upstream_sock is not None:
            s.upstream_sock.close()
        if s.track is not None:
            limits.end(s)


def run(s: Session) -> None:
    proto = s.proto
    with gevent.Timeout(s.conf.timeout, errors.ClientTimeout):
        if s.listen.proxy_protocol:
            realip.accept(s)          # PROXY header first, then maybe the real client address
        if s.listen.ssl:
            tls.accept(s)             # implicit TLS (993/995/465)
        if s.track is not None:
            limits.admit(s)           # max_sessions_per_address
        proto.start(s)                # greeting (SMTP: resolver and greeting delay first)
    authenticate(s)
    with gevent.Timeout(s.conf.timeout, errors.UpstreamTimeout):
        up = upstream.connect(s)
        if s.track is not None:
            metrics.backend_connected(s)
        proto.login_upstream(s, up)
    s.action = None
    s.info('client logged in')
    if s.track is not None:
        metrics.logged_in(s)
    proxy.pump(s, up)


def authenticate(s: Session) -> None:
    """The dialogue and auth_http, repeated after an ``Auth-Wait`` rejection."""
    proto = s.proto
    timeout = s.conf.timeout
    while True:
        s.action = 'in auth state'
        with gevent.Timeout(timeout, errors.ClientTimeout):
            proto.serve(s)
        s.action = 'in http auth state'
        s.login_attempt += 1
        try:
            check = auth.authenticate if s.track is None else limits.authenticate
            s.auth = check(s)
            return
        except errors.AuthFailed as exc:
            s.info('client login failed: "%s"' % exc.message)
            if not exc.wait and s.auth_method != 'none':   # a refused RCPT keeps the session
                reject(s, exc)
                raise errors.SessionDone()
            gevent.sleep(exc.wait)
            reject(s, exc)
            proto.reset(s)


def reject(s: Session, exc: errors.AuthFailed) -> None:
    """The protocol's rejection reply; XOAUTH2 and OAUTHBEARER first send their error
    challenge and read the client's answer (oauth.py)."""
    if s.auth_method in oauth.METHODS:
        oauth.error_challenge(s)
    s.send(s.proto.auth_failed_reply(s, exc))


def fail(s: Session, exc: errors.ProxyError) -> None:
    if s.track is not None:
        s.track.exc = exc
    if exc.message and exc.level > logging.DEBUG:
        log.session_line(s, exc.level, exc.message)
    if isinstance(exc, errors.UpstreamRejected) and s.conf.proxy_pass_error_message:
        _try_send(s, exc.response)
    elif exc.reply is not None:
        _try_send(s, s.proto.reply(s, exc.reply))


def linger(s: Session, raw_sock) -> None:
    """Close after a final reply without a reset: unread client input (a pipelined or
    too long command) would make the kernel send RST and may destroy that reply."""
    sock = s.sock
    try:
        if sock is not raw_sock:
            tls.shutdown(s)           # close_notify first: the session stays resumable
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(LINGER, errors.ClientTimeout):
            while sock.recv(4096):
                pass
    except (OSError, errors.ClientTimeout):
        pass


def _try_send(s: Session, data: bytes) -> None:
    try:
        with gevent.Timeout(s.conf.timeout, errors.ClientTimeout):
            s.sock.sendall(data)
    except (OSError, errors.ProxyError):
        pass
