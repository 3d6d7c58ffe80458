"""POP3 end to end: real clients -> gmailproxy (subprocess) -> real Dovecot."""
import hashlib
import re
import shutil
import subprocess

import pytest

from tests.support.clients import pop3, pop3_auth_plain_bob, pop3_wrong_password_refused
from tests.support.net import Client

CONF = '''
events { }
mail {
    auth_http %(auth)s;
    server_name mx.test.example;
    server {
        listen 127.0.0.1:%(port)d;
        protocol pop3;
        pop3_auth plain apop;
    }
}
'''


@pytest.fixture
def pop3_proxy(proxy_to, dovecot):
    return proxy_to(CONF, 'pop3', dovecot.pop3_port)


def message(size: int, subject: str) -> bytes:
    """A message of about ``size`` bytes with CRLF line ends; some lines start with '.'
    so that the POP3 byte-stuffing is exercised."""
    head = ('From: alice@test.example\r\nTo: alice@test.example\r\nSubject: %s\r\n\r\n'
            % subject).encode()
    line = bytes(range(33, 33 + 76)) + b'\r\n'
    dotted = b'.' + bytes(range(48, 48 + 40)) + b'\r\n'
    block = line * 9 + dotted
    body = (block * (size // len(block) + 1))[:size]
    return head + body[:body.rindex(b'\r\n')] + b'\r\n'


def retrieved(lines) -> bytes:
    """poplib's RETR lines (dot-unstuffed, line ends stripped) back as message bytes."""
    return b''.join(line + b'\r\n' for line in lines)


def stored(dovecot, user: str) -> list:
    return sorted(p.name for d in ('new', 'cur')
                  for p in (dovecot.maildir(user) / d).iterdir())


def test_poplib_user_pass_list_retr(pop3_proxy, dovecot, auth):
    msg = message(3000, 'hello')
    dovecot.deliver('alice', msg)
    p = pop3(pop3_proxy.port)
    try:
        assert p.getwelcome().startswith(b'+OK POP3 ready <')
        assert p.user('alice') == b'+OK'
        assert p.pass_('secret').startswith(b'+OK')
        assert p.stat() == (1, len(msg))
        assert p.list()[1] == [b'1 %d' % len(msg)]
        resp, lines, octets = p.retr(1)
        assert retrieved(lines) == msg
    finally:
        assert p.quit().startswith(b'+OK')
    assert auth.parsed[0].get('Auth-Method') == 'plain'
    assert b'Auth-User: alice\r\nAuth-Pass: secret\r\n' in auth.requests[0]
    pop3_proxy.wait_log('proxied session done')
    log = pop3_proxy.log_text()
    assert ('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, '
            'login: "alice", upstream: 127.0.0.1:%d'
            % (pop3_proxy.port, dovecot.pop3_port)) in log
    assert 'secret' not in log


def test_poplib_apop(pop3_proxy, dovecot, auth):
    dovecot.deliver('bob', message(500, 'apop'))
    p = pop3(pop3_proxy.port)
    try:
        salt = re.search(rb'<\d+\.\d+@mx\.test\.example>', p.getwelcome()).group()
        assert p.apop('bob', 'hunter2').startswith(b'+OK')
        assert p.stat()[0] == 1
    finally:
        p.quit()
    req = auth.parsed[0]
    assert req.get('Auth-Method') == 'apop'
    assert req.get('Auth-Salt') == salt.decode()
    assert req.get('Auth-Pass') == hashlib.md5(salt + b'hunter2').hexdigest()
    assert b'Auth-Status: OK\r\n' in auth.responses[0]
    assert b'Auth-Pass: hunter2\r\n' in auth.responses[0]      # plaintext for Dovecot


def test_poplib_auth_plain(pop3_proxy, dovecot, auth):
    pop3_auth_plain_bob(pop3_proxy.port)
    assert b'Auth-Method: plain\r\nAuth-User: bob\r\nAuth-Pass: hunter2\r\n' in \
        auth.requests[0]


def test_wrong_password_is_refused(pop3_proxy, auth):
    pop3_wrong_password_refused(pop3_proxy.port).close()


def test_10mb_message_byte_identical(pop3_proxy, dovecot):
    msg = message(10 * 1024 * 1024, 'big')
    dovecot.deliver('alice', msg)
    with Client('127.0.0.1', pop3_proxy.port, timeout=30) as c:
        c.expect(b'+OK POP3 ready <')
        c.send(b'USER alice\r\nPASS secret\r\nRETR 1\r\n')
        c.expect(b'+OK\r\n')
        c.expect(b'+OK')                                # Dovecot's "Logged in."
        c.expect(b'+OK %d octets\r\n' % len(msg))
        raw = c.read_until(b'\r\n.\r\n', timeout=30)
        c.send(b'QUIT\r\n')
        c.expect(b'+OK')
    stuffed = msg.replace(b'\r\n.', b'\r\n..')
    assert raw == stuffed + b'.\r\n'


def test_dele_quit_deletes_in_dovecot(pop3_proxy, dovecot):
    first, second = message(800, 'first'), message(900, 'second')
    dovecot.deliver('bob', first)
    dovecot.deliver('bob', second)
    assert len(stored(dovecot, 'bob')) == 2
    p = pop3(pop3_proxy.port)
    p.user('bob')
    p.pass_('hunter2')
    assert p.stat() == (2, len(first) + len(second))
    assert p.dele(1).startswith(b'+OK')
    assert p.quit().startswith(b'+OK')
    assert len(stored(dovecot, 'bob')) == 1
    p = pop3(pop3_proxy.port)
    p.user('bob')
    p.pass_('hunter2')
    assert p.stat() == (1, len(second))
    assert retrieved(p.retr(1)[1]) == second
    p.quit()


def test_pipelined_user_pass_stat_quit(pop3_proxy, dovecot):
    with Client('127.0.0.1', pop3_proxy.port) as c:
        c.expect(b'+OK POP3 ready <')
        c.send(b'USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n')
        got = c.recv_all_until_close(timeout=10)
    assert got.startswith(b'+OK\r\n+OK ')
    assert got.endswith(b'+OK 0 0\r\n+OK Logging out.\r\n')


@pytest.mark.skipif(shutil.which('curl') is None, reason='curl is not installed')
def test_curl_list_and_retrieve(pop3_proxy, dovecot, auth):
    msg = message(2000, 'for curl')
    dovecot.deliver('alice', msg)
    url = 'pop3://127.0.0.1:%d/' % pop3_proxy.port
    out = subprocess.run(['curl', '-sS', '--max-time', '10', '-u', 'alice:secret', url],
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b'1 %d\r\n' % len(msg)
    out = subprocess.run(['curl', '-sS', '--max-time', '10', '-u', 'alice:secret',
                          url + '1'], capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == msg
    assert all(r.get('Auth-User') == 'alice' for r in auth.parsed)
