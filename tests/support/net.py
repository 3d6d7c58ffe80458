"""Ports and a raw line client for byte-for-byte dialogue tests."""
from __future__ import annotations

import socket
import ssl
import subprocess
import time

DEFAULT_TIMEOUT = 5.0


def free_port(host: str = '127.0.0.1') -> int:
    """A TCP port that was free a moment ago on ``host``."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = '127.0.0.1') -> list[int]:
    """``n`` distinct free ports (all bound at once, so they differ)."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
              proc: subprocess.Popen | None = None, what: str = '') -> None:
    """Wait until ``host:port`` accepts connections.

    Raises ``TimeoutError``; if ``proc`` is given and exits first, raises
    ``RuntimeError`` at once instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError('%s exited with %s before %s:%s accepted'
                               % (what or proc.args, proc.returncode, host, port))
        if port_open(host, port, timeout=0.2):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError('%s:%s not accepting after %ss %s'
                               % (host, port, timeout, what))
        time.sleep(0.02)


class Client:
    """A raw TCP client that reads lines against a deadline.

    ``expect(b'* OK')`` reads one line and checks its start; ``expect(b'a NO x\\r\\n')``
    (expected bytes ending in a newline) reads as many lines as it holds and compares
    them exactly. Every read has a timeout; a timeout or an early close fails with the
    bytes seen.
    """

    def __init__(self, host: str = '127.0.0.1', port: int = 0,
                 timeout: float = DEFAULT_TIMEOUT, sock: socket.socket | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock = sock if sock is not None else socket.create_connection(
            (host, port), timeout=timeout)
        self.buffer = b''
        self.eof = False

    # context manager
    def __enter__(self) -> 'Client':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # writing
    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def sendline(self, line: bytes) -> None:
        self.send(line + b'\r\n')

    # reading
    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False on EOF; TimeoutError at deadline."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError('timed out; buffered: %r' % self.buffer)
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise TimeoutError('timed out; buffered: %r' % self.buffer) from None
        except ssl.SSLZeroReturnError:
            data = b''
        except ConnectionResetError:
            data = b''
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def read_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Bytes up to and including ``marker`` (EOFError if the peer closes first)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while marker not in self.buffer:
            if not self._fill(deadline):
                raise EOFError('closed before %r; buffered: %r' % (marker, self.buffer))
        i = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:i], self.buffer[i:]
        return data

    def readline(self, timeout: float | None = None) -> bytes:
        """One line including its ``\\n``."""
        return self.read_until(b'\n', timeout)

    def read_exactly(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buffer) < n:
            if not self._fill(deadline):
                raise EOFError('closed after %d of %d bytes: %r' % (len(self.buffer), n,
                                                                     self.buffer))
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def expect(self, expected: bytes, timeout: float | None = None) -> bytes:
        """Read and check the next line(s); returns the bytes read.

        Expected bytes that end in ``\\n`` are compared exactly over as many lines as
        they hold; otherwise one line is read and must start with ``expected``.
        """
        if expected.endswith(b'\n'):
            lines = [self.readline(timeout) for _ in expected.splitlines(True)]
            got = b''.join(lines)
            assert got == expected, 'expected %r, got %r' % (expected, got)
            return got
        line = self.readline(timeout)
        assert line.startswith(expected), 'expected %r..., got %r' % (expected, line)
        return line

    def read_lines_until(self, prefix: bytes, timeout: float | None = None) -> bytes:
        """Lines up to and including the first one starting with ``prefix`` (e.g. the
        ``b'250 '`` ending a multi-line SMTP reply, or a tagged IMAP response)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while True:
            line = self.readline(max(deadline - time.monotonic(), 0.001))
            lines.append(line)
            if line.startswith(prefix):
                return b''.join(lines)

    def recv_all_until_close(self, timeout: float | None = None) -> bytes:
        """Everything the peer sends until it closes (TimeoutError if it does not)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._fill(deadline):
            pass
        data, self.buffer = self.buffer, b''
        return data

    def closed(self, timeout: float = 2.0) -> bool:
        """True if the peer closes within ``timeout`` and sent nothing more before it.

        Bytes that arrive meanwhile stay in ``self.buffer`` (and make this False).
        """
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return self.buffer == b''

    def silent(self, timeout: float = 0.3) -> bool:
        """True if nothing arrives (and the peer does not close) within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            if self.buffer or not self._fill(deadline):
                return False
        except TimeoutError:
            return True
        return False

    def starttls(self, context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> ssl.SSLSocket:
        """Wrap the connection in TLS (after the STARTTLS reply was read)."""
        assert not self.buffer, 'unread bytes before TLS: %r' % self.buffer
        if context is None:
            context = insecure_context()
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        return self.sock


def insecure_context() -> ssl.SSLContext:
    """A client context accepting any certificate (test ones are self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_client(host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
               context: ssl.SSLContext | None = None,
               server_hostname: str | None = None) -> Client:
    """A Client on an implicit-TLS port (imaps, pop3s, smtps)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock = (context or insecure_context()).wrap_socket(
        sock, server_hostname=server_hostname)
    return Client(host, port, timeout=timeout, sock=sock)


def exchange(port: int, chunks, quiet, greeting: bool = True) -> bytes:
    """Send each chunk once the answer to the previous one has settled; return all bytes
    received (differential tests: the same script against two proxies).

    ``quiet(got)``: the seconds without a byte after which an answer whose bytes so far
    are ``got`` has settled. With ``greeting``, the server's greeting settles first.
    Sending stops once the peer closes.
    """
    sock = socket.create_connection(('127.0.0.1', port), timeout=DEFAULT_TIMEOUT)
    received = b''

    def drain() -> bool:
        """Read one answer; False if the peer closed."""
        nonlocal received
        got = b''
        while True:
            sock.settimeout(quiet(got))
            try:
                data = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return True
            if not data:
                return False
            got += data
            received += data

    try:
        if greeting:
            drain()
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            if not drain():
                break
    finally:
        sock.close()
    return received
