"""The test fixtures themselves, without gmailproxy: real Dovecot, Postfix (XCLIENT),
Debian's nginx mail proxy against the recording auth server, haproxy, and
tools/auth_service.py.

The nginx tests also pin down what the reference implementation (Debian 12's nginx
1.22.1) actually sends to auth_http, byte for byte.
"""
import base64
import hashlib
import hmac
import imaplib
import os
import poplib
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.auth import RecordingAuthServer, cram_md5_digest
from tests.support.backends import nginx_version
from tests.support.net import Client, free_port, free_ports, insecure_context, wait_port

ROOT = Path(__file__).resolve().parents[2]
T = 5  # seconds: timeout for every client step

MESSAGE = (b'From: carol@example.org\r\nTo: alice@test.example\r\n'
           b'Subject: fixture test\r\n\r\nHello from the fixture test.\r\n')


# --------------------------------------------------------------------------- Dovecot

def test_dovecot_imap_login_select_append_fetch(dovecot):
    dovecot.deliver('alice', MESSAGE)
    imap = imaplib.IMAP4('127.0.0.1', dovecot.imap_port, timeout=T)
    try:
        assert imap.login('alice', 'secret')[0] == 'OK'
        typ, data = imap.select('INBOX')
        assert (typ, data) == ('OK', [b'1'])
        typ, _ = imap.append('INBOX', None, None, b'Subject: appended\r\n\r\nbody\r\n')
        assert typ == 'OK'
        typ, data = imap.select('INBOX')
        assert data == [b'2']
        typ, data = imap.fetch('1', '(BODY.PEEK[])')
        assert typ == 'OK' and data[0][1] == MESSAGE
        typ, data = imap.fetch('2', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
        assert data[0][1].strip() == b'Subject: appended'
    finally:
        imap.logout()
    # on disk: LF line ends
    assert dovecot.messages('alice') == [MESSAGE, b'Subject: appended\n\nbody\n']
    assert 'Login: user=<alice>' in dovecot.log_text()


def test_dovecot_rejects_bad_password(dovecot):
    imap = imaplib.IMAP4('127.0.0.1', dovecot.imap_port, timeout=T)
    with pytest.raises(imaplib.IMAP4.error, match='AUTHENTICATIONFAILED'):
        imap.login('alice', 'wrong')
    imap.shutdown()


def test_dovecot_pop3_login_stat(dovecot):
    dovecot.deliver('bob', MESSAGE)
    dovecot.deliver('bob', MESSAGE)
    pop = poplib.POP3('127.0.0.1', dovecot.pop3_port, timeout=T)
    try:
        assert pop.getwelcome().startswith(b'+OK')
        pop.user('bob')
        assert pop.pass_('hunter2').startswith(b'+OK')
        assert pop.stat() == (2, 2 * len(MESSAGE))
        assert b'\r\n'.join(pop.retr(1)[1]) + b'\r\n' == MESSAGE
    finally:
        pop.quit()


def test_dovecot_tls_and_haproxy_listeners(make_dovecot, cert):
    dovecot = make_dovecot(ssl_cert=cert[0], ssl_key=cert[1], haproxy=True)
    imap = imaplib.IMAP4_SSL('127.0.0.1', dovecot.imaps_port, timeout=T,
                             ssl_context=insecure_context())
    assert imap.login('alice', 'secret')[0] == 'OK'
    imap.logout()
    # a PROXY v1 header on the haproxy listener sets the client address Dovecot sees
    with Client('127.0.0.1', dovecot.imap_haproxy_port, timeout=T) as c:
        c.send(b'PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n')
        c.expect(b'* OK')
        c.send(b'a LOGIN alice secret\r\n')
        c.read_lines_until(b'a OK')
        c.send(b'b LOGOUT\r\n')
        c.read_lines_until(b'b OK')
    assert 'user=<alice>, method=PLAIN, rip=192.0.2.7' in dovecot.log_text()


# --------------------------------------------------------------------------- Postfix

def test_postfix_delivers_and_rejects_unknown(postfix):
    with smtplib.SMTP('127.0.0.1', postfix.port, timeout=T) as smtp:
        smtp.ehlo('proxy.example')
        assert smtp.sendmail('carol@example.org', ['bob@test.example'], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            smtp.sendmail('carol@example.org', ['nobody@test.example'], MESSAGE)
        code, text = e.value.recipients['nobody@test.example']
        assert code == 550 and b'User unknown' in text
    (msg,) = postfix.wait_messages('bob', 1)
    # Maildir files have LF line endings
    assert b'Subject: fixture test\n' in msg
    assert b'Received: from proxy.example (localhost [127.0.0.1])' in msg
    assert postfix.messages('alice') == []


def test_postfix_xclient(postfix):
    with Client('127.0.0.1', postfix.port, timeout=T) as c:
        c.expect(b'220 mx.test.example ESMTP')
        c.send(b'EHLO proxy.example\r\n')
        caps = c.read_lines_until(b'250 ')
        assert b'250-XCLIENT NAME ADDR' in caps
        c.send(b'XCLIENT ADDR=192.0.2.7 NAME=client.example\r\n')
        c.expect(b'220 ')
        c.send(b'EHLO client-helo.example\r\n')
        c.read_lines_until(b'250 ')
        c.send(b'MAIL FROM:<carol@example.org>\r\n')
        c.expect(b'250 2.1.0 Ok\r\n')
        c.send(b'RCPT TO:<alice@test.example>\r\n')
        c.expect(b'250 2.1.5 Ok\r\n')
        c.send(b'DATA\r\n')
        c.expect(b'354 ')
        c.send(MESSAGE + b'.\r\n')
        c.expect(b'250 2.0.0 Ok: queued as ')
        c.send(b'QUIT\r\n')
        c.expect(b'221 2.0.0 Bye\r\n')
        assert c.closed(T)
    (msg,) = postfix.wait_messages('alice', 1)
    assert b'Received: from client-helo.example (client.example [192.0.2.7])' in msg
    assert 'client=client.example[192.0.2.7]' in postfix.log_text()


# ----------------------------------------------------------------- nginx (reference)

NGINX_MAIL = """\
mail {
    server_name mail.example.com;
    auth_http %(auth)s;
    server {
        listen 127.0.0.1:%(imap)d;
        protocol imap;
        imap_auth plain login cram-md5;
    }
    server {
        listen 127.0.0.1:%(pop3)d;
        protocol pop3;
        pop3_auth plain apop;
    }
    server {
        listen 127.0.0.1:%(smtp)d;
        protocol smtp;
        smtp_auth none;
        xclient on;
    }
}
"""


@pytest.fixture
def reference(dovecot, postfix, auth, nginx):
    """Debian's nginx → RecordingAuthServer → Dovecot/Postfix: (nginx, ports)."""
    auth.users = {'alice': {'password': 'secret'}, 'te"st': {'password': 'p a%ss'}}
    auth.ports = {'imap': dovecot.imap_port, 'pop3': dovecot.pop3_port,
                  'smtp': postfix.port}
    auth.relay = lambda req: True
    ports = dict(zip(('imap', 'pop3', 'smtp'), free_ports(3)))
    n = nginx(NGINX_MAIL % dict(auth=auth.url, **ports), ports.values())
    return n, ports


def test_nginx_version():
    # the expectations below were observed with Debian 12's 1.22.1 and hold for later
    # versions (they match the 1.31 source the spec was written from)
    version = tuple(int(x) for x in nginx_version().split('.'))
    assert version >= (1, 22, 0)


def test_nginx_imap_login_auth_request_bytes(reference, auth, dovecot):
    n, ports = reference
    dovecot.deliver('alice', MESSAGE)
    imap = imaplib.IMAP4('127.0.0.1', ports['imap'], timeout=T)
    assert imap.login('alice', 'secret')[0] == 'OK'
    assert imap.select('INBOX')[1] == [b'1']
    assert imap.fetch('1', '(BODY.PEEK[])')[1][0][1] == MESSAGE
    imap.logout()
    assert auth.wait_requests(1) == [
        b'GET /auth HTTP/1.0\r\n'
        b'Host: 127.0.0.1\r\n'
        b'Auth-Method: plain\r\n'
        b'Auth-User: alice\r\n'
        b'Auth-Pass: secret\r\n'
        b'Auth-Protocol: imap\r\n'
        b'Auth-Login-Attempt: 1\r\n'
        b'Client-IP: 127.0.0.1\r\n'
        b'\r\n']
    assert auth.connections == 1
    log = n.error_log_text()
    assert ('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, '
            'login: "alice", upstream: 127.0.0.1:%d'
            % (ports['imap'], dovecot.imap_port)) in log


def test_nginx_escaping_and_failure(reference, auth):
    n, ports = reference
    # a wrong password: space and % are escaped, '"' is not; the tag gets Auth-Status
    with Client('127.0.0.1', ports['imap'], timeout=T) as c:
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN "te\\"st" "p a%s"\r\n')
        c.expect(b'a1 NO Invalid login or password\r\n')
        assert c.closed(T)
    assert auth.wait_requests(1)[0] == (
        b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n'
        b'Auth-User: te"st\r\nAuth-Pass: p%20a%25s\r\nAuth-Protocol: imap\r\n'
        b'Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n\r\n')
    assert 'client login failed: "Invalid login or password" while in http auth state' \
        in n.error_log_text()


def test_nginx_cram_md5_and_apop_send_salt(reference, auth):
    n, ports = reference
    imap = imaplib.IMAP4('127.0.0.1', ports['imap'], timeout=T)
    assert imap.login_cram_md5('alice', 'secret')[0] == 'OK'
    imap.logout()
    pop = poplib.POP3('127.0.0.1', ports['pop3'], timeout=T)
    salt = pop.getwelcome().split()[-1].decode()
    assert pop.apop('alice', 'secret').startswith(b'+OK')
    pop.quit()
    cram, apop = auth.wait_requests(2)
    req = auth.parsed[0]
    assert req.get('Auth-Method') == 'cram-md5'
    assert req.get('Auth-Pass') == cram_md5_digest('secret', req.get('Auth-Salt'))
    assert req.get('Auth-Salt').endswith('@mail.example.com>')
    # Auth-Salt comes right after Auth-Pass (as in the 1.31 source of the spec)
    assert [h for h, _ in req.headers] == [
        'Host', 'Auth-Method', 'Auth-User', 'Auth-Pass', 'Auth-Salt', 'Auth-Protocol',
        'Auth-Login-Attempt', 'Client-IP']
    assert apop == (
        b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: apop\r\n'
        b'Auth-User: alice\r\n'
        b'Auth-Pass: %s\r\nAuth-Salt: %s\r\nAuth-Protocol: pop3\r\n'
        b'Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n\r\n'
        % (hashlib.md5(salt.encode() + b'secret').hexdigest().encode(), salt.encode()))


def test_nginx_smtp_none_xclient(reference, auth, postfix):
    n, ports = reference
    with smtplib.SMTP('127.0.0.1', ports['smtp'], timeout=T) as smtp:
        smtp.ehlo('client.example')
        smtp.docmd('MAIL FROM:<carol@example.org>')
        smtp.docmd('RCPT TO:<bob@test.example>')
        code, _ = smtp.data(MESSAGE)
        assert code == 250
    # 1.22 already sends empty Auth-User/Auth-Pass for none (spec: "since 1.29.1")
    assert auth.wait_requests(1) == [
        b'GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: none\r\n'
        b'Auth-User: \r\nAuth-Pass: \r\nAuth-Protocol: smtp\r\n'
        b'Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n'
        b'Client-Host: [UNAVAILABLE]\r\n'
        b'Auth-SMTP-Helo: client.example\r\n'
        b'Auth-SMTP-From: MAIL FROM:<carol@example.org>\r\n'
        b'Auth-SMTP-To: RCPT TO:<bob@test.example>\r\n\r\n']
    (msg,) = postfix.wait_messages('bob', 1)
    # nginx passed the client's HELO and address with XCLIENT (NAME=[UNAVAILABLE]
    # shows as "unknown")
    assert b'Received: from client.example (unknown [127.0.0.1])' in msg


# --------------------------------------------------------------------------- haproxy

def test_haproxy_send_proxy_to_dovecot(make_dovecot, haproxy):
    dovecot = make_dovecot(haproxy=True)
    port = free_port()
    haproxy('listen imap\n    bind 127.0.0.1:%d\n'
            '    server dovecot 127.0.0.1:%d send-proxy\n'
            % (port, dovecot.imap_haproxy_port), [port])
    imap = imaplib.IMAP4('127.0.0.1', port, timeout=T)
    assert imap.login('bob', 'hunter2')[0] == 'OK'
    imap.logout()
    assert 'Login: user=<bob>' in dovecot.log_text()


# -------------------------------------------------------------------- recording auth

def test_recording_auth_keepalive_and_failure_modes(auth):
    auth.users = {'alice': {'password': 'secret', 'user': 'a2', 'pass': 'p2'},
                  'slow': {'password': 'x', 'status': 'WAIT', 'wait': 1}}
    auth.ports = {'imap': 10143}
    auth.wait = 3
    req = ('GET /auth HTTP/1.1\r\nHost: 127.0.0.1\r\nAuth-Method: %s\r\n'
           'Auth-User: %s\r\nAuth-Pass: %s\r\nAuth-Protocol: imap\r\n'
           'Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n\r\n')
    with Client('127.0.0.1', auth.port, timeout=T) as c:
        c.send((req % ('plain', 'alice', 'secret')).encode())
        assert c.read_until(b'\r\n\r\n') == (
            b'HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
            b'Auth-Port: 10143\r\nAuth-User: a2\r\nAuth-Pass: p2\r\n'
            b'Content-Length: 0\r\n\r\n')
        c.send((req % ('plain', 'alice', 'wrong')).encode())
        assert c.read_until(b'\r\n\r\n') == (
            b'HTTP/1.1 200 OK\r\nAuth-Status: Invalid login or password\r\n'
            b'Auth-Wait: 3\r\nContent-Length: 0\r\n\r\n')
        c.send((req % ('plain', 'slow', 'x')).encode())
        assert c.read_until(b'\r\n\r\n') == (
            b'HTTP/1.1 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 1\r\n'
            b'Content-Length: 0\r\n\r\n')
    assert auth.connections == 1 and len(auth.requests) == 3
    auth.respond_raw = b'HTTP/1.0 500 Oops\r\nAuth-Status: OK\r\n\r\n'
    with Client('127.0.0.1', auth.port, timeout=T) as c:
        c.send((req % ('plain', 'alice', 'secret')).encode())
        assert c.recv_all_until_close() == auth.respond_raw
    auth.respond_raw, auth.close_without_answer = None, True
    with Client('127.0.0.1', auth.port, timeout=T) as c:
        c.send((req % ('plain', 'alice', 'secret')).encode())
        assert c.recv_all_until_close() == b''


# ------------------------------------------------------------------- auth_service.py

def _raw_request(port, method, user, password, protocol='imap', salt=None, attempt=1):
    head = ('GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: %s\r\n'
            'Auth-User: %s\r\nAuth-Pass: %s\r\n' % (method, user, password))
    if salt:
        head += 'Auth-Salt: %s\r\n' % salt
    head += ('Auth-Protocol: %s\r\nAuth-Login-Attempt: %d\r\n'
             'Client-IP: 192.0.2.1\r\n\r\n' % (protocol, attempt))
    with Client('127.0.0.1', port, timeout=T) as c:
        c.send(head.encode())
        answer = c.recv_all_until_close()
    status, _, rest = answer.partition(b'\r\n')
    assert status.startswith(b'HTTP/1.')
    head, _, body = rest.partition(b'\r\n\r\n')
    assert body == b''
    return dict(line.split(b': ', 1) for line in head.split(b'\r\n'))


@pytest.fixture
def auth_service(tmp_path):
    users = tmp_path / 'users'
    users.write_text('# test users\n'
                     'alice@example.com  secret  127.0.0.1:10143\n'
                     'bob  s3cret  imap=127.0.0.1:20143,pop3=localhost:20110'
                     '  bob2  bpw\n'
                     'carol  pw  -\n')
    port = free_port()
    log = open(tmp_path / 'auth.log', 'wb')
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / 'tools' / 'auth_service.py'), '--listen',
         '127.0.0.1:%d' % port, '--users', str(users), '--wait', '3', '--wait-attempts',
         '2', '--pop3', '127.0.0.1:30110'], stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    try:
        wait_port('127.0.0.1', port, 10, proc=proc, what='auth_service.py')
        yield port, users, tmp_path / 'auth.log'
    finally:
        proc.terminate()
        proc.wait(T)
        log.close()


def test_auth_service_answers_raw_requests(auth_service):
    port, users, log = auth_service
    ok = _raw_request(port, 'plain', 'alice@example.com', 'secret')
    assert ok[b'Auth-Status'] == b'OK'
    assert (ok[b'Auth-Server'], ok[b'Auth-Port']) == (b'127.0.0.1', b'10143')
    assert b'Auth-User' not in ok and b'Auth-Pass' not in ok

    bad = _raw_request(port, 'plain', 'alice@example.com', 'wrong')
    assert bad[b'Auth-Status'] == b'Invalid login or password'
    assert bad[b'Auth-Wait'] == b'3'
    late = _raw_request(port, 'plain', 'alice@example.com', 'wrong', attempt=2)
    assert b'Auth-Wait' not in late

    # backend per protocol (host names resolved), overrides for the backend login
    pop = _raw_request(port, 'plain', 'bob', 's3cret', protocol='pop3')
    assert (pop[b'Auth-Server'], pop[b'Auth-Port']) == (b'127.0.0.1', b'20110')
    assert (pop[b'Auth-User'], pop[b'Auth-Pass']) == (b'bob2', b'bpw')

    # CRAM-MD5 verified from the plaintext, which is sent back; '-' uses --pop3
    salt = '<123.456@mail.example.com>'
    digest = hmac.new(b'pw', salt.encode(), hashlib.md5).hexdigest()
    cram = _raw_request(port, 'cram-md5', 'carol', digest, protocol='pop3', salt=salt)
    assert (cram[b'Auth-Status'], cram[b'Auth-Port'], cram[b'Auth-Pass']) == (
        b'OK', b'30110', b'pw')
    # no IMAP default: a temporary failure, not a crash
    temporary = _raw_request(port, 'plain', 'carol', 'pw')
    assert temporary[b'Auth-Error-Code'] == b'451 4.3.0'

    # the file is read again when it changes
    users.write_text(users.read_text() + 'dave  d%20pw  127.0.0.1:10143\n')
    os.utime(users, (time.time() + 5, time.time() + 5))
    assert _raw_request(port, 'plain', 'dave', 'd%2520pw')[b'Auth-Status'] == b'OK'

    text = log.read_text()
    assert 'imap plain login="alice@example.com" client=192.0.2.1 attempt=1: OK' in text
    assert 'secret' not in text and 's3cret' not in text


def test_sasl_helpers_match_rfc2195():
    # RFC 2195's example, so the digest helper used against nginx is itself right
    salt = '<1896.697170952@postoffice.reston.mci.net>'
    digest = cram_md5_digest('tanstaaftanstaaf', salt)
    assert digest == 'b913a602c7eda7a495b4e6e7334d3890'
    assert base64.b64encode(b'tim ' + digest.encode()) == \
        b'dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw'
    assert RecordingAuthServer().url == 'http://127.0.0.1:0/auth'
