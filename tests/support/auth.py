"""A raw auth_http server that records every request's bytes and answers from a table.

Thread-based (socketserver), so it works in plain pytest processes and, as greenlets, in
gevent-patched ones. HTTP/1.0 requests get one answer and a close (what nginx does);
HTTP/1.1 requests without ``Connection: close`` are kept alive and answered with
``Content-Length: 0``.

    auth = RecordingAuthServer(users={'alice': {'password': 'secret'}},
                               ports={'imap': dovecot.imap_port})
    with auth:
        ... auth_http http://127.0.0.1:%d/auth; ... % auth.port
        assert auth.requests[0].startswith(b'GET /auth HTTP/1.0\\r\\n')
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import socketserver
import threading
import time
from typing import Callable
from urllib.parse import unquote

MAX_REQUEST = 65536
READ_TIMEOUT = 10.0
FAILED = 'Invalid login or password'


class Request:
    """One parsed auth request: ``line``, ``headers`` [(name, value)], ``raw`` bytes."""

    def __init__(self, raw: bytes):
        self.raw = raw
        text = raw.decode('latin-1')
        lines = text.replace('\r\n', '\n').split('\n')
        self.line = lines[0]
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(':')
            self.headers.append((name.strip(), value.strip(' ')))

    def get(self, name: str, default: str | None = None) -> str | None:
        """The last value of header ``name`` (case-insensitive), as sent (escaped)."""
        for n, v in reversed(self.headers):
            if n.lower() == name.lower():
                return v
        return default

    def unescaped(self, name: str) -> str:
        """A header value with nginx's %XX escaping undone (Auth-User, Auth-Pass)."""
        return unquote(self.get(name, ''), encoding='utf-8', errors='surrogateescape')

    @property
    def version(self) -> str:
        return self.line.rsplit(' ', 1)[-1]

    @property
    def keep_alive(self) -> bool:
        conn = (self.get('Connection') or '').lower()
        if self.version == 'HTTP/1.1':
            return conn != 'close'
        return conn == 'keep-alive'

    def __repr__(self) -> str:
        return 'Request(%r)' % self.raw


def b64(data: bytes) -> bytes:
    """Base64 as SASL clients send it."""
    return base64.b64encode(data)


def cram_md5_digest(password: str, salt: str) -> str:
    return hmac.new(password.encode(), salt.encode(), hashlib.md5).hexdigest()


def apop_digest(password: str, salt: str) -> str:
    return hashlib.md5(salt.encode() + password.encode()).hexdigest()


def check_password(req: Request, password: str) -> bool:
    """Verify Auth-Pass for the request's Auth-Method against a plaintext password."""
    method = (req.get('Auth-Method') or '').lower()
    given = req.unescaped('Auth-Pass')
    salt = req.get('Auth-Salt') or ''
    if method == 'cram-md5':
        return hmac.compare_digest(given.lower(), cram_md5_digest(password, salt))
    if method == 'apop':
        return hmac.compare_digest(given.lower(), apop_digest(password, salt))
    if method == 'external':
        return True     # the certificate was the credential
    return hmac.compare_digest(given.encode('utf-8', 'surrogateescape'),
                               password.encode())


def http_response(headers: list[tuple[str, str]], keep_alive: bool = False) -> bytes:
    if keep_alive:
        head = 'HTTP/1.1 200 OK\r\n'
        headers = headers + [('Content-Length', '0')]
    else:
        head = 'HTTP/1.0 200 OK\r\n'
    text = head + ''.join('%s: %s\r\n' % h for h in headers) + '\r\n'
    return text.encode('latin-1')


class RecordingAuthServer:
    """Records requests (``requests``: list of bytes, ``parsed``: list of Request).

    ``users``: {login: {'password': p, 'server': ip, 'port': n, 'wait': secs, 'user': u,
    'pass': p, 'status': text, 'error_code': '451 4.3.0', 'headers': [(name, value)]}};
    every key is optional except 'password'; a ``status`` other than OK is always sent
    (with ``Auth-Wait``/``Auth-Error-Code`` if set), whatever the password. A known user
    with the right password gets ``Auth-Status: OK``, ``Auth-Server`` (``server``),
    ``Auth-Port`` (the user's ``port``, else ``ports[Auth-Protocol]``),
    ``Auth-User``/``Auth-Pass`` when ``user``/``pass`` are set, and ``Auth-Pass`` with
    the plaintext password for cram-md5/apop/external. Anything else gets ``Auth-Status:
    Invalid login or password`` and ``Auth-Wait`` when the user's or the server's
    ``wait`` is set.

    ``relay(request)`` decides ``Auth-Method: none`` (SMTP): True → OK to
    ``ports['smtp']``, a dict → answered like a user entry, a str → rejected with that
    text, anything else → rejected.

    Failure modes, settable any time: ``delay`` (seconds before answering),
    ``close_without_answer``, ``respond_raw`` (bytes sent verbatim, then close), and
    ``responder(request) -> bytes | None`` (None: the normal answer).
    """

    def __init__(self, users: dict[str, dict] | None = None,
                 ports: dict[str, int] | None = None, server: str = '127.0.0.1',
                 host: str = '127.0.0.1', wait: int | None = None,
                 relay: Callable[[Request], object] | None = None):
        self.users = dict(users or {})
        self.ports = dict(ports or {})
        self.server = server
        self.wait = wait
        self.relay = relay
        self.delay = 0.0
        self.close_without_answer = False
        self.respond_raw: bytes | None = None
        self.responder: Callable[[Request], bytes | None] | None = None
        self.requests: list[bytes] = []
        self.parsed: list[Request] = []
        self.responses: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._socks: set[socket.socket] = set()
        self._host = host
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # lifecycle
    def start(self) -> 'RecordingAuthServer':
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer._serve_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128     # many logins at once (reload tests)
            address_family = socket.AF_INET6 if ':' in self._host else socket.AF_INET

        self._tcp = Server((self._host, 0), Handler)
        self.port = self._tcp.server_address[1]
        self._thread = threading.Thread(target=self._tcp.serve_forever,
                                        kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._tcp is None:
            return
        self._tcp.shutdown()
        self._tcp.server_close()
        with self._lock:
            for s in list(self._socks):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._tcp = None

    def __enter__(self) -> 'RecordingAuthServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The ``auth_http`` value, e.g. ``http://127.0.0.1:8080/auth``."""
        host = '[%s]' % self._host if ':' in self._host else self._host
        return 'http://%s:%d/auth' % (host, self.port)

    @property
    def address(self) -> str:
        """``ADDR:PORT`` as nginx writes it in log lines."""
        return '%s:%d' % (self._host, self.port)

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[bytes]:
        """Wait until ``n`` requests were recorded; returns all of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                remaining = deadline - time.monotonic()
                assert remaining > 0, 'got %d auth request(s), wanted %d: %r' % (
                    len(self.requests), n, self.requests)
                self._cond.wait(remaining)
            return list(self.requests)

    # serving
    def _serve_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._socks.add(sock)
        try:
            buf = b''
            while True:
                raw, buf = self._read_request(sock, buf)
                if raw is None:
                    return
                req = Request(raw)
                with self._cond:
                    self.requests.append(raw)
                    self.parsed.append(req)
                    self._cond.notify_all()
                if self.delay:
                    time.sleep(self.delay)
                if self.close_without_answer:
                    return
                if self.respond_raw is not None:
                    self._send(sock, self.respond_raw)
                    return
                answer = self.responder(req) if self.responder else None
                keep = False
                if answer is None:
                    keep = req.keep_alive
                    answer = http_response(self.answer(req), keep_alive=keep)
                self._send(sock, answer)
                if not keep:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._socks.discard(sock)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        with self._lock:
            self.responses.append(data)
        sock.sendall(data)

    @staticmethod
    def _read_request(sock: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
        sock.settimeout(READ_TIMEOUT)
        while True:
            for sep in (b'\r\n\r\n', b'\n\n'):
                i = buf.find(sep)
                if i >= 0:
                    end = i + len(sep)
                    return buf[:end], buf[end:]
            if len(buf) > MAX_REQUEST:
                return None, b''
            try:
                data = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None, b''
            if not data:
                return None, b''
            buf += data

    def answer(self, req: Request) -> list[tuple[str, str]]:
        """The response headers for ``req`` by the rules in the class docstring."""
        method = (req.get('Auth-Method') or '').lower()
        protocol = req.get('Auth-Protocol') or ''
        if method == 'none':
            verdict = self.relay(req) if self.relay else None
            if verdict is True:
                return self._ok({}, protocol, None)
            if isinstance(verdict, dict):
                return self._ok(verdict, protocol, None)
            status = verdict if isinstance(verdict, str) else FAILED
            return self._fail({'status': status})
        login = req.unescaped('Auth-User')
        entry = self.users.get(login)
        if entry is not None and entry.get('status', 'OK') != 'OK':
            return self._fail(entry)    # scripted answer (a rejection text, or WAIT)
        if entry is None or not check_password(req, entry.get('password', '')):
            return self._fail(entry or {})
        plaintext = None
        if method in ('cram-md5', 'apop', 'external'):
            plaintext = entry['password']     # nginx needs it for the backend login
        return self._ok(entry, protocol, plaintext)

    def _ok(self, entry: dict, protocol: str, plaintext: str | None):
        port = entry.get('port') or self.ports.get(protocol)
        headers = [('Auth-Status', 'OK'),
                   ('Auth-Server', entry.get('server', self.server)),
                   ('Auth-Port', str(port))]
        if entry.get('user') is not None:
            headers.append(('Auth-User', entry['user']))
        if entry.get('pass') is not None:
            headers.append(('Auth-Pass', entry['pass']))
        elif plaintext is not None:
            headers.append(('Auth-Pass', plaintext))
        headers.extend(entry.get('headers', ()))
        return headers

    def _fail(self, entry: dict):
        headers = [('Auth-Status', entry.get('status', FAILED))]
        wait = entry.get('wait', self.wait)
        if wait is not None:
            headers.append(('Auth-Wait', str(wait)))
        if entry.get('error_code'):
            headers.append(('Auth-Error-Code', entry['error_code']))
        return headers
