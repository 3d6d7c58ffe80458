"""Logins decided in the proxy: the user file (auth_users) and a Python hook (auth_hook),
in-process against scripted backends. The replies are the ones an auth_http answer
gives (tests/dialogue/test_imap.py, test_pop3.py, test_smtp.py)."""
import base64
import hashlib
import hmac
import re
import time

import argon2
import bcrypt
import gevent
import pytest
from passlib.hash import sha512_crypt

from tests.support.auth import b64
from tests.support.nginxlog import logged_in, login_failed

CONF = '''
mail {
    error_log {log} info;
    server_name mx.example;
    %s
    server { listen 127.0.0.1:{port}; protocol %s; %s }
}
'''
IMAP_GREETING = b'* OK IMAP4 ready\r\n'
IMAP_INTERNAL = b'* BAD internal server error\r\n'
SALTED = re.compile(rb'\+OK POP3 ready (<\d+\.\d+@mx\.example>)\r\n\Z')
SMTP_GREETING = b'220 mx.example ESMTP ready\r\n'
PASSWORD = b'Tr0ub4dor&3'

HASHES = {
    'bcrypt': lambda pw: bcrypt.hashpw(pw, bcrypt.gensalt(4)).decode(),
    'argon2': lambda pw: argon2.PasswordHasher(time_cost=1, memory_cost=8,
                                               parallelism=1).hash(pw),
    'sha512-crypt': lambda pw: sha512_crypt.using(rounds=1000).hash(pw),
    'plain': lambda pw: '{PLAIN}' + pw.decode(),
}


def users_proxy(mailproxy, tmp_path, lines, proto='imap', mail='', server=''):
    path = tmp_path / 'users'
    path.write_text(''.join(line + '\n' for line in lines))
    return mailproxy(CONF % ('auth_users %s;\n    %s' % (path, mail), proto, server))


def imap_login(proxy, user=b'alice', password=PASSWORD):
    c = proxy.client(greeting=IMAP_GREETING)
    c.send(b'a1 LOGIN %s "%s"\r\n' % (user, password))
    return c


# --- the user file -------------------------------------------------------------------

@pytest.mark.parametrize('scheme', list(HASHES))
def test_imap_login_with_each_scheme(mailproxy, fake_backend, tmp_path, scheme):
    be = fake_backend('imap')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['alice %s 127.0.0.1:%d' % (HASHES[scheme](PASSWORD), be.port)])
    c = imap_login(proxy)
    c.expect(b'a1 OK logged in\r\n')
    assert be.lines[0] == b'a1 LOGIN {5}\r\n'
    assert be.lines[1:3] == [b'alice {11}\r\n', PASSWORD + b'\r\n']
    log = proxy.wait_log(r'client logged in')
    assert re.search(logged_in('alice', be.port, proxy.port), log)
    assert PASSWORD.decode() not in log


def test_backend_login_and_password_overrides(mailproxy, fake_backend, tmp_path):
    be = fake_backend('pop3')
    proxy = users_proxy(mailproxy, tmp_path, [
        'alice %s pop3=127.0.0.1:%d,imap=127.0.0.1:1 mbox7 b4ckend'
        % (HASHES['bcrypt'](PASSWORD), be.port)], proto='pop3')
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'USER alice\r\nPASS %s\r\n' % PASSWORD)
    c.expect(b'+OK\r\n+OK\r\n')
    assert be.lines[:2] == [b'USER mbox7\r\n', b'PASS b4ckend\r\n']
    log = proxy.wait_log(r'client logged in')
    assert 'login: "mbox7", upstream: 127.0.0.1:%d' % be.port in log


def test_wrong_password_waits_then_the_client_may_retry(mailproxy, fake_backend, tmp_path):
    be = fake_backend('imap')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['alice %s 127.0.0.1:%d' % (HASHES['bcrypt'](PASSWORD), be.port)],
                        mail='auth_users_wait 300ms;')
    c = imap_login(proxy, password=b'wrong')
    began = time.monotonic()
    c.expect(b'a1 NO Invalid login or password\r\n', timeout=5)
    assert 0.3 <= time.monotonic() - began < 2
    c.send(b'a2 LOGIN alice "%s"\r\n' % PASSWORD)
    c.expect(b'a2 OK logged in\r\n')
    log = proxy.wait_log('client logged in')
    assert re.search(login_failed(port=proxy.port), log)


def test_unknown_user_is_refused_like_a_wrong_password(mailproxy, fake_backend, tmp_path):
    be = fake_backend('imap')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['alice %s 127.0.0.1:%d' % (HASHES['plain'](PASSWORD), be.port)],
                        mail='auth_users_wait 0;')
    c = imap_login(proxy, user=b'mallory')
    c.expect(b'a1 NO Invalid login or password\r\n')
    assert c.closed()                 # no Auth-Wait: the reply closes, as from nginx
    assert be.connections == 0


def test_last_attempt_is_delayed_and_closes(mailproxy, fake_backend, tmp_path):
    be = fake_backend('imap')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['alice %s 127.0.0.1:%d' % (HASHES['plain'](PASSWORD), be.port)],
                        mail='auth_users_wait 200ms; auth_users_attempts 2;')
    c = imap_login(proxy, password=b'one')
    c.expect(b'a1 NO Invalid login or password\r\n')
    began = time.monotonic()
    c.send(b'a2 LOGIN alice two\r\n')
    c.expect(b'a2 NO Invalid login or password\r\n')
    assert time.monotonic() - began >= 0.2
    assert c.closed()


def test_imap_cram_md5_with_plain_entry(mailproxy, fake_backend, tmp_path):
    be = fake_backend('imap')
    proxy = users_proxy(mailproxy, tmp_path, ['bob {PLAIN}hunter2 127.0.0.1:%d' % be.port],
                        server='imap_auth plain cram-md5;')
    c = proxy.client(greeting=IMAP_GREETING)
    c.send(b'a1 AUTHENTICATE CRAM-MD5\r\n')
    salt = base64.b64decode(c.readline()[2:])
    digest = hmac.new(b'hunter2', salt, hashlib.md5).hexdigest().encode()
    c.send(b64(b'bob ' + digest) + b'\r\n')
    c.expect(b'a1 OK logged in\r\n')
    assert be.lines[1:3] == [b'bob {7}\r\n', b'hunter2\r\n']   # the plaintext, not the digest


def test_imap_cram_md5_refused_for_hashed_entry(mailproxy, fake_backend, tmp_path):
    be = fake_backend('imap')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['alice %s 127.0.0.1:%d' % (HASHES['argon2'](b'hunter2'), be.port)],
                        mail='auth_users_wait 0;', server='imap_auth plain cram-md5;')
    c = proxy.client(greeting=IMAP_GREETING)
    c.send(b'a1 AUTHENTICATE CRAM-MD5\r\n')
    salt = base64.b64decode(c.readline()[2:])
    digest = hmac.new(b'hunter2', salt, hashlib.md5).hexdigest().encode()
    c.send(b64(b'alice ' + digest) + b'\r\n')
    c.expect(b'a1 NO Invalid login or password\r\n')
    log = proxy.wait_log('client login failed')
    assert 'CRAM-MD5 login refused: the user file holds a hashed password' in log
    assert be.connections == 0


@pytest.mark.parametrize('scheme, reply', [('plain', b'+OK\r\n'),
                                           ('sha512-crypt', b'-ERR Invalid login or password'
                                                            b'\r\n')])
def test_pop3_apop(mailproxy, fake_backend, tmp_path, scheme, reply):
    be = fake_backend('pop3')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['bob %s 127.0.0.1:%d' % (HASHES[scheme](b'hunter2'), be.port)],
                        proto='pop3', mail='auth_users_wait 0;', server='pop3_auth apop;')
    c = proxy.client()
    salt = SALTED.match(c.readline()).group(1)
    c.send(b'APOP bob %s\r\n' % hashlib.md5(salt + b'hunter2').hexdigest().encode())
    c.expect(reply)
    if scheme == 'plain':
        assert be.lines[:2] == [b'USER bob\r\n', b'PASS hunter2\r\n']


def test_smtp_auth_plain(mailproxy, fake_backend, tmp_path):
    be = fake_backend('smtp')
    proxy = users_proxy(mailproxy, tmp_path,
                        ['alice %s smtp=127.0.0.1:%d' % (HASHES['bcrypt'](PASSWORD), be.port)],
                        proto='smtp', mail='auth_users_wait 0;')
    c = proxy.client(greeting=SMTP_GREETING)
    c.send(b'EHLO client\r\n')
    c.read_lines_until(b'250 ')
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0wrong') + b'\r\n')
    c.expect(b'535 5.7.0 Invalid login or password\r\n')
    c = proxy.client(greeting=SMTP_GREETING)
    c.send(b'EHLO client\r\nAUTH PLAIN ' + b64(b'\0alice\0' + PASSWORD) + b'\r\n')
    c.read_lines_until(b'250 ')
    c.expect(b'235 2.0.0 OK\r\n')


@pytest.mark.parametrize('relay', [False, True])
def test_smtp_without_auth_needs_a_relay(mailproxy, fake_backend, tmp_path, relay):
    be = fake_backend('smtp')
    mail = 'auth_users_relay 127.0.0.1:%d;' % be.port if relay else ''
    proxy = users_proxy(mailproxy, tmp_path, ['alice {PLAIN}x 127.0.0.1:1'], proto='smtp',
                        mail=mail, server='smtp_auth none; xclient off;')
    c = proxy.client(greeting=SMTP_GREETING)
    c.send(b'HELO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n')
    if relay:
        c.expect(b'250 mx.example\r\n250 2.0.0 OK\r\n250 2.1.5 Ok\r\n')
        with gevent.Timeout(5):
            while len(be.lines) < 3:
                gevent.sleep(0.01)
        assert be.lines[1:3] == [b'MAIL FROM:<a@example.com>\r\n',
                                 b'RCPT TO:<b@example.com>\r\n']
    else:
        c.expect(b'250 mx.example\r\n250 2.0.0 OK\r\n550 5.7.1 Relaying denied\r\n')
        assert be.connections == 0


def test_protocol_without_backend_is_an_internal_error(mailproxy, fake_backend, tmp_path):
    proxy = users_proxy(mailproxy, tmp_path, ['alice {PLAIN}x pop3=127.0.0.1:1'])
    c = imap_login(proxy, password=b'x')
    c.expect(IMAP_INTERNAL)
    assert c.closed()
    log = proxy.wait_log('no imap backend')
    assert re.search(r'\[error\] .*no imap backend for "alice" in .*/users:1 while in '
                     r'http auth state', log)


# --- the hook --------------------------------------------------------------------------

HOOK = '''
HANDLER = None


def authenticate(request):
    return HANDLER(request)
'''


def hook_proxy(mailproxy, tmp_path, handler, proto='imap', mail='', server=''):
    path = tmp_path / 'local_hook.py'
    path.write_text(HOOK)
    proxy = mailproxy(CONF % ('auth_hook %s:authenticate;\n    %s' % (path, mail), proto,
                              server))
    for conf in proxy.config.servers:
        conf.auth_hook.func.__globals__['HANDLER'] = handler
    return proxy


def ok(port, **more):
    return {'Auth-Status': 'OK', 'Auth-Server': '127.0.0.1', 'Auth-Port': port, **more}


def test_hook_gets_the_request_fields_and_its_answer_counts(mailproxy, fake_backend,
                                                            tmp_path):
    be = fake_backend('imap')
    seen = []

    def handler(request):
        seen.append(request)
        return [('Auth-Status', b'OK'), ('Auth-Server', '127.0.0.1'), ('Auth-Port', be.port),
                ('Auth-User', 'mbox'), ('Auth-Pass', 'other pw')]
    proxy = hook_proxy(mailproxy, tmp_path, handler,
                       mail='auth_http_header X-Key "k 1";')
    c = imap_login(proxy, b'"al ice%"', b'p w%')
    c.expect(b'a1 OK logged in\r\n')
    assert seen == [{'Auth-Method': 'plain', 'Auth-User': 'al ice%', 'Auth-Pass': 'p w%',
                     'Auth-Protocol': 'imap', 'Auth-Login-Attempt': '1',
                     'Client-IP': '127.0.0.1', 'X-Key': 'k 1'}]
    assert be.lines[1:3] == [b'mbox {8}\r\n', b'other pw\r\n']


def test_hook_for_apop_gets_the_salt(mailproxy, fake_backend, tmp_path):
    be = fake_backend('pop3')
    seen = []

    def handler(request):
        seen.append(request)
        return ok(be.port, **{'Auth-Pass': 'hunter2'})
    proxy = hook_proxy(mailproxy, tmp_path, handler, proto='pop3', server='pop3_auth apop;')
    c = proxy.client()
    salt = SALTED.match(c.readline()).group(1)
    digest = hashlib.md5(salt + b'hunter2').hexdigest()
    c.send(b'APOP bob %s\r\n' % digest.encode())
    c.expect(b'+OK\r\n')
    assert seen[0]['Auth-Method'] == 'apop' and seen[0]['Auth-Pass'] == digest
    assert seen[0]['Auth-Salt'] == salt.decode()


def test_hook_rejection_with_wait_and_error_code(mailproxy, fake_backend, tmp_path):
    be = fake_backend('smtp')

    def handler(request):
        if request['Auth-Login-Attempt'] == '1':
            return {'Auth-Status': 'Try later', 'Auth-Wait': 1,
                    'Auth-Error-Code': '451 4.3.0'}
        return ok(be.port)
    proxy = hook_proxy(mailproxy, tmp_path, handler, proto='smtp')
    c = proxy.client(greeting=SMTP_GREETING)
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0x') + b'\r\n')
    began = time.monotonic()
    c.expect(b'451 4.3.0 Try later\r\n')
    assert time.monotonic() - began >= 0.9
    c.send(b'AUTH PLAIN ' + b64(b'\0alice\0x') + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    proxy.wait_log('client login failed: "Try later" while in http auth state')


def test_hook_exception_is_an_internal_error_logged_without_the_password(
        mailproxy, fake_backend, tmp_path):
    def handler(request):
        password = request['Auth-Pass']
        raise ValueError('cannot check %r for %s' % (password, request['Auth-User']))
    proxy = hook_proxy(mailproxy, tmp_path, handler)
    c = imap_login(proxy)
    c.expect(IMAP_INTERNAL)
    assert c.closed()
    log = proxy.wait_log('ValueError')
    hook = '%s:authenticate' % (tmp_path / 'local_hook.py')
    assert re.search(r'\[error\] .*\*\d+ auth hook %s failed: ValueError: cannot check '
                     r"'\.\.\.' for alice while in http auth state, client: 127\.0\.0\.1, "
                     r'server: 127\.0\.0\.1:%d, login: "alice"\nTraceback \(most recent call '
                     r'last\):\n' % (re.escape(hook), proxy.port), log)
    assert 'in handler\n' in log and "raise ValueError('cannot check %r for %s'" in log
    assert PASSWORD.decode() not in log
    assert log.count('auth hook') == 1           # one entry, no second "internal" line


@pytest.mark.parametrize('answer, message', [
    (None, 'returned an invalid answer (NoneType, not a dict or a list of pairs)'),
    ([('Auth-Status',)], 'returned an invalid answer (an item is not a (name, value) pair)'),
    ({'Auth Status': 'OK'}, 'returned an invalid answer (a header name is not a word)'),
    ({'Auth-Status': 'bad\r\n* OK'}, 'returned an invalid answer (the value of '
                                     '"Auth-Status" is not one line of text)'),
    ({'Auth-Status': 'OK', 'Auth-Port': 1.5}, 'returned an invalid answer (the value of '
                                              '"Auth-Port" is not one line of text)'),
    ({'Auth-Status': 'OK'}, 'did not send server or port'),
    ({'Auth-Status': 'OK', 'Auth-Server': 'localhost', 'Auth-Port': 1},
     'sent invalid server address:"localhost"'),
])
def test_hook_bad_answer_is_an_internal_error(mailproxy, fake_backend, tmp_path, answer,
                                               message):
    proxy = hook_proxy(mailproxy, tmp_path, lambda request: answer)
    c = imap_login(proxy)
    c.expect(IMAP_INTERNAL)
    hook = '%s:authenticate' % (tmp_path / 'local_hook.py')
    name = ('auth http server auth_hook %s' if 'did not' in message or 'sent' in message
            else 'auth hook %s') % hook
    proxy.wait_log(r'\[error\] .*%s %s while in http auth state'
                   % (re.escape(name), re.escape(message)))


def test_hook_timeout(mailproxy, tmp_path):
    proxy = hook_proxy(mailproxy, tmp_path, lambda request: gevent.sleep(10),
                       mail='auth_http_timeout 200ms;')
    c = imap_login(proxy)
    began = time.monotonic()
    c.expect(IMAP_INTERNAL)
    assert time.monotonic() - began < 2
    proxy.wait_log(r'\[error\] .*auth hook .*:authenticate timed out while in http auth')


def test_hook_io_does_not_hold_other_sessions(mailproxy, fake_backend, tmp_path):
    be = fake_backend('imap')

    def handler(request):
        if request['Auth-User'] == 'slow':
            gevent.sleep(1.0)           # e.g. a directory lookup over the network
        return ok(be.port)
    proxy = hook_proxy(mailproxy, tmp_path, handler)
    slow = imap_login(proxy, b'slow')
    gevent.sleep(0.1)
    began = time.monotonic()
    fast = imap_login(proxy, b'fast')
    fast.expect(b'a1 OK logged in\r\n')
    assert time.monotonic() - began < 0.7
    slow.expect(b'a1 OK logged in\r\n')
