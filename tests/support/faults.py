"""Fault injection helpers: leak counting, scripted TCP servers for faulty auth services
and backends, and per-protocol client dialogues.

Used by tests/dialogue/test_faults.py, test_security.py (in-process proxy, gevent-patched
process) and copied from test_imap_failures.py (``NoLeaks``, ``Scripted``, ``auth_ok``),
which can import them from here instead.

    auth = FaultAuth(good_port=backend.port)          # OK -> backend for user "good"
    auth.route(b'victim', answer(b'garbage\\r\\n\\r\\n'))
    proxy = mailproxy(CONF, auth=auth.url)
"""
import gc
import os
import socket
import struct
import sys

import gevent
import pytest
from gevent.server import StreamServer

# -- leaks ------------------------------------------------------------------------------


def live_greenlets() -> int:
    """gevent greenlets alive (the hub and the resolver's worker threads are not counted:
    the test client's getaddrinfo runs there and that pool shrinks on its own schedule)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead)


def open_fds() -> int:
    """Open descriptors, less those of the pump's idle pipe pool (a bounded cache that
    a bigger transfer may grow; read from the module if loaded, never imported here)."""
    pump = sys.modules.get('gmailproxy.proxy')
    pooled = 2 * len(getattr(pump, '_pipes', ())) if pump is not None else 0
    return len(os.listdir('/proc/self/fd')) - pooled


class NoLeaks:
    """Counts live greenlets and open descriptors when ``mark()`` is called (after the
    servers started) and checks, in ``check()``, that the sessions left nothing behind
    (waiting up to ``settle`` seconds for closing sessions to finish). ``counted`` keeps
    the (greenlets, fds) before and after for reports."""

    def __init__(self, settle: float = 3.0):
        self.before = None
        self.after = None
        self.settle = settle

    def mark(self):
        gc.collect()
        self.before = (live_greenlets(), open_fds())

    def settled(self) -> bool:
        gc.collect()
        self.after = (live_greenlets(), open_fds())
        return self.after[0] <= self.before[0] and self.after[1] <= self.before[1]

    def check(self):
        with gevent.Timeout(self.settle, False):
            while not self.settled():
                gevent.sleep(0.05)
        assert self.settled(), 'leak: before %r, after %r (greenlets, fds)' % (
            self.before, self.after)


def quiesce(proxy=None, timeout: float = 3.0) -> None:
    """Wait until the proxy has no session left and the counts stop falling, so a
    ``mark()`` afterwards does not count a closing session as the baseline."""
    with gevent.Timeout(timeout, False):
        while proxy is not None and len(proxy.service.group):
            gevent.sleep(0.02)
        last = None
        while True:
            gc.collect()
            now = (live_greenlets(), open_fds())
            if now == last:
                break
            last = now
            gevent.sleep(0.05)


@pytest.fixture
def no_leaks():
    leaks = NoLeaks()
    yield leaks
    if leaks.before is not None:
        leaks.check()


# -- scripted servers ---------------------------------------------------------------------

class Scripted:
    """A TCP server running ``script(sock)`` per connection (backend or auth faults)."""

    def __init__(self, script):
        self.connections = 0

        def handle(sock, addr):
            self.connections += 1
            try:
                script(sock)
            except OSError:
                pass
            finally:
                sock.close()
        self.server = StreamServer(('127.0.0.1', 0), handle)
        self.server.start()
        self.port = self.server.server_port

    def stop(self):
        self.server.stop(timeout=1)


@pytest.fixture
def scripted():
    made = []

    def make(script):
        made.append(Scripted(script))
        return made[-1]
    yield make
    for server in made:
        server.stop()


def reset(sock) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    sock.close()


def drain(sock, timeout: float = 5.0) -> bytes:
    """Read until the peer closes (or ``timeout``): a silent server that still notices
    when the proxy gives up, so its greenlet ends with the session."""
    got = b''
    with gevent.Timeout(timeout, False):
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            got += data
    return got


def read_request(sock, limit: int = 65536) -> bytes:
    """One HTTP request head (the auth_http request), or what came before EOF."""
    data = b''
    with gevent.Timeout(5, False):
        while b'\r\n\r\n' not in data and len(data) < limit:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def header(request: bytes, name: bytes) -> bytes | None:
    for line in request.split(b'\r\n')[1:]:
        key, sep, value = line.partition(b': ')
        if sep and key.lower() == name.lower():
            return value
    return None


# -- auth service scripts: (sock, request) -> None ----------------------------------------

def ok_answer(port: int, extra: bytes = b'') -> bytes:
    return (b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
            b'Auth-Port: %d\r\n%s\r\n' % (port, extra))


def answer(raw: bytes):
    """Send ``raw`` verbatim, then close."""
    def script(sock, request):
        sock.sendall(raw)
    return script


def ok_to(port: int, extra: bytes = b''):
    """``Auth-Status: OK`` pointing at ``127.0.0.1:port`` (``extra``: more header lines)."""
    return answer(ok_answer(port, extra))


def hang(sock, request):
    """Accept the request and never answer (until the proxy gives up)."""
    drain(sock)


def close_now(sock, request):
    """Close without a byte."""


def reset_now(sock, request):
    reset(sock)


def dribble(raw: bytes, pause: float = 0.05):
    """Send ``raw`` a byte at a time (a slow or fragmenting auth service)."""
    def script(sock, request):
        for i in range(len(raw)):
            sock.sendall(raw[i:i + 1])
            gevent.sleep(pause)
    return script


def endless(chunk: bytes = b'X' * 1024):
    """Send ``chunk`` forever (until the peer closes or 5 s pass)."""
    def script(sock, *request):
        with gevent.Timeout(5, False):
            while True:
                sock.sendall(chunk)
    return script


class FaultAuth:
    """An auth service answering per ``Auth-User`` (as sent, escaped): a ``route``d
    login runs its script, anyone else gets OK to ``good_port``. Records every request."""

    def __init__(self, good_port: int = 0):
        self.good_port = good_port
        self.routes = {}
        self.requests: list[bytes] = []

        def handle(sock):
            request = read_request(sock)
            if not request:
                return
            self.requests.append(request)
            script = self.routes.get(header(request, b'Auth-User'))
            if script is None:
                script = ok_to(self.good_port)
            script(sock, request)
        self.scripted = Scripted(handle)
        self.port = self.scripted.port
        self.url = 'http://127.0.0.1:%d/auth' % self.port
        self.address = '127.0.0.1:%d' % self.port

    def route(self, login: bytes, script) -> None:
        self.routes[login] = script

    def stop(self) -> None:
        self.scripted.stop()


@pytest.fixture
def fault_auth():
    auth = FaultAuth()
    yield auth
    auth.stop()


# -- backend scripts ------------------------------------------------------------------------

CLOSE, RESET, HANG = 'close', 'reset', 'hang'


def backend(steps, read_first: bool = False):
    """A backend login dialogue: ``steps[0]`` is sent at once (the greeting), each later
    step after one line is read. A step is bytes, ``CLOSE``, ``RESET``, ``HANG`` (wait
    for the proxy to close) or a callable(sock). After the last step: wait for EOF."""
    def script(sock):
        f = sock.makefile('rb')
        for i, step in enumerate(steps):
            if i or read_first:
                with gevent.Timeout(5, False):
                    f.readline()
            if step == CLOSE:
                return
            if step == RESET:
                return reset(sock)
            if step == HANG:
                drain(sock)
                return
            if callable(step):
                step(sock)
                continue
            sock.sendall(step)
        drain(sock)
    return script


# -- client dialogues ------------------------------------------------------------------------

GREETINGS = {'imap': b'* OK IMAP4 ready\r\n', 'pop3': b'+OK POP3 ready\r\n',
             'smtp': b'220 '}
INTERNAL = {'imap': b'* BAD internal server error\r\n',
            'pop3': b'-ERR internal server error\r\n',
            'smtp': b'451 4.3.2 Internal server error\r\n'}


def login_lines(proto: str, user: bytes, password: bytes = b'secret') -> list[bytes]:
    """The client's lines that complete a login (the last one triggers auth_http)."""
    if proto == 'imap':
        return [b'a1 LOGIN ' + user + b' ' + password + b'\r\n']
    if proto == 'pop3':
        return [b'USER ' + user + b'\r\n', b'PASS ' + password + b'\r\n']
    import base64
    return [b'EHLO client.example\r\n',
            b'AUTH PLAIN ' + base64.b64encode(b'\0' + user + b'\0' + password) + b'\r\n']


def expect_greeting(c, proto: str) -> None:
    c.expect(GREETINGS[proto])


def send_login(c, proto: str, user: bytes, password: bytes = b'secret') -> None:
    """Greeting read already; sends the login, reading the intermediate replies."""
    lines = login_lines(proto, user, password)
    for line in lines[:-1]:
        c.send(line)
        if proto == 'smtp':
            c.read_lines_until(b'250 ')
        else:
            c.expect(b'+OK')
    c.send(lines[-1])


LOGGED_IN = {'imap': b'a1 OK', 'pop3': b'+OK', 'smtp': b'235 2.0.0 OK\r\n'}
AFTER = {'imap': (b'a2 NOOP\r\n', b'a2 OK'), 'pop3': (b'NOOP\r\n', b'+OK'),
         'smtp': (b'NOOP\r\n', b'250')}


def good_session(proxy, proto: str, user: bytes = b'good') -> None:
    """A whole session through the proxy: login, one command relayed by the backend,
    close. Proves the worker still serves after a fault."""
    c = proxy.client()
    try:
        expect_greeting(c, proto)
        send_login(c, proto, user)
        c.expect(LOGGED_IN[proto], timeout=5)
        command, reply = AFTER[proto]
        c.send(command)
        c.expect(reply, timeout=5)
    finally:
        c.close()
