"""The access log (issue 12 item 5): one line per session with the right bytes, in the
default text format, a custom one and JSON; reopened like the error log."""
import base64
import json
import os
import re
import signal

import gevent
import pytest

from gmailproxy import accesslog
from tests.support.net import Client, free_port
from tests.support.proxyproc import GmailProxy

TIMEOUT = 5.0
CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    server_name mx.example.com;
    imap_id off;
    %s
    server { listen 127.0.0.1:{port}; protocol imap; }
    server { listen 127.0.0.1:{port2}; protocol pop3; }
    server { listen 127.0.0.1:{port3}; protocol smtp; %s }
}
'''


pytestmark = pytest.mark.usefixtures('clean_limits')


def lines(path, n: int) -> list[str]:
    """The file's lines once it has ``n`` of them."""
    with gevent.Timeout(TIMEOUT, AssertionError('no %d lines in %s' % (n, path))):
        while True:
            text = path.read_text() if path.exists() else ''
            if text.count('\n') >= n:
                return text.splitlines()
            gevent.sleep(0.02)


def imap_session(proxy):
    """Login, NOOP, LOGOUT: 20 bytes from the client, 41 to it through the pump."""
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 OK logged in\r\n')
    c.send(b'a2 NOOP\r\n')
    c.expect(b'a2 OK done\r\n')
    c.send(b'a3 LOGOUT\r\n')
    c.expect(b'* BYE bye\r\na3 OK logged out\r\n')
    assert c.closed()


def imap_failure(proxy, login=b'alice'):
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN ' + login + b' wrong\r\n')
    c.expect(b'a1 NO Invalid login or password\r\n')
    assert c.closed()


def pop3_session(proxy, retr: bytes):
    c = proxy.client(proxy.ports[1], greeting=b'+OK POP3 ready\r\n')
    c.send(b'USER alice\r\nPASS secret\r\n')
    c.expect(b'+OK\r\n+OK\r\n')
    c.send(retr)
    c.expect(b'+OK\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'+OK bye\r\n')
    assert c.closed()


def smtp_session(proxy):
    c = proxy.client(proxy.ports[2], greeting=b'220 mx.example.com ESMTP ready\r\n')
    c.send(b'EHLO client.example\r\n')
    c.read_lines_until(b'250 ')
    c.send(b'AUTH PLAIN ' + base64.b64encode(b'\0alice\0secret') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    c.send(b'MAIL FROM:<alice@example.com>\r\n')
    c.expect(b'250 2.1.0 Ok\r\n')
    c.send(b'QUIT\r\n')
    c.expect(b'221 2.0.0 bye\r\n')
    assert c.closed()


TEXT = re.compile(r'127\.0\.0\.1 '
                  r'\[(\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
                  r'(\w+) (127\.0\.0\.1:\d+) "([^"]*)" (\S+) (\w+) (\d+\.\d{3}) '
                  r'(\d+) (\d+)\Z')


def test_text_lines_one_per_session_with_bytes(mailproxy, backends, tmp_path):
    path = tmp_path / 'access.log'
    proxy = mailproxy(CONF % ('access_log %s;' % path, ''))
    imap_session(proxy)
    imap_failure(proxy, login=b'al"ice')
    c = proxy.client()                  # closed before logging in
    c.expect(b'* OK IMAP4 ready\r\n')
    c.close()
    got = [TEXT.match(line).groups() for line in lines(path, 3)]
    backend = '127.0.0.1:%d' % backends['imap'].port
    server = '127.0.0.1:%d' % proxy.ports[0]
    assert [g[1:6] + g[7:] for g in got] == [
        ('imap', server, 'alice', backend, 'ok', str(len(b'a2 NOOP\r\na3 LOGOUT\r\n')),
         str(len(b'a2 OK done\r\n* BYE bye\r\na3 OK logged out\r\n'))),
        ('imap', server, 'al\\x22ice', '-', 'auth_failed', '0', '0'),
        ('imap', server, '-', '-', 'closed', '0', '0'),
    ]
    assert all(0 <= float(g[6]) < TIMEOUT for g in got)
    assert 'secret' not in path.read_text() and 'wrong' not in path.read_text()


def test_json_lines_for_pop3_and_smtp(mailproxy, backends, tmp_path):
    path = tmp_path / 'access.json'
    proxy = mailproxy(CONF % ('access_log %s format=json;' % path, ''))
    retr = b'RETR 1 with a longer line to count\r\n'
    pop3_session(proxy, retr)
    smtp_session(proxy)
    first, second = [json.loads(line) for line in lines(path, 2)]
    assert {k: first[k] for k in ('client', 'server', 'protocol', 'login', 'backend',
                                  'outcome', 'bytes_from_client', 'bytes_to_client',
                                  'tls')} == {
        'client': '127.0.0.1', 'server': '127.0.0.1:%d' % proxy.ports[1],
        'protocol': 'pop3', 'login': 'alice',
        'backend': '127.0.0.1:%d' % backends['pop3'].port, 'outcome': 'ok',
        'bytes_from_client': len(retr + b'QUIT\r\n'),
        'bytes_to_client': len(b'+OK\r\n+OK bye\r\n'), 'tls': None}
    assert (second['protocol'], second['login'], second['outcome']) == (
        'smtp', 'alice', 'ok')
    assert second['bytes_from_client'] == len(
        b'MAIL FROM:<alice@example.com>\r\nQUIT\r\n')
    assert second['bytes_to_client'] == len(b'250 2.1.0 Ok\r\n221 2.0.0 bye\r\n')
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d', first['time'])
    assert second['connection'] > first['connection']
    assert 0 <= first['duration'] < TIMEOUT


def test_server_level_format_and_off(mailproxy, backends, tmp_path):
    path = tmp_path / 'custom.log'
    proxy = mailproxy(CONF % (
        "access_log %s; access_log_format '*$connection $protocol $login $outcome "
        "$bytes_from_client/$bytes_to_client';" % path, 'access_log off;'))
    imap_session(proxy)
    pop3_session(proxy, b'STAT\r\n')
    smtp_session(proxy)                 # this server has no access log
    got = lines(path, 2)
    gevent.sleep(0.2)
    assert len(path.read_text().splitlines()) == 2
    assert re.fullmatch(r'\*\d+ imap alice ok 20/41', got[0])
    assert re.fullmatch(r'\*\d+ pop3 alice ok 12/14', got[1])


def test_reopen_after_rotation(mailproxy, backends, tmp_path):
    path = tmp_path / 'access.log'
    proxy = mailproxy(CONF % ('access_log %s;' % path, ''))
    imap_failure(proxy)
    lines(path, 1)
    os.rename(path, tmp_path / 'access.log.1')
    imap_failure(proxy)
    assert len(lines(tmp_path / 'access.log.1', 2)) == 2    # still the old file
    accesslog.reopen()                                       # USR1
    imap_failure(proxy)
    assert len(lines(path, 1)) == 1
    assert 'auth_failed' in path.read_text()


def test_workers_share_the_file_and_reopen_on_usr1(backends, auth, tmp_path):
    """worker_processes 2: lines from both workers in one file (opened by the master);
    USR1 makes the master and each worker reopen it after a rotation."""
    port = free_port()
    path = tmp_path / 'access.log'
    proxy = GmailProxy('''
worker_processes 2;
events { }
mail {
    auth_http %s;
    auth_http_keepalive off;
    access_log %s format=json;
    server { listen 127.0.0.1:%d; protocol imap; }
}
''' % (auth.url, path, port), tmp_path / 'proxy').start(ports=[port])
    try:
        lines(path, 1)                  # start() probed the port: one "closed" line
        for _ in range(4):
            c = Client('127.0.0.1', port, timeout=TIMEOUT)
            c.expect(b'* OK IMAP4 ready\r\n')
            c.send(b'a1 LOGIN alice secret\r\na2 NOOP\r\n')
            c.expect(b'a1 OK logged in\r\na2 OK done\r\n')
            c.close()
        records = [json.loads(line) for line in lines(path, 5)]
        assert [r['outcome'] for r in records] == ['closed'] + ['ok'] * 4
        assert {r['bytes_from_client'] for r in records[1:]} == {len(b'a2 NOOP\r\n')}
        assert {r['bytes_to_client'] for r in records[1:]} == {len(b'a2 OK done\r\n')}
        os.rename(path, tmp_path / 'access.log.1')
        proxy.signal(signal.SIGUSR1)
        with gevent.Timeout(TIMEOUT, AssertionError(proxy.log_text())):
            while proxy.log_text().count('reopening logs') < 3:     # master + 2 workers
                gevent.sleep(0.02)
        for _ in range(4):
            c = Client('127.0.0.1', port, timeout=TIMEOUT)
            c.expect(b'* OK IMAP4 ready\r\n')
            c.send(b'a1 LOGOUT\r\n')
            c.expect(b'* BYE\r\na1 OK completed\r\n')
            c.close()
        assert [json.loads(line)['outcome'] for line in lines(path, 4)] == ['quit'] * 4
        assert len((tmp_path / 'access.log.1').read_text().splitlines()) == 5
    finally:
        proxy.stop()
