"""Shared pieces of the load and soak scripts in this folder (not used by the tests).

Everything runs on 127.0.0.1 only, bounded in count and time, and stops by itself:

* ``Services`` — a child process with an auth_http service (every login OK, to the
  backend) and a small IMAP backend (LOGIN with literals, NOOP, LOGOUT, anything else
  ``OK``), both on gevent;
* ``Proxy`` — ``python -m gmailproxy`` with ``master_process off`` (one worker, the
  process whose memory and descriptors we sample), its limit of open files set by
  ``nofile``;
* ``imap_login`` / ``noop`` — a client's steps on a gevent socket, with timeouts;
* ``rss_kb`` / ``open_fds`` — /proc samples of a process.
"""
from gevent import monkey

monkey.patch_all()

import multiprocessing  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the gmailproxy to run: this checkout, or another tree (to measure a change)
PROXY_PATH = os.environ.get('GMAILPROXY_PATH', ROOT)


def raise_nofile(n: int = 200000) -> int:
    """As many open files as allowed (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((n, max(n, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# --- auth service and backend, in a child process ----------------------------------------

def _serve(auth_port: int, backend_port: int, ready) -> None:
    raise_nofile()
    ok = (b'HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
          b'Auth-Port: %d\r\nContent-Length: 0\r\n\r\n' % backend_port)

    def auth(sock, addr):
        buf = b''
        try:
            while True:
                while b'\r\n\r\n' not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b'\r\n\r\n')
                sock.sendall(ok if b'HTTP/1.1' in head.split(b'\r\n', 1)[0]
                             else ok.replace(b'HTTP/1.1', b'HTTP/1.0'))
                if b'HTTP/1.1' not in head.split(b'\r\n', 1)[0]:
                    return
        except OSError:
            return
        finally:
            sock.close()

    def backend(sock, addr):
        f = sock.makefile('rb')
        try:
            sock.sendall(b'* OK backend ready\r\n')
            while True:
                line = f.readline(65536)
                if not line:
                    return
                tag, _, rest = line.partition(b' ')
                word = rest.split(b' ', 1)[0].strip().upper()
                if word == b'LOGIN' and line.endswith(b'}\r\n'):
                    for _ in range(2):
                        sock.sendall(b'+ OK\r\n')
                        f.readline(65536)
                    sock.sendall(tag + b' OK logged in\r\n')
                elif word == b'LOGOUT':
                    sock.sendall(b'* BYE\r\n' + tag + b' OK bye\r\n')
                    return
                else:
                    sock.sendall(tag + b' OK ' + word + b' done\r\n')
        except OSError:
            return
        finally:
            sock.close()

    servers = [StreamServer(('127.0.0.1', auth_port), auth, backlog=4096),
               StreamServer(('127.0.0.1', backend_port), backend, backlog=4096)]
    for server in servers:
        server.start()
    ready.set()
    gevent.wait()


class Services:
    def __init__(self):
        self.auth_port, self.backend_port = free_port(), free_port()
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(target=_serve, daemon=True,
                                            args=(self.auth_port, self.backend_port, ready))
        self.proc.start()
        if not ready.wait(10):
            raise RuntimeError('services did not start')

    def stop(self):
        self.proc.terminate()
        self.proc.join(5)


# --- the proxy ---------------------------------------------------------------------------

CONF = '''
master_process off;
events { worker_connections %(connections)d; }
error_log %(log)s %(level)s;
mail {
    auth_http http://127.0.0.1:%(auth)d/auth;
    timeout %(timeout)s;
    proxy_timeout 1h;
    server_name load.example;
    %(extra)s
    server { listen 127.0.0.1:%(port)d backlog=4096; protocol imap; }
}
'''


class Proxy:
    def __init__(self, services: Services, nofile: int = 200000, connections: int = 60000,
                 timeout: str = '60s', level: str = 'info', extra: str = ''):
        self.dir = tempfile.mkdtemp(prefix='gmailproxy-load-')
        self.port = free_port()
        self.log = os.path.join(self.dir, 'error.log')
        self.conf = os.path.join(self.dir, 'mail.conf')
        with open(self.conf, 'w') as f:
            f.write(CONF % dict(connections=connections, log=self.log, level=level,
                                auth=services.auth_port, timeout=timeout, extra=extra,
                                port=self.port))
        self.stderr = open(os.path.join(self.dir, 'stderr.log'), 'wb')

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.nofile = min(nofile, hard)

        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, hard))
        env = dict(os.environ, PYTHONPATH=PROXY_PATH)
        self.proc = subprocess.Popen([sys.executable, '-m', 'gmailproxy', self.conf],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=subprocess.STDOUT, preexec_fn=limit, env=env,
                                     cwd=self.dir)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError('gmailproxy did not start:\n' + self.stderr_text())
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()

    def log_text(self) -> str:
        try:
            with open(self.log, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def stderr_text(self) -> str:
        with open(os.path.join(self.dir, 'stderr.log'), errors='replace') as f:
            return f.read()


# --- a client ------------------------------------------------------------------------------

class Session:
    """One IMAP client connection: ``login()``, ``noop()``, ``close()``."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        self.file = self.sock.makefile('rb')
        self.n = 0

    def line(self) -> bytes:
        line = self.file.readline(65536)
        if not line:
            raise EOFError('closed')
        return line

    def login(self, user: bytes = b'load', password: bytes = b'secret') -> None:
        greeting = self.line()
        assert greeting.startswith(b'* OK'), greeting
        self.sock.sendall(b'a0 LOGIN ' + user + b' ' + password + b'\r\n')
        reply = self.line()
        assert reply.startswith(b'a0 OK'), reply

    def noop(self) -> None:
        self.n += 1
        tag = b'n%d' % self.n
        self.sock.sendall(tag + b' NOOP\r\n')
        reply = self.line()
        assert reply.startswith(tag + b' OK'), reply

    def logout(self) -> None:
        self.sock.sendall(b'z LOGOUT\r\n')
        while not self.line().startswith(b'z '):
            pass

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


# --- /proc samples ---------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir('/proc/%d/fd' % pid))


def cpu_seconds(pid: int) -> float:
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
