"""IMAP end to end: real clients -> gmailproxy (subprocess) -> real Dovecot."""
import imaplib
import os
import shutil
import threading
import time

import pytest

from tests.support.clients import (curl_imap_list_fetch, imap_authenticate_plain_bob,
                                   imap_wrong_password_refused)

CONF = '''
events { }
mail {
    auth_http %(auth)s;
    server_name mx.test.example;
    server {
        listen 127.0.0.1:%(port)d;
        protocol imap;
    }
}
'''


@pytest.fixture
def imap_proxy(proxy_to, dovecot):
    return proxy_to(CONF, 'imap', dovecot.imap_port)


def message(size: int, subject: str = 'big') -> bytes:
    """A message of about ``size`` bytes with varied content and CRLF line ends."""
    head = ('From: alice@test.example\r\nTo: alice@test.example\r\nSubject: %s\r\n\r\n'
            % subject).encode()
    line = bytes(range(33, 33 + 76)) + b'\r\n'
    body = (line * (size // len(line) + 1))[:size]
    return head + body[:len(body) - 2] + b'\r\n'


def test_imaplib_login_select_append_fetch_10mb(imap_proxy, dovecot):
    msg = message(10 * 1024 * 1024)
    with imaplib.IMAP4('127.0.0.1', imap_proxy.port, timeout=30) as imap:
        assert imap.login('alice', 'secret')[0] == 'OK'
        typ, data = imap.select('INBOX')
        assert typ == 'OK' and data == [b'0']
        typ, data = imap.append('INBOX', None, None, msg)
        assert typ == 'OK', data
        typ, data = imap.fetch('1', '(BODY.PEEK[])')
        assert typ == 'OK'
        assert data[0][1] == msg
    stored = [p.read_bytes() for d in ('new', 'cur')
              for p in (dovecot.maildir('alice') / d).iterdir()]
    assert stored == [msg.replace(b'\r\n', b'\n')]     # Maildir keeps LF line ends
    imap_proxy.wait_log('proxied session done')
    log = imap_proxy.log_text()
    assert 'client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, login: "alice", ' \
        'upstream: 127.0.0.1:%d' % (imap_proxy.port, dovecot.imap_port) in log
    assert 'secret' not in log


def test_imaplib_authenticate_plain(imap_proxy, dovecot, auth):
    dovecot.deliver('bob', message(1000, 'hello bob'))
    imap_authenticate_plain_bob(imap_proxy.port)
    assert b'Auth-Method: plain\r\nAuth-User: bob\r\nAuth-Pass: hunter2\r\n' in auth.requests[0]


def test_wrong_password_is_refused(imap_proxy):
    # no Auth-Wait: the proxy closes the connection after the NO
    imap_wrong_password_refused(imap_proxy.port)


def test_idle_woken_by_delivery(imap_proxy, dovecot):
    with imaplib.IMAP4('127.0.0.1', imap_proxy.port, timeout=10) as imap:
        imap.login('alice', 'secret')
        imap.select('INBOX')
        tag = imap._new_tag()
        imap.send(tag + b' IDLE\r\n')
        assert imap.readline().startswith(b'+ ')
        timer = threading.Timer(0.3, dovecot.deliver, ('alice', message(500, 'wake up')))
        timer.start()
        began = time.monotonic()
        line = imap.readline()
        assert line == b'* 1 EXISTS\r\n', line
        assert time.monotonic() - began < 5
        imap.send(b'DONE\r\n')
        while not line.startswith(tag):
            line = imap.readline()
        assert line.startswith(tag + b' OK')
        timer.join()


@pytest.mark.skipif(shutil.which('curl') is None, reason='curl is not installed')
def test_curl_login_list_fetch(imap_proxy, dovecot):
    dovecot.deliver('alice', message(2000, 'for curl'))
    fetched = curl_imap_list_fetch(imap_proxy.port)
    assert fetched.endswith(message(2000, 'for curl')[-100:])


def test_pipelined_commands_after_login_reach_backend(imap_proxy, dovecot):
    from tests.support.net import Client
    with Client('127.0.0.1', imap_proxy.port) as c:
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN alice secret\r\na2 SELECT INBOX\r\na3 LOGOUT\r\n')
        got = c.recv_all_until_close(timeout=10)
    assert b'a1 OK' in got
    assert got.index(b'a1 OK') < got.index(b'a2 OK') < got.index(b'a3 OK')
    assert b'* BYE' in got
    assert os.path.exists(dovecot.maildir('alice'))
