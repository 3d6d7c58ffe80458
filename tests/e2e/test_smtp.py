"""SMTP end to end: smtplib, swaks, curl -> gmailproxy (subprocess) -> a real Postfix.

Clients connect from 127.0.0.2 (their socket is bound there), so Postfix showing that
address proves XCLIENT took effect; with ``xclient off`` it shows the proxy's 127.0.0.1.
"""
import email.message
import email.policy
import os
import random
import re
import shutil
import smtplib
import subprocess

import pytest

from tests.support.auth import http_response
from tests.unit.test_resolver import FakeDNS

CONF = '''
events { }
mail {
    auth_http %(auth)s;
    auth_http_keepalive off;
    server_name proxy.test.example;
    %(extra)s
    server {
        listen 127.0.0.1:%(port)d;
        protocol smtp;
    }
}
'''
CLIENT_ADDR = '127.0.0.2'


@pytest.fixture
def postfix(make_postfix):
    return make_postfix(extra_main_cf='message_size_limit = 52428800\n'
                                      'virtual_mailbox_limit = 0\n')


@pytest.fixture
def smtp_proxy(proxy_to, postfix):
    """``smtp_proxy(extra_directives)`` -> the started proxy (``.port``)."""
    def make(extra=''):
        return proxy_to(CONF, 'smtp', postfix.port, extra=extra)
    return make


def big_message(subject: str, size: int = 10 * 1024 * 1024) -> bytes:
    """A MIME message of about ``size`` bytes: text plus two binary attachments."""
    rng = random.Random(subject)
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg['From'] = 'alice@test.example'
    msg['To'] = 'bob@test.example'
    msg['Subject'] = subject
    msg['Date'] = 'Sat, 21 Nov 2026 10:00:00 +0000'
    msg['Message-ID'] = '<%s@client.test.example>' % subject.replace(' ', '.')
    msg.set_content('Hello Bob,\n\n.a line starting with a dot\n..and two\n.\n'
                    'the end\n')
    part = size * 3 // 8            # base64 makes 4/3 of it
    msg.add_attachment(rng.randbytes(part), maintype='application',
                       subtype='octet-stream', filename='one.bin')
    msg.add_attachment(rng.randbytes(part), maintype='image', subtype='png',
                       filename='two.png')
    return msg.as_bytes()


def delivered_body(stored: bytes, sent: bytes) -> bytes:
    """Check that Postfix added only its trace headers in front; return them."""
    sent_lf = sent.replace(b'\r\n', b'\n')
    assert stored.endswith(sent_lf), 'the delivered message differs from the one sent'
    added = stored[:len(stored) - len(sent_lf)]
    names = re.findall(rb'(?m)^([A-Za-z-]+):', added)
    trace = {b'Return-Path', b'X-Original-To', b'Delivered-To', b'Received'}
    assert set(names) <= trace, added
    return added


def client(port, source=CLIENT_ADDR) -> smtplib.SMTP:
    return smtplib.SMTP('127.0.0.1', port, local_hostname='client.test.example',
                        source_address=(source, 0), timeout=60)


def test_smtplib_auth_plain_10mb_with_attachments(smtp_proxy, postfix, auth):
    proxy = smtp_proxy()
    msg = big_message('plain ten megabytes')
    assert len(msg) > 10 * 1024 * 1024
    with client(proxy.port) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features['auth'].split() == ['PLAIN', 'LOGIN']
        assert smtp.login('alice', 'secret')[0] == 235
        assert smtp.sendmail('alice@test.example', ['bob@test.example'], msg) == {}
    added = delivered_body(postfix.wait_messages('bob', 1, timeout=30)[0], msg)
    assert b'Received: from client.test.example (unknown [127.0.0.2])' in added
    assert 'client=unknown[127.0.0.2]' in postfix.log_text()
    assert b'Auth-Method: plain\r\nAuth-User: alice\r\nAuth-Pass: secret\r\n' \
        in auth.requests[0]
    assert b'Client-IP: 127.0.0.2\r\n' in auth.requests[0]
    log = proxy.wait_log('proxied session done')
    assert 'client logged in, client: 127.0.0.2, server: 127.0.0.1:%d, ' \
        'login: "alice", upstream: 127.0.0.1:%d' % (proxy.port, postfix.port) in log
    assert 'secret' not in log


def test_smtplib_auth_login_10mb_with_attachments(smtp_proxy, postfix, auth):
    proxy = smtp_proxy()
    msg = big_message('login ten megabytes')
    with client(proxy.port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = 'bob', 'hunter2'
        code, _ = smtp.auth('LOGIN', smtp.auth_login, initial_response_ok=False)
        assert code == 235
        assert smtp.sendmail('bob@test.example', ['alice@test.example',
                                                  'bob@test.example'], msg) == {}
    for mailbox in ('alice', 'bob'):
        delivered_body(postfix.wait_messages(mailbox, 1, timeout=30)[0], msg)
    assert b'Auth-User: bob\r\nAuth-Pass: hunter2\r\n' in auth.requests[0]
    assert 'sasl_username=bob' in postfix.log_text()   # XCLIENT LOGIN= reached Postfix


def test_xclient_off_shows_the_proxy_address(smtp_proxy, postfix):
    proxy = smtp_proxy('xclient off;')
    with client(proxy.port) as smtp:
        smtp.login('alice', 'secret')
        smtp.sendmail('alice@test.example', ['bob@test.example'],
                      b'Subject: no xclient\r\n\r\nhello\r\n')
    stored = postfix.wait_messages('bob', 1, timeout=10)[0]
    received = stored.split(b'\n\t', 1)[0]
    assert received.startswith(b'Return-Path: <alice@test.example>\nX-Original-To: '
                               b'bob@test.example\nDelivered-To: bob@test.example\n'
                               b'Received: from proxy.test.example ')
    assert b'[127.0.0.1])' in received
    assert b'127.0.0.2' not in stored
    assert '127.0.0.2' not in postfix.log_text()


def test_resolved_client_name_reaches_postfix(smtp_proxy, postfix, auth):
    dns_server = FakeDNS({('2.0.0.127.in-addr.arpa.', 'PTR'): [('client.test.', 300)],
                          ('client.test.', 'A'): [('127.0.0.2', 300)]})
    try:
        proxy = smtp_proxy('resolver 127.0.0.1:%d;' % dns_server.port)
        with client(proxy.port) as smtp:
            smtp.login('alice', 'secret')
            smtp.sendmail('alice@test.example', ['bob@test.example'],
                          b'Subject: named\r\n\r\nhello\r\n')
    finally:
        dns_server.stop()
    stored = postfix.wait_messages('bob', 1, timeout=10)[0]
    assert b'Received: from client.test.example (client.test [127.0.0.2])' in stored
    assert 'client=client.test[127.0.0.2]' in postfix.log_text()
    assert b'Client-Host: client.test\r\n' in auth.requests[0]


@pytest.mark.skipif(shutil.which('swaks') is None, reason='swaks is not installed')
@pytest.mark.parametrize('mechanism', ['PLAIN', 'LOGIN'])
def test_swaks(smtp_proxy, postfix, mechanism):
    proxy = smtp_proxy()
    out = subprocess.run(
        ['swaks', '--server', '127.0.0.1:%d' % proxy.port,
         '--local-interface', CLIENT_ADDR,
         '--helo', 'swaks.test.example', '--auth', mechanism, '--auth-user', 'alice',
         '--auth-password', 'secret', '--from', 'alice@test.example',
         '--to', 'bob@test.example', '--header', 'Subject: via swaks %s' % mechanism,
         '--body', 'sent by swaks', '--timeout', '20'],
        capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert b'<-  235 2.0.0 OK' in out.stdout
    stored = postfix.wait_messages('bob', 1, timeout=10)[0]
    assert b'Subject: via swaks %s\n' % mechanism.encode() in stored
    assert b'Received: from swaks.test.example (unknown [127.0.0.2])' in stored


@pytest.mark.skipif(shutil.which('curl') is None, reason='curl is not installed')
def test_curl(smtp_proxy, postfix, tmp_path):
    proxy = smtp_proxy()
    message = b'From: alice@test.example\r\nTo: bob@test.example\r\n' \
              b'Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n' \
              b'Message-ID: <curl@test.example>\r\n' \
              b'Subject: via curl\r\n\r\n.leading dot\r\nsent by curl\r\n'
    (tmp_path / 'msg').write_bytes(message)
    out = subprocess.run(
        ['curl', '-sS', '--max-time', '20', '--url', 'smtp://127.0.0.1:%d/curl.example'
         % proxy.port, '--interface', CLIENT_ADDR, '--user', 'alice:secret',
         '--mail-from', 'alice@test.example', '--mail-rcpt', 'bob@test.example',
         '--upload-file', str(tmp_path / 'msg')], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    stored = postfix.wait_messages('bob', 1, timeout=10)[0]
    assert stored.endswith(message.replace(b'\r\n', b'\n'))
    assert b'Received: from curl.example (unknown [127.0.0.2])' in stored


def test_relay_with_smtp_auth_none(smtp_proxy, postfix, auth):
    """The auth service decides per recipient from Auth-SMTP-From/To; a recipient
    refused by it or by Postfix gets that refusal and the session goes on."""
    def refuse(req):
        if req.get('Auth-SMTP-To') == 'rcpt TO:<bob@test.example>':   # smtplib's case
            return None                         # the normal answer: relay
        return http_response([('Auth-Status', 'Relaying denied'),
                              ('Auth-Error-Code', '550 5.7.1'), ('Auth-Wait', '1')])
    auth.relay = lambda req: True
    auth.responder = refuse
    auth.users = {}
    proxy = smtp_proxy('smtp_auth none;')
    with client(proxy.port) as smtp:
        smtp.ehlo()
        assert smtp.mail('sender@example.org') == (250, b'2.0.0 OK')
        assert smtp.rcpt('victim@elsewhere.example') == (550, b'5.7.1 Relaying denied')
        code, text = smtp.rcpt('bob@test.example')
        assert code == 250, text
        code, text = smtp.rcpt('nobody@test.example')     # now Postfix itself answers
        assert code == 550 and b'nobody@test.example' in text, text
        assert smtp.data(b'Subject: relayed\r\n\r\nhello\r\n')[0] == 250
    stored = postfix.wait_messages('bob', 1, timeout=10)[0]
    assert b'Received: from client.test.example (unknown [127.0.0.2])' in stored
    assert [(r.get('Auth-Method'), r.get('Auth-SMTP-Helo'), r.get('Auth-SMTP-From'),
             r.get('Auth-SMTP-To')) for r in auth.parsed] == [
        ('none', 'client.test.example', 'mail FROM:<sender@example.org>',
         'rcpt TO:<victim@elsewhere.example>'),
        ('none', 'client.test.example', 'mail FROM:<sender@example.org>',
         'rcpt TO:<bob@test.example>')]


def test_relay_recipient_refused_by_postfix(smtp_proxy, postfix, auth):
    auth.relay = lambda req: True
    proxy = smtp_proxy('smtp_auth none;')
    with client(proxy.port) as smtp:
        smtp.ehlo()
        smtp.mail('sender@example.org')
        code, text = smtp.rcpt('nobody@test.example')
        assert code == 550 and b'User unknown' in text, text
        assert smtp.rcpt('bob@test.example')[0] == 250
        assert smtp.data(b'Subject: second try\r\n\r\nhello\r\n')[0] == 250
    assert b'Subject: second try\n' in postfix.wait_messages('bob', 1, timeout=10)[0]


def test_proxy_smtp_auth_to_postfix_without_sasl_is_refused(smtp_proxy, postfix):
    """Postfix here offers no AUTH: the backend's refusal ends the session with 451."""
    proxy = smtp_proxy('proxy_smtp_auth on;')
    with client(proxy.port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = 'alice', 'secret'
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            smtp.auth('PLAIN', smtp.auth_plain)
        assert (caught.value.smtp_code, caught.value.smtp_error) == (
            451, b'4.3.2 Internal server error')
    proxy.wait_log('upstream sent invalid response: "503 5.5.1 Error: authentication '
                   'not enabled" while reading response from upstream')


def test_xtext_login_decoded_by_postfix(smtp_proxy, postfix, auth):
    """XCLIENT LOGIN= goes out xtext-encoded; Postfix decodes it back."""
    auth.users['odd user+x'] = {'password': 'pw'}
    proxy = smtp_proxy()
    with client(proxy.port) as smtp:
        smtp.login('odd user+x', 'pw')
        smtp.sendmail('alice@test.example', ['bob@test.example'],
                      b'Subject: odd\r\n\r\nx\r\n')
    postfix.wait_messages('bob', 1, timeout=10)
    assert 'sasl_username=odd user+x' in postfix.log_text()


if not os.path.exists('/usr/lib/postfix/sbin/master'):
    pytestmark = pytest.mark.skip(reason='postfix is not installed')
