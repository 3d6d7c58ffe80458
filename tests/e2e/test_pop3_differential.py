"""Differential conformance: the same POP3 client scripts against Debian's nginx mail
proxy and gmailproxy, each with an identical auth service and backend, compared byte for
byte: what the client receives, what the auth service is sent and what the backend is
sent.

Allowed differences:
* The salt's random part and time differ between runs: every salt (and the digests a
  script computes from it) is replaced by a placeholder before comparing.
* ``auth_http_keepalive off`` is set on gmailproxy (its default keeps auth connections
  alive with HTTP/1.1); ``pop3_client_buffer`` is left at its default, nginx's fixed
  128 bytes.
* DIFFERENT lists the scripts where Debian's nginx 1.22 and the spec (nginx 1.31) or a
  deliberate gmailproxy choice differ, with both expected results spelled out.
"""
import hashlib
import hmac
import re
import socket
import time

import gevent
import pytest

from tests.support.auth import RecordingAuthServer, b64
from tests.support.backends import Nginx
from tests.support.fake_backend import FakeBackend
from tests.support.net import free_ports
from tests.support.proxyproc import GmailProxy

MAIL = '''
mail {
    auth_http %(auth)s;
    server_name mx.example;
    max_errors 3;
    %(extra)s
    server { listen 127.0.0.1:%(plain)d; protocol pop3; }
    server {
        listen 127.0.0.1:%(salted)d;
        protocol pop3;
        pop3_auth plain apop cram-md5;
        pop3_capabilities TOP USER UIDL "EXPIRE NEVER";
    }
    server {
        listen 127.0.0.1:%(external)d;
        protocol pop3;
        pop3_auth external;
    }
}
'''
SALT = re.compile(rb'<\d+\.\d+@mx\.example>')
PASS_REPLY = b'+OK maildrop locked and ready\r\n'
LOCKED_REPLY = b'-ERR [IN-USE] locked by another session\r\n'


def apop(salt: bytes) -> list:
    digest = hashlib.md5(salt + b'secret').hexdigest().encode()
    return [b'APOP alice ' + digest + b'\r\n', b'STAT\r\n', b'QUIT\r\n']


def cram_md5(salt: bytes) -> list:
    digest = hmac.new(b'secret', salt, hashlib.md5).hexdigest().encode()
    return [b'AUTH CRAM-MD5\r\n', b64(b'alice ' + digest) + b'\r\n', b'QUIT\r\n']


# Each script: (server, chunks); chunks may be a function of the greeting's salt. Every
# chunk is sent once the answers to the previous one have settled.
SCRIPTS = {
    'greeting-capa-auth-noop-quit': ('plain', [b'CAPA\r\n', b'AUTH\r\n', b'NOOP\r\n',
                                               b'QUIT\r\n']),
    'salted-capa-auth': ('salted', [b'capa\r\n', b'auth\r\n', b'QUIT\r\n']),
    'user-pass': ('plain', [b'USER alice\r\n', b'PASS secret\r\n', b'STAT\r\n',
                            b'QUIT\r\n']),
    'user-pass-pipelined': ('plain',
                            [b'USER alice\r\nPASS secret\r\nLIST\r\nQUIT\r\n']),
    'user-pass-split': ('plain', [b'US', b'ER ali', b'ce\r', b'\nPASS sec', b'ret\r\n',
                                  b'QUIT\r\n']),
    'user-pass-spaces': ('plain', [b'USER  alice \r\n', b'PASS  secret \r\n']),
    'bare-lf': ('plain', [b'USER alice\n', b'PASS secret\n', b'QUIT\n']),
    'user-state': ('salted', [b'USER alice\r\n', b'CAPA\r\n', b'NOOP\r\n',
                              b'USER bob\r\n', b'PASS secret\r\n', b'QUIT\r\n']),
    'user-quit': ('plain', [b'USER alice\r\n', b'QUIT\r\n']),
    'wrong-password': ('plain', [b'USER alice\r\n', b'PASS wrong\r\n', b'NOOP\r\n']),
    'wrong-password-wait': ('plain', [b'USER waiter\r\nPASS wrong\r\nUSER alice\r\n'
                                      b'PASS secret\r\nQUIT\r\n']),
    'invalid-commands': ('plain', [b'STAT\r\n', b'PASS x\r\n', b'NOP\r\n',
                                   b'NOOP a b c\r\n', b'QUIT\r\n']),
    'max-errors': ('plain', [b'FOO\r\n', b'\r\n', b' NOOP\r\n', b'NOOP\r\n']),
    'too-long': ('plain', [b'USER ' + b'a' * 140 + b'\r\n', b'NOOP\r\n']),
    'just-fits': ('plain', [b'USER ' + b'a' * 121 + b'\r\n', b'NOOP\r\n']),
    'apop': ('salted', apop),
    'apop-not-enabled': ('plain', [b'APOP alice 0123456789abcdef0123456789abcdef\r\n',
                                   b'QUIT\r\n']),
    'auth-plain-ir': ('plain', [b'AUTH PLAIN ' + b64(b'\0alice\0secret') + b'\r\n',
                                b'QUIT\r\n']),
    'auth-plain': ('plain', [b'AUTH PLAIN\r\n', b64(b'\0alice\0secret') + b'\r\n',
                             b'QUIT\r\n']),
    'auth-login-pipelined': ('plain', [b'AUTH LOGIN\r\n' + b64(b'alice') + b'\r\n'
                                       + b64(b'secret') + b'\r\nQUIT\r\n']),
    'auth-login-ir': ('plain', [b'AUTH LOGIN ' + b64(b'alice') + b'\r\n',
                                b64(b'secret') + b'\r\n', b'QUIT\r\n']),
    'auth-cram-md5': ('salted', cram_md5),
    'auth-external': ('external', [b'AUTH EXTERNAL\r\n', b64(b'alice') + b'\r\n',
                                   b'QUIT\r\n']),
    'auth-bad': ('salted', [b'AUTH FOO\r\n', b'AUTH PLAIN !!!\r\n',
                            b'AUTH CRAM-MD5 x\r\n', b'QUIT\r\n']),
    'auth-cancel': ('plain', [b'AUTH LOGIN\r\n', b'*\r\n', b'AUTH PLAIN\r\n',
                              b'AGFsaWNl\r\n', b'QUIT\r\n']),
    'auth-four-words': ('plain', [b'AUTH LOGIN\r\n', b'YWxpY2U= a b c\r\n',
                                  b'QUIT\r\n']),
    'stls-without-tls': ('plain', [b'STLS\r\n', b'QUIT\r\n']),
    'backend-refuses-pass': ('plain', [b'USER locked\r\n', b'PASS secret\r\n']),
    'auth-overrides': ('plain', [b'USER renamed\r\n', b'PASS secret\r\n', b'QUIT\r\n']),
}

# Seconds to wait: for the first byte of an answer, for more bytes after one, and after
# the last chunk. Scripts that wait out an Auth-Wait pause need a longer quiet time.
FIRST_BYTE, QUIET_DEFAULT, FINAL = 0.25, 0.08, 0.4
QUIET = {'wrong-password-wait': 1.5}

# Where Debian's nginx 1.22 answers differently: (reason, what nginx's client receives,
# what gmailproxy's client receives).
DIFFERENT = {
    'invalid-commands': (
        'nginx 1.22 counts only unparsable lines toward max_errors; the spec (1.31) '
        'and gmailproxy also count commands refused by their handler (PASS without '
        'USER, a wrong argument count)',
        b'+OK POP3 ready\r\n-ERR invalid command\r\n-ERR invalid command\r\n'
        b'-ERR invalid command\r\n+OK\r\n+OK\r\n',
        b'+OK POP3 ready\r\n-ERR invalid command\r\n-ERR invalid command\r\n'
        b'-ERR invalid command\r\n'),
    'auth-bad': (
        'the same: AUTH with an unknown mechanism or a refused initial response is a '
        'handler-level invalid command, not counted by nginx 1.22',
        b'+OK POP3 ready <SALT>\r\n-ERR invalid command\r\n-ERR invalid command\r\n'
        b'-ERR invalid command\r\n+OK\r\n',
        b'+OK POP3 ready <SALT>\r\n-ERR invalid command\r\n-ERR invalid command\r\n'
        b'-ERR invalid command\r\n'),
}


def exchange(port: int, chunks,
             quiet: float = QUIET_DEFAULT) -> tuple[bytes, bytes | None]:
    """Send each chunk once the answers to the previous one have settled; return
    (everything received, the greeting's salt).

    Settled: nothing arrived for FIRST_BYTE seconds, or ``quiet`` seconds passed since
    the last byte; after the last chunk, until the connection closes or FINAL quiet
    seconds.
    """
    sock = socket.create_connection(('127.0.0.1', port), timeout=5)
    received = b''

    def drain(first: float, quiet: float) -> bool:
        nonlocal received
        sock.settimeout(first)
        while True:
            try:
                data = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return True
            if not data:
                return False
            received += data
            sock.settimeout(quiet)

    try:
        open_ = drain(5.0, QUIET_DEFAULT)
        m = SALT.search(received)
        salt = m.group() if m else None
        if callable(chunks):
            chunks = chunks(salt)
        for i, chunk in enumerate(chunks if open_ else ()):
            try:
                sock.sendall(chunk)
            except OSError:
                break
            last = i == len(chunks) - 1
            if not drain(max(FIRST_BYTE, quiet) if not last else FINAL,
                         quiet if not last else max(FINAL, quiet)):
                break
    finally:
        sock.close()
    return received, salt


def normalized(data: bytes, salt: bytes | None) -> bytes:
    """The salt and anything derived from it (digests, base64) as placeholders."""
    if salt is None:
        return data
    for secret in (salt, hashlib.md5(salt + b'secret').hexdigest().encode(),
                   hmac.new(b'secret', salt, hashlib.md5).hexdigest().encode()):
        data = data.replace(secret, b'<SALT>' if secret is salt else b'<DIGEST>')
    return data.replace(b64(salt), b'<B64SALT>')


class Side:
    """One proxy under test with its own auth service and backends, so that the two
    proxies can run the same script at the same time."""

    def __init__(self, name: str):
        self.name = name
        self.backend = FakeBackend('pop3', {'PASS': PASS_REPLY})
        self.locked = FakeBackend('pop3', {'PASS': LOCKED_REPLY})
        self.auth = RecordingAuthServer(
            users={'alice': {'password': 'secret'},
                   'waiter': {'password': 'secret', 'wait': 1},
                   'locked': {'password': 'secret', 'port': self.locked.port},
                   'renamed': {'password': 'secret', 'user': 'alice@example',
                               'pass': 'other secret'}},
            ports={'pop3': self.backend.port}).start()
        self.ports = dict(zip(('plain', 'salted', 'external'), free_ports(3)))
        self.server = None

    def conf(self, extra: str = '') -> str:
        return MAIL % dict(self.ports, auth=self.auth.url, extra=extra)

    def reset(self) -> None:
        self.auth.requests.clear()
        self.backend.received = self.locked.received = b''

    def run(self, server: str, chunks, quiet: float = QUIET_DEFAULT):
        """(client received, auth requests, backend received), salts normalized."""
        client, salt = exchange(self.ports[server], chunks, quiet)
        time.sleep(0.05)        # the backend may still be reading what was forwarded
        return (normalized(client, salt),
                [normalized(r, salt) for r in self.auth.requests],
                normalized(self.backend.received + self.locked.received, salt))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.auth.stop()
        self.backend.stop()
        self.locked.stop()


@pytest.fixture(scope='module')
def both(tmp_path_factory):
    """nginx and gmailproxy, each started once for the whole module."""
    sides = {'nginx': Side('nginx'), 'gmailproxy': Side('gmailproxy')}
    try:
        n = sides['nginx']
        n.server = Nginx(n.conf()).start(list(n.ports.values()))
        g = sides['gmailproxy']
        g.server = GmailProxy('events { }\n' + g.conf('auth_http_keepalive off;'),
                              tmp_path_factory.mktemp('pop3diff'))
        g.server.start(list(g.ports.values()))
        yield sides
    finally:
        for side in sides.values():
            side.stop()


def run_both(both, server, chunks, quiet=QUIET_DEFAULT) -> dict:
    """The same script against both proxies at the same time."""
    for side in both.values():
        side.reset()
    jobs = {name: gevent.spawn(side.run, server, chunks, quiet)
            for name, side in both.items()}
    gevent.joinall(list(jobs.values()), timeout=30, raise_error=True)
    return {name: job.get(block=False) for name, job in jobs.items()}


@pytest.mark.parametrize('name', sorted(SCRIPTS))
def test_same_as_nginx(both, name):
    server, chunks = SCRIPTS[name]
    seen = run_both(both, server, chunks, QUIET.get(name, QUIET_DEFAULT))
    if name in DIFFERENT:
        reason, nginx_client, gmailproxy_client = DIFFERENT[name]
        assert seen['nginx'][0] == nginx_client, reason
        assert seen['gmailproxy'][0] == gmailproxy_client, reason
        parts = ((1, 'auth service sent'), (2, 'backend sent'))
    else:
        parts = ((0, 'client received'), (1, 'auth service sent'), (2, 'backend sent'))
    for part, label in parts:
        assert seen['gmailproxy'][part] == seen['nginx'][part], (
            label, both['gmailproxy'].server.log_text()[-2000:])


def test_nginx_accepts_external_initial_response_when_not_enabled(both):
    """nginx (1.22 and, by its source, 1.31) checks ``external`` in pop3_auth only
    when AUTH EXTERNAL has no initial response; the spec, and gmailproxy, refuse both
    forms."""
    seen = run_both(both, 'plain', [b'AUTH EXTERNAL ' + b64(b'alice') + b'\r\n'])
    assert seen['nginx'][0] == b'+OK POP3 ready\r\n+OK maildrop locked and ready\r\n'
    assert seen['gmailproxy'][0] == b'+OK POP3 ready\r\n-ERR invalid command\r\n'
    assert seen['gmailproxy'][1:] == ([], b'')


def test_pipelining_beyond_the_buffer(both):
    """nginx never compacts its 128-byte buffer, so pipelined commands straddling its
    end are "too long" (common.md 1); gmailproxy compacts, as the spec recommends, and
    answers every command."""
    seen = run_both(both, 'plain', [b'NOOP\r\n' * 30])
    nginx_client, gmailproxy_client = seen['nginx'][0], seen['gmailproxy'][0]
    assert nginx_client.startswith(b'+OK POP3 ready\r\n+OK\r\n')
    assert nginx_client.count(b'+OK\r\n') < 30
    assert gmailproxy_client == b'+OK POP3 ready\r\n' + b'+OK\r\n' * 30
