"""IMAP failure paths: each ends with the right line, the right log message, no leaks."""
import re
import socket

import gevent
import pytest

from tests.support.faults import no_leaks, scripted  # noqa: F401 (fixtures)
from tests.support.net import free_port

CONF = '''
mail {
    error_log {log} info;
    auth_http %s;
    auth_http_keepalive off;
    auth_http_timeout 1s;
    timeout 1s;
    server { listen 127.0.0.1:{port}; protocol imap; }
}
'''
INTERNAL = b'* BAD internal server error\r\n'


def login(proxy, expected: bytes, leaks=None):
    if leaks is not None:
        leaks.mark()
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(expected, timeout=5)
    assert c.closed(timeout=3)
    c.close()
    if leaks is not None:
        leaks.check()


def test_auth_service_down(mailproxy, no_leaks):
    port = free_port()
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % port))
    login(proxy, INTERNAL, no_leaks)
    proxy.wait_log(r'\[error\] .*connect\(\) to 127\.0\.0\.1:%d failed \(111: Connection '
                   r'refused\) while in http auth state, client: 127\.0\.0\.1, server: '
                   r'127\.0\.0\.1:\d+, login: "alice"' % port)


def test_auth_service_slow(mailproxy, scripted, no_leaks):
    slow = scripted(lambda sock: gevent.sleep(3))
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % slow.port))
    login(proxy, INTERNAL, no_leaks)
    proxy.wait_log(r'\[error\] .*auth http server 127\.0\.0\.1:%d timed out \(110: Connection '
                   r'timed out\) while in http auth state' % slow.port)


@pytest.mark.parametrize('answer, message', [
    (b'garbage\r\n\r\n', 'sent invalid response'),
    (b'HTTP/1.0 200 OK\r\nAuth_Status: OK\r\n\r\n', 'sent invalid header in response'),
    (b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n', 'did not send server or port'),
    (b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: backend.example\r\n'
     b'Auth-Port: 143\r\n\r\n', 'sent invalid server address:"backend.example"'),
    (b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
     b'Auth-Port: 99999\r\n\r\n', 'sent invalid server port:"99999"'),
    (b'HTTP/1.0 200 OK\r\nX-Long: ' + b'x' * 2000 + b'\r\n\r\n', 'sent too large response'),
    (b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n', 'sent invalid response'),
])
def test_auth_service_bad_answers(mailproxy, scripted, no_leaks, answer, message):
    def answer_once(sock):
        sock.recv(4096)
        sock.sendall(answer)
        sock.close()
    bad = scripted(answer_once)
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % bad.port))
    login(proxy, INTERNAL, no_leaks)
    proxy.wait_log(r'\[error\] .*auth http server 127\.0\.0\.1:%d %s while in http auth state'
                   % (bad.port, re.escape(message)))


def auth_ok(port):
    def answer(sock):
        sock.recv(4096)
        sock.sendall(b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
                     b'Auth-Port: %d\r\n\r\n' % port)
        sock.close()
    return answer


def test_backend_refusing(mailproxy, scripted, no_leaks):
    port = free_port()
    auth = scripted(auth_ok(port))
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % auth.port))
    login(proxy, INTERNAL, no_leaks)
    proxy.wait_log(r'\[error\] .*connect\(\) to 127\.0\.0\.1:%d failed \(111: Connection '
                   r'refused\) while connecting to upstream, client: 127\.0\.0\.1, server: '
                   r'127\.0\.0\.1:\d+, login: "alice", upstream: 127\.0\.0\.1:%d'
                   % (port, port))


def test_backend_silent(mailproxy, scripted, no_leaks):
    silent = scripted(lambda sock: gevent.sleep(3))
    auth = scripted(auth_ok(silent.port))
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % auth.port))
    login(proxy, INTERNAL, no_leaks)
    proxy.wait_log(r'\[info\] .*upstream timed out \(110: Connection timed out\) while '
                   r'reading response from upstream')


@pytest.mark.parametrize('script, message', [
    ([b'* OK hi\r\n', None], 'while reading response from upstream'),
    ([b'* OK hi\r\n', b'+ OK\r\n', None], 'while reading response from upstream'),
    ([b'-ERR nope\r\n'], 'upstream sent invalid response: "-ERR nope"'),
    ([b'* OK hi\r\n', b'+ OK\r\n', b'+ OK\r\n', b'a1 NO [AUTHENTICATIONFAILED] no\r\n'],
     'upstream sent invalid response: "a1 NO [AUTHENTICATIONFAILED] no"'),
])
def test_backend_failing_during_login(mailproxy, scripted, no_leaks, script, message):
    def run(sock):
        f = sock.makefile('rb')
        for i, step in enumerate(script):
            if i:
                f.readline()
            if step is None:
                break
            sock.sendall(step)
        gevent.sleep(0.1)
        sock.close()
    backend = scripted(run)
    auth = scripted(auth_ok(backend.port))
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % auth.port))
    login(proxy, INTERNAL, no_leaks)
    proxy.wait_log(re.escape(message))


def test_proxy_pass_error_message(mailproxy, scripted, no_leaks):
    def run(sock):
        f = sock.makefile('rb')
        sock.sendall(b'* OK hi\r\n')
        for reply in (b'+ OK\r\n', b'+ OK\r\n', b'a1 NO [AUTHENTICATIONFAILED] bad\r\n'):
            f.readline()
            sock.sendall(reply)
        gevent.sleep(0.1)
    backend = scripted(run)
    auth = scripted(auth_ok(backend.port))
    proxy = mailproxy(CONF.replace('    timeout 1s;', '    timeout 1s; proxy_pass_error_message on;')
                      % ('http://127.0.0.1:%d/auth' % auth.port))
    login(proxy, b'a1 NO [AUTHENTICATIONFAILED] bad\r\n', no_leaks)
    proxy.wait_log(r'\[info\] .*upstream sent invalid response: "a1 NO \[AUTHENTICATIONFAILED\] '
                   r'bad" while reading response from upstream')


def test_client_timeout_in_auth_state(mailproxy, scripted, no_leaks):
    auth = scripted(auth_ok(1))
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % auth.port))
    no_leaks.mark()
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    assert c.closed(timeout=3)
    c.close()
    proxy.wait_log(r'\[info\] .*client timed out \(110: Connection timed out\) while in auth '
                   r'state, client: 127\.0\.0\.1, server: 127\.0\.0\.1:\d+$')


def test_client_reset_mid_login(mailproxy, scripted, no_leaks):
    auth = scripted(lambda sock: gevent.sleep(0.5))
    proxy = mailproxy(CONF % ('http://127.0.0.1:%d/auth' % auth.port))
    no_leaks.mark()
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    c.close()
    gevent.sleep(0.7)
    no_leaks.check()
