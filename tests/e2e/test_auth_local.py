"""Logins decided by gmailproxy itself, end to end against real Dovecot and Postfix.

The login tests of the auth_http path (test_imap.py, test_pop3.py, test_smtp.py) run
once with the user file (``auth_users``) and once with a Python hook (``auth_hook``, the
sample conf/auth_hook_example.py with the test's users). Last, the README's first login
as a new user follows it: ``python -m gmailproxy conf/mail.conf`` from the repository,
a Dovecot on the ports conf/users names, and the documented ``curl`` commands.
"""
import email.message
import imaplib
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from tests.support.backends import Dovecot, unavailable
from tests.support.clients import (curl_imap_list_fetch, imap_authenticate_plain_bob,
                                   imap_wrong_password_refused, pop3, pop3_auth_plain_bob,
                                   pop3_wrong_password_refused)
from tests.support.net import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
CLIENT_ADDR = '127.0.0.2'        # SMTP clients bind here: Postfix shows it via XCLIENT

CONF = '''
events { }
mail {
    %(auth)s
    server_name mx.test.example;
    server {
        listen 127.0.0.1:%(port)d;
        protocol %(proto)s;
        %(server)s
    }
}
'''


def backends(dovecot, postfix) -> dict[str, tuple[str, int]]:
    found = {'imap': ('127.0.0.1', dovecot.imap_port), 'pop3': ('127.0.0.1', dovecot.pop3_port)}
    if postfix is not None:
        found['smtp'] = ('127.0.0.1', postfix.port)
    return found


def users_file(folder: Path, where: dict) -> str:
    """alice with a bcrypt hash, bob with a {PLAIN} password (for APOP)."""
    target = ','.join('%s=%s:%d' % (proto, host, port) for proto, (host, port)
                      in where.items())
    path = folder / 'users'
    path.write_text('# test users\n'
                    'alice  %s  %s\n'
                    'bob    {PLAIN}hunter2  %s\n'
                    % (bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode(), target, target))
    return 'auth_users %s;\n    auth_users_wait 0;' % path


def hook_file(folder: Path, where: dict) -> str:
    """The sample hook, its table replaced by the test's users and backends."""
    path = folder / 'test_hook.py'
    path.write_text((ROOT / 'conf' / 'auth_hook_example.py').read_text()
                    + '\nUSERS = {%r: (%r, %r), %r: (%r, %r)}\nWAIT = 0\n'
                    % ('alice', 'secret', where, 'bob', 'hunter2', where))
    return 'auth_hook %s:authenticate;' % path


@pytest.fixture(params=['users', 'hook'])
def local_proxy(request, gmailproxy, tmp_path):
    """``local_proxy(proto, dovecot=..., postfix=..., server='')`` -> started proxy with
    ``.port``, its logins checked by the user file or by the hook."""
    def make(proto, dovecot=None, postfix=None, server=''):
        where = backends(dovecot, postfix) if dovecot else {'smtp': ('127.0.0.1',
                                                                     postfix.port)}
        folder = tmp_path / 'auth'
        folder.mkdir(exist_ok=True)
        auth = (users_file if request.param == 'users' else hook_file)(folder, where)
        port = free_port()
        proxy = gmailproxy(CONF % {'auth': auth, 'port': port, 'proto': proto,
                                   'server': server}, ports=[port])
        proxy.port = port
        return proxy
    make.kind = request.param
    return make


def message(size: int, subject: str) -> bytes:
    head = ('From: alice@test.example\r\nTo: alice@test.example\r\nSubject: %s\r\n\r\n'
            % subject).encode()
    line = bytes(range(33, 33 + 76)) + b'\r\n'
    dotted = b'.' + bytes(range(48, 48 + 40)) + b'\r\n'
    body = ((line * 9 + dotted) * (size // 800 + 1))[:size]
    return head + body[:body.rindex(b'\r\n')] + b'\r\n'


# --- IMAP ------------------------------------------------------------------------------

def test_imap_login_select_append_fetch(local_proxy, dovecot):
    proxy = local_proxy('imap', dovecot)
    msg = message(1024 * 1024, 'one megabyte')
    with imaplib.IMAP4('127.0.0.1', proxy.port, timeout=30) as imap:
        assert imap.login('alice', 'secret')[0] == 'OK'
        assert imap.select('INBOX') == ('OK', [b'0'])
        typ, data = imap.append('INBOX', None, None, msg)
        assert typ == 'OK', data
        typ, data = imap.fetch('1', '(BODY.PEEK[])')
        assert typ == 'OK' and data[0][1] == msg
    assert dovecot.messages('alice') == [msg.replace(b'\r\n', b'\n')]
    log = proxy.wait_log('proxied session done')
    assert 'client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, login: "alice", ' \
        'upstream: 127.0.0.1:%d' % (proxy.port, dovecot.imap_port) in log
    assert 'secret' not in log


def test_imap_authenticate_plain(local_proxy, dovecot):
    proxy = local_proxy('imap', dovecot)
    dovecot.deliver('bob', message(1000, 'hello bob'))
    imap_authenticate_plain_bob(proxy.port)


def test_imap_wrong_password_is_refused(local_proxy, dovecot):
    proxy = local_proxy('imap', dovecot)
    imap_wrong_password_refused(proxy.port)
    proxy.wait_log('client login failed: "Invalid login or password" while in http auth '
                   'state, client: 127.0.0.1')


@pytest.mark.skipif(shutil.which('curl') is None, reason='curl is not installed')
def test_curl_login_list_fetch(local_proxy, dovecot):
    proxy = local_proxy('imap', dovecot)
    dovecot.deliver('alice', message(2000, 'for curl'))
    curl_imap_list_fetch(proxy.port)


# --- POP3 ------------------------------------------------------------------------------

def test_pop3_user_pass_list_retr(local_proxy, dovecot):
    proxy = local_proxy('pop3', dovecot, server='pop3_auth plain apop;')
    msg = message(3000, 'hello')
    dovecot.deliver('alice', msg)
    p = pop3(proxy.port)
    try:
        assert p.user('alice') == b'+OK'
        assert p.pass_('secret').startswith(b'+OK')
        assert p.stat() == (1, len(msg))
        assert b''.join(line + b'\r\n' for line in p.retr(1)[1]) == msg
    finally:
        assert p.quit().startswith(b'+OK')
    log = proxy.wait_log('proxied session done')
    assert 'login: "alice", upstream: 127.0.0.1:%d' % dovecot.pop3_port in log
    assert 'secret' not in log


def test_pop3_apop_with_a_plain_entry(local_proxy, dovecot):
    proxy = local_proxy('pop3', dovecot, server='pop3_auth plain apop;')
    dovecot.deliver('bob', message(500, 'apop'))
    p = pop3(proxy.port)
    try:
        assert re.search(rb'<\d+\.\d+@mx\.test\.example>', p.getwelcome())
        assert p.apop('bob', 'hunter2').startswith(b'+OK')
        assert p.stat()[0] == 1
    finally:
        p.quit()


def test_pop3_auth_plain(local_proxy, dovecot):
    proxy = local_proxy('pop3', dovecot)
    pop3_auth_plain_bob(proxy.port)


def test_pop3_wrong_password_is_refused(local_proxy, dovecot):
    proxy = local_proxy('pop3', dovecot)
    pop3_wrong_password_refused(proxy.port)


# --- SMTP ------------------------------------------------------------------------------

def smtp_client(port) -> smtplib.SMTP:
    return smtplib.SMTP('127.0.0.1', port, local_hostname='client.test.example',
                        source_address=(CLIENT_ADDR, 0), timeout=30)


def mail(subject: str) -> bytes:
    msg = email.message.EmailMessage()
    msg['From'], msg['To'], msg['Subject'] = 'alice@test.example', 'bob@test.example', subject
    msg['Date'] = 'Sat, 21 Nov 2026 10:00:00 +0000'
    msg['Message-ID'] = '<%s@client.test.example>' % subject.replace(' ', '.')
    msg.set_content('Hello Bob,\n.a line starting with a dot\n')
    return msg.as_bytes()


@pytest.mark.parametrize('user, password, mechanism', [('alice', 'secret', 'PLAIN'),
                                                       ('bob', 'hunter2', 'LOGIN')])
def test_smtp_auth_and_send(local_proxy, postfix, user, password, mechanism):
    proxy = local_proxy('smtp', postfix=postfix)
    msg = mail('via %s' % mechanism)
    with smtp_client(proxy.port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = user, password
        method = smtp.auth_plain if mechanism == 'PLAIN' else smtp.auth_login
        assert smtp.auth(mechanism, method)[0] == 235
        assert smtp.sendmail('%s@test.example' % user, ['bob@test.example'], msg) == {}
    delivered = postfix.wait_messages('bob', 1, timeout=30)[0]
    assert delivered.rstrip(b'\n').endswith(msg.replace(b'\r\n', b'\n').rstrip(b'\n'))
    assert b'Received: from client.test.example (unknown [127.0.0.2])' in delivered
    log = proxy.wait_log('proxied session done')
    assert 'client logged in, client: 127.0.0.2, server: 127.0.0.1:%d, login: "%s", ' \
        'upstream: 127.0.0.1:%d' % (proxy.port, user, postfix.port) in log
    assert password not in log


def test_smtp_wrong_password_is_refused(local_proxy, postfix):
    proxy = local_proxy('smtp', postfix=postfix)
    with smtp_client(proxy.port) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = 'alice', 'wrong'
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            smtp.auth('PLAIN', smtp.auth_plain)
        assert (e.value.smtp_code, e.value.smtp_error) == (535,
                                                            b'5.7.0 Invalid login or password')


# --- the README's first login ---------------------------------------------------------

def readme_first_login() -> tuple[list[str], str]:
    """The curl commands of the README's "First login" section, and that section."""
    text = (ROOT / 'README.md').read_text()
    section = text[text.index('## First login'):]
    section = section[:section.index('\n## ', 1)]
    commands = re.findall(r'curl -u \S+ [a-z0-9]+://[^\s`]+', section)
    assert commands, 'no curl command in the README\'s first login section'
    return commands, section


def conf_ports() -> dict[str, int]:
    """The listen ports of conf/mail.conf and the backend ports conf/users names."""
    conf = (ROOT / 'conf' / 'mail.conf').read_text()
    listens = [int(p) for p in re.findall(r'(?m)^\s*listen 127\.0\.0\.1:(\d+);', conf)]
    users = (ROOT / 'conf' / 'users').read_text()
    line = next(l for l in users.splitlines() if l.startswith('alice@example.com'))
    backends = dict((proto, int(port)) for proto, port
                    in re.findall(r'(imap|pop3|smtp)=127\.0\.0\.1:(\d+)', line))
    return {'listen': listens, **backends}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers bind
        try:
            s.bind(('127.0.0.1', port))
        except OSError:
            return False
    return True


@pytest.fixture
def readme_dovecot(request):
    """A Dovecot on the ports conf/users names, knowing alice@example.com / secret."""
    ports = conf_ports()
    assert ports['listen'] == [1143, 1110, 1587] and ports['imap'] == 10143
    busy = [p for p in ports['listen'] + [ports['imap'], ports['pop3']] if not port_free(p)]
    if busy:
        unavailable('ports %s are in use: the README test needs conf/mail.conf\'s ports'
                    % busy)
    d = Dovecot(users={'alice@example.com': 'secret'})
    d.imap_port, d.pop3_port = ports['imap'], ports['pop3']
    try:
        yield d.start()
    finally:
        d.stop(remove=False)
        from tests.support import dump_on_failure
        dump_on_failure(request, 'dovecot log', d.log_text())
        d.remove()


def test_readme_first_login(readme_dovecot, tmp_path):
    if shutil.which('curl') is None:
        unavailable('curl is not installed')
    commands, section = readme_first_login()
    readme_dovecot.deliver('alice@example.com', message(500, 'welcome'))
    out = open(tmp_path / 'gmailproxy.out', 'wb')
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, '-m', 'gmailproxy', 'conf/mail.conf'],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        for port in conf_ports()['listen']:
            wait_port('127.0.0.1', port, 15, proc=proc, what='gmailproxy conf/mail.conf')
        for command in commands:
            argv = shlex.split(command)
            run = subprocess.run(argv[:1] + ['-sS', '--max-time', '15'] + argv[1:],
                                 capture_output=True, timeout=30)
            assert run.returncode == 0, (command, run.stderr)
            if command.startswith('curl -u alice@example.com:secret imap://'):
                assert run.stdout == b'* LIST (\\HasNoChildren) "." INBOX\r\n', run.stdout
                assert '`* LIST (\\HasNoChildren) "." INBOX`' in section
            else:
                assert re.match(rb'1 \d+\r\n\Z', run.stdout), run.stdout   # POP3 LIST
        # "A wrong password is answered NO Invalid login or password after 3 seconds"
        imap = imaplib.IMAP4('127.0.0.1', 1143, timeout=10)
        began = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match='Invalid login or password'):
            imap.login('alice@example.com', 'wrong')
        assert 2.9 < time.monotonic() - began < 6
        assert imap.login('alice@example.com', 'secret')[0] == 'OK'   # it may try again
        imap.logout()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        out.close()
    log = (tmp_path / 'gmailproxy.out').read_text(errors='replace')
    documented = re.search(r'gmailproxy logs\n?`(client logged in[^`]*)`', section).group(1)
    assert ' '.join(documented.split()) in log, log
    assert 'secret' not in log
