"""LineStream: bounded line reads and whole sends on one socket, errors mapped to ours.

Reads never exceed ``limit`` bytes of unconsumed input (nginx's client buffer): a line
that does not fit raises ``too_long``. Deadlines are the caller's ``gevent.Timeout``.
"""
import errno
import os
import socket

from gevent.socket import socket as GeventSocket     # not its TLS subclass

from . import errors


def os_error_text(call: str, exc: OSError) -> str:
    """``recv() failed (104: Connection reset by peer)``, as nginx logs socket errors."""
    code = exc.errno or 0
    return '%s() failed (%d: %s)' % (call, code, os.strerror(code) if code else exc)


class Side:
    """How a stream's failures are reported: the client side or the backend side."""
    __slots__ = ('closed', 'error', 'too_long')

    def __init__(self, closed, error, too_long):
        self.closed, self.error, self.too_long = closed, error, too_long


CLIENT = Side(lambda: errors.ClientClosed('client closed connection'),
              errors.ClientError,
              lambda data: errors.TooLong('client sent too long command "%s"' % data))
UPSTREAM = Side(lambda: errors.UpstreamError('upstream prematurely closed connection'),
                errors.UpstreamError,
                lambda data: errors.UpstreamError('upstream sent too long response line: "%s"'
                                                  % data))


class LineStream:
    __slots__ = ('sock', 'buf', 'limit', 'side')

    def __init__(self, sock, limit: int, side: Side = CLIENT):
        self.sock = sock
        self.buf = b''
        self.limit = limit
        self.side = side

    def fill(self) -> None:
        """Read once more; at most up to ``limit`` buffered bytes."""
        room = self.limit - len(self.buf)
        if room <= 0:
            raise self.side.too_long(redacted(self.buf))
        try:
            data = self.sock.recv(room)
        except OSError as exc:
            raise self.side.error(os_error_text('recv', exc)) from None
        if not data:
            raise self.side.closed()
        self.buf += data

    def read_line(self) -> bytes:
        """The next line including its LF (nginx: a bare LF ends a line too)."""
        start = 0
        while True:
            end = self.buf.find(b'\n', start)
            if end >= 0:
                line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
                return line
            start = len(self.buf)
            self.fill()

    def read_exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            self.fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def take_buffered(self) -> bytes:
        """Everything read but not consumed (pipelined input, forwarded after login)."""
        data, self.buf = self.buf, b''
        return data

    def send(self, data: bytes) -> None:
        try:
            send_all(self.sock, data)
        except OSError as exc:
            raise self.side.error(os_error_text('send', exc)) from None


def send_all(sock, data: bytes) -> None:
    """``sock.sendall(data)``; a plain gevent socket first tries one non-blocking send on
    the socket underneath, which takes a whole reply nearly always (gevent's ``sendall``
    asks the kernel for SO_SNDBUF on every call and goes through three Python layers)."""
    if type(sock) is GeventSocket:
        try:
            n = sock._sock.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return
        data = memoryview(data)[n:]
    sock.sendall(data)


def connect_socket(sock, sockaddr) -> None:
    """``sock.connect(sockaddr)`` for a resolved address, under the caller's Timeout: one
    connect() on the non-blocking socket underneath, a wait on the gevent socket's own
    write watcher, SO_ERROR. (gevent's ``connect`` adds a SO_ERROR query before and a
    second connect() after; ``wait_write`` would make a new watcher: a syscall.)"""
    raw = sock._sock
    err = raw.connect_ex(sockaddr)
    while err == errno.EAGAIN:          # a unix socket's full backlog: try again
        sock._wait(sock._write_event)
        err = raw.connect_ex(sockaddr)
    if err == errno.EINPROGRESS:
        sock._wait(sock._write_event)
        err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err and err != errno.EISCONN:
        raise OSError(err, os.strerror(err))


def redacted(data: bytes) -> str:
    """The start of a client command for a log line, never its arguments: nginx logs the
    whole buffer, which may hold a password or base64 AUTH data (logging.md section 1)."""
    head = b' '.join(data.split(b' ', 2)[:2])
    text = head[:64].decode('latin-1')
    text = ''.join(c if ' ' <= c < '\x7f' else '\\x%02x' % ord(c) for c in text)
    return text + ('...' if len(data) > len(head) else '')


IGNORED_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
