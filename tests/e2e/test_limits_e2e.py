"""Limits and the auth cache end to end (issue 12): imaplib, poplib and smtplib ->
gmailproxy (subprocess) -> the recording auth service and real Dovecot / Postfix.

Each limit is hit, answered with the protocol's own temporary-failure reply, logged at
``warn`` with the words of gmailproxy/limits.py, and recovered from: a held session ends
(``max_sessions_per_address``, ``max_sessions_per_login``) or the window passes
(``max_login_failures``) and the next login reaches the backend and works there. The
failure table stays bounded (``limit_table_size``: the least recently failed address is
forgotten). The auth cache answers a repeated login without asking the auth service,
still logs in to the backend each time, meets a new password with a fresh question and
keeps an old one only for what its entry has left to live.

Clients connect from 127.0.0.2 (or 127.0.0.3-5) so the log lines prove the limits count
the client's address, not the proxy's.
"""
import imaplib
import os
import poplib
import re
import smtplib
import socket
import time

import pytest

from tests.support.net import free_ports

CLIENT = '127.0.0.2'
TIMEOUT = 10
SERVER = '    server { listen 127.0.0.1:%d; protocol %s; }\n'
CONF = '''
events { }
mail {
    auth_http %(auth)s;
    auth_http_keepalive off;
    timeout 10s;
    server_name mx.test.example;
    %(limits)s
%(servers)s}
'''
PROTOCOLS = ('imap', 'pop3', 'smtp')

# The replies, as the client library hands them over (the IMAP tag left out).
LIMIT_ADDRESS = {'imap': b'* BYE [UNAVAILABLE] Too many connections from your address',
                 'pop3': b'-ERR [SYS/TEMP] Too many connections from your address',
                 'smtp': b'421 4.7.0 Too many connections from your address'}
LIMIT_LOGIN = {'imap': b'NO [UNAVAILABLE] Too many sessions for this user',
               'pop3': b'-ERR [SYS/TEMP] Too many sessions for this user',
               'smtp': b'421 4.7.0 Too many sessions for this user'}
LIMIT_FAILURES = {
    'imap': b'NO [UNAVAILABLE] Too many failed logins, try again later',
    'pop3': b'-ERR [SYS/TEMP] Too many failed logins, try again later',
    'smtp': b'421 4.7.0 Too many failed logins, try again later'}
INVALID = {'imap': b'NO Invalid login or password',
           'pop3': b'-ERR Invalid login or password',
           'smtp': b'535 5.7.0 Invalid login or password'}


# --- clients ---------------------------------------------------------------------------

class Refused(Exception):
    """The server's answer instead of the greeting or the login: ``line``."""

    def __init__(self, line: bytes):
        super().__init__(line)
        self.line = line


def _connect(self, timeout):
    """``_create_socket`` of imaplib/poplib, from the client's own address."""
    return socket.create_connection((self.host, self.port), timeout,
                                    source_address=(self.source, 0))


class _IMAP4(imaplib.IMAP4):
    """imaplib from ``source``, keeping every line it read (``lines``)."""
    _create_socket = _connect

    def __init__(self, port, source):
        self.source, self.lines = source, []
        super().__init__('127.0.0.1', port, timeout=TIMEOUT)

    def _get_line(self):
        line = super()._get_line()
        self.lines.append(line)
        return line


class _POP3(poplib.POP3):
    _create_socket = _connect

    def __init__(self, port, source):
        self.source = source
        super().__init__('127.0.0.1', port, timeout=TIMEOUT)


class Imap:
    def __init__(self, port, source=CLIENT):
        try:
            self.c = _IMAP4(port, source)
        except imaplib.IMAP4.error as e:        # a greeting other than * OK: that line
            raise Refused(e.args[0]) from None
        self.sock = self.c.sock

    def login(self, user, password):
        try:
            self.c.login(user, password)
        except (imaplib.IMAP4.error, imaplib.IMAP4.abort):
            last = self.c.lines[-1]             # untagged, or the tagged answer
            raise Refused(last if last.startswith(b'* ') else
                          last.split(b' ', 1)[1]) from None

    def work(self):
        assert self.c.select('INBOX')[0] == 'OK'
        assert self.c.noop()[0] == 'OK'

    def quit(self):
        assert self.c.logout()[0] == 'BYE'

    def close(self):
        self.c.shutdown()


class Pop3:
    def __init__(self, port, source=CLIENT):
        try:
            self.c = _POP3(port, source)
        except poplib.error_proto as e:
            raise Refused(e.args[0]) from None
        self.sock = self.c.sock

    def login(self, user, password):
        try:
            assert self.c.user(user) == b'+OK'
            self.c.pass_(password)
        except poplib.error_proto as e:
            raise Refused(e.args[0]) from None

    def work(self):
        assert self.c.stat() == (0, 0)          # Dovecot's answer for an empty drop
        assert self.c.noop().startswith(b'+OK')

    def quit(self):
        assert self.c.quit().startswith(b'+OK')

    def close(self):
        self.c.close()


class Smtp:
    def __init__(self, port, source=CLIENT):
        try:
            self.c = smtplib.SMTP('127.0.0.1', port, local_hostname='client.test.example',
                                  source_address=(source, 0), timeout=TIMEOUT)
        except smtplib.SMTPConnectError as e:
            raise Refused(b'%d %s' % (e.smtp_code, e.smtp_error)) from None
        self.sock = self.c.sock

    def login(self, user, password):
        self.c.ehlo()
        self.c.user, self.c.password = user, password
        try:                # one mechanism: smtplib.login() would retry with LOGIN
            self.c.auth('PLAIN', self.c.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            raise Refused(b'%d %s' % (e.smtp_code, e.smtp_error)) from None

    def work(self):
        assert self.c.noop() == (250, b'2.0.0 Ok')     # Postfix's words, not the proxy's

    def quit(self):
        assert self.c.quit()[0] == 221

    def close(self):
        self.c.close()


CLIENTS = {'imap': Imap, 'pop3': Pop3, 'smtp': Smtp}


def refused(make, *args) -> bytes:
    """The refusal line of ``make(*args)`` (a client connecting, or a login)."""
    with pytest.raises(Refused) as e:
        make(*args)
    return e.value.line


def logged_in(proxy, proto, user='alice', password='secret', source=CLIENT):
    """A new client of ``proto`` logged in (else Refused)."""
    c = CLIENTS[proto](proxy.ports[proto], source)
    try:
        c.login(user, password)
    except Refused:
        c.close()
        raise
    return c


def answer(proxy, proto, user='alice', password='secret', source=CLIENT) -> bytes:
    """The refusal line of a whole login attempt on a new connection, then closed."""
    c = CLIENTS[proto](proxy.ports[proto], source)
    try:
        return refused(c.login, user, password)
    finally:
        c.close()


def closed_by_server(c) -> bool:
    """The server closed the client's connection (nothing more to read)."""
    c.sock.settimeout(5)
    try:
        return c.sock.recv(1) == b''
    except ConnectionResetError:
        return True


def until(check, what, timeout=5.0):
    """Retry ``check()`` every 50 ms while it returns something false or raises
    Refused; its first true result."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except Refused as e:
            last = e.line
        if time.monotonic() > deadline:
            raise AssertionError('never %s: %r' % (what, last))
        time.sleep(0.05)


def warned(proxy, text):
    """Wait for ``text`` in the log; check it is a whole ``[warn]`` session line."""
    log = proxy.wait_log(text)
    line = r'(?m)^\S+ \S+ \[warn\] \d+#\d+: \*\d+ %s$' % re.escape(text)
    assert re.search(line, log), log
    return log


# --- the proxy -------------------------------------------------------------------------

@pytest.fixture
def limited(request, gmailproxy, auth, dovecot):
    """``limited(directives, protocols=...)`` -> started proxy with ``.ports[proto]``,
    alice/secret and bob/hunter2 known to the auth service and to Dovecot (Postfix
    only when SMTP is served)."""
    def make(directives, protocols=PROTOCOLS):
        ports = dict(zip(protocols, free_ports(len(protocols))))
        auth.users = {'alice': {'password': 'secret'}, 'bob': {'password': 'hunter2'}}
        auth.ports = {'imap': dovecot.imap_port, 'pop3': dovecot.pop3_port}
        if 'smtp' in protocols:
            auth.ports['smtp'] = request.getfixturevalue('postfix').port
        conf = CONF % {'auth': auth.url, 'limits': directives,
                       'servers': ''.join(SERVER % (p, n) for n, p in ports.items())}
        proxy = gmailproxy(conf, ports=list(ports.values()))
        proxy.ports = ports
        return proxy
    return make


def server(proxy, proto) -> str:
    return 'client: %s, server: 127.0.0.1:%d' % (CLIENT, proxy.ports[proto])


# --- max_sessions_per_address ----------------------------------------------------------

@pytest.mark.parametrize('proto', PROTOCOLS)
def test_sessions_per_address_hit_and_recovered(limited, proto):
    """Two logged-in sessions hold the address's two slots; the third connection gets
    the refusal instead of the greeting; once one logs out a new one logs in."""
    proxy = limited('max_sessions_per_address 2;', (proto,))
    held = [logged_in(proxy, proto), logged_in(proxy, proto)]
    for c in held:
        c.work()
    assert refused(CLIENTS[proto], proxy.ports[proto]) == LIMIT_ADDRESS[proto]
    warned(proxy, 'too many connections from this address (limit 2) while sending '
                  'client greeting line, ' + server(proxy, proto))
    held[1].work()                              # the held sessions are untouched
    held.pop(0).quit()
    again = until(lambda: logged_in(proxy, proto, 'bob', 'hunter2'),
                  'admitted after a logout')
    again.work()
    assert refused(CLIENTS[proto], proxy.ports[proto]) == LIMIT_ADDRESS[proto]
    for c in held + [again]:
        c.quit()


# --- max_sessions_per_login ------------------------------------------------------------

@pytest.mark.parametrize('proto', PROTOCOLS)
def test_sessions_per_login_hit_and_recovered(limited, auth, dovecot, proto):
    """alice's second session is refused after the auth answer (so the auth service
    was asked, the backend not), bob from the same address logs in, and alice can log
    in again once her first session ended."""
    proxy = limited('max_sessions_per_login 1;', (proto,))
    first = logged_in(proxy, proto)
    first.work()
    second = CLIENTS[proto](proxy.ports[proto])
    assert refused(second.login, 'alice', 'secret') == LIMIT_LOGIN[proto]
    assert closed_by_server(second)
    second.close()
    assert len(auth.wait_requests(2)) == 2
    warned(proxy, 'too many sessions for this login (limit 1) while in http auth '
                  'state, %s, login: "alice"' % server(proxy, proto))
    assert proxy.log_text().count('client logged in') == 1     # no backend login
    bob = logged_in(proxy, proto, 'bob', 'hunter2')
    bob.work()
    first.work()
    first.quit()
    again = until(lambda: logged_in(proxy, proto), 'alice back after her logout')
    again.work()
    again.quit()
    bob.quit()


# --- max_login_failures ----------------------------------------------------------------

def test_login_failures_window_hit_and_recovered(limited, auth):
    """Three wrong passwords within 2 s from one address, one per protocol (they count
    across protocols): then even the right password is refused in each protocol,
    without asking the auth service, until the window passes."""
    proxy = limited('max_login_failures 3 2s;')
    began = time.monotonic()
    for proto in PROTOCOLS:
        assert answer(proxy, proto, password='wrong') == INVALID[proto]
    assert len(auth.wait_requests(3)) == 3
    for proto in PROTOCOLS:
        c = CLIENTS[proto](proxy.ports[proto])
        assert refused(c.login, 'alice', 'secret') == LIMIT_FAILURES[proto]
        assert closed_by_server(c)
        c.close()
        warned(proxy, 'too many failed logins from this address (limit 3 in 2s) while '
                      'in http auth state, %s, login: "alice"' % server(proxy, proto))
    assert len(auth.requests) == 3
    c = until(lambda: logged_in(proxy, 'imap'), 'admitted after the window', 5)
    assert time.monotonic() - began >= 2.0
    assert len(auth.requests) == 4              # polled refusals never asked either
    c.work()
    for proto in ('pop3', 'smtp'):
        other = logged_in(proxy, proto)
        other.work()
        other.quit()
    c.quit()


def test_failure_table_is_bounded(limited):
    """``limit_table_size 2``: a third failing address pushes out the least recently
    failed one, which may log in again; the two latest stay refused."""
    proxy = limited('limit_table_size 2; max_login_failures 1 1m;', ('imap',))
    first, second, third = '127.0.0.3', '127.0.0.4', '127.0.0.5'
    assert answer(proxy, 'imap', password='wrong', source=first) == INVALID['imap']
    assert answer(proxy, 'imap', source=first) == LIMIT_FAILURES['imap']
    for source in (second, third):
        assert answer(proxy, 'imap', password='wrong', source=source) == INVALID['imap']
    c = logged_in(proxy, 'imap', source=first)     # forgotten: the table held two
    c.work()
    c.quit()
    for source in (second, third):
        assert answer(proxy, 'imap', source=source) == LIMIT_FAILURES['imap']


# --- the auth cache --------------------------------------------------------------------

def set_dovecot_password(dovecot, user, password):
    """Change ``user``'s password in Dovecot's passwd-file, and wait until Dovecot
    takes it: it looks at the file at most once per wall-clock second (and a login
    failing meanwhile would earn the address a growing auth penalty)."""
    path = dovecot.dir / 'users'
    lines = [re.sub(r'^(%s:\{PLAIN\})[^:]*' % re.escape(user), r'\g<1>' + password, line)
             for line in path.read_text().splitlines(True)]
    tmp = path.with_suffix('.new')
    tmp.write_text(''.join(lines))
    os.replace(tmp, path)
    time.sleep(1.05 - time.time() % 1)
    with imaplib.IMAP4('127.0.0.1', dovecot.imap_port, timeout=TIMEOUT) as imap:
        assert imap.login(user, password)[0] == 'OK'


def backend_logins(dovecot, user) -> int:
    return dovecot.log_text().count('Login: user=<%s>' % user)


def session(proxy, password, user='alice'):
    """An IMAP login with SELECT/NOOP through to Dovecot, logged out."""
    c = logged_in(proxy, 'imap', user, password)
    c.work()
    c.quit()


def test_auth_cache_answers_repeats_and_honours_a_password_change(limited, auth,
                                                                   dovecot):
    """Dovecot checks the password too: a repeated login is answered from the cache
    (one auth request) and still logs in to Dovecot; after the password changed the
    new one is asked about and works; the old one meets its cached OK, but Dovecot
    refuses it, so the client gets no session. Rejections are cached too."""
    proxy = limited('auth_cache 100; auth_cache_ttl 60s; auth_cache_negative_ttl 10s;',
                    ('imap',))
    session(proxy, 'secret')
    session(proxy, 'secret')
    assert len(auth.requests) == 1
    assert auth.parsed[0].unescaped('Auth-Pass') == 'secret'
    until(lambda: backend_logins(dovecot, 'alice') == 2, 'two logins to Dovecot')

    auth.users['alice']['password'] = 'changed'
    set_dovecot_password(dovecot, 'alice', 'changed')
    session(proxy, 'changed')                   # a new key: the auth service is asked
    session(proxy, 'changed')
    assert [r.unescaped('Auth-Pass') for r in auth.parsed] == ['secret', 'changed']

    # The old password: still a cached OK for the proxy (no auth request), but the
    # login it replays is Dovecot's to judge.
    c = Imap(proxy.ports['imap'])
    line = refused(c.login, 'alice', 'secret')
    c.close()
    assert line == b'* BAD internal server error'
    assert len(auth.requests) == 2
    proxy.wait_log('upstream sent invalid response: ')
    assert re.search(r'\[error\] \d+#\d+: \*\d+ upstream sent invalid response: '
                     r'"\S+ NO \[AUTHENTICATIONFAILED\] Authentication failed\." while '
                     r'reading response from upstream, %s, login: "alice", upstream: '
                     r'127\.0\.0\.1:%d' % (re.escape(server(proxy, 'imap')),
                                           dovecot.imap_port), proxy.log_text())

    for _ in range(2):                          # negative cache: asked once
        assert answer(proxy, 'imap', password='guess') == INVALID['imap']
    assert [r.unescaped('Auth-Pass') for r in auth.parsed] == ['secret', 'changed',
                                                               'guess']
    log = proxy.log_text()
    assert log.count('client login failed: "Invalid login or password"') == 2
    assert 'secret' not in log and 'changed' not in log and 'guess' not in log


def test_auth_cache_keeps_an_old_password_until_its_entry_expires(limited, auth):
    """The auth service hands the backend its credential (Auth-Pass), so its answer is
    the last word: after a password change the old password keeps working from the
    cache (documented: until its entry expires), then it is asked about and rejected."""
    proxy = limited('auth_cache 100; auth_cache_ttl 2s;', ('imap',))
    auth.users['alice']['pass'] = 'secret'          # what the proxy gives Dovecot
    stored = time.monotonic()
    session(proxy, 'secret')
    auth.users['alice']['password'] = 'changed'     # Dovecot keeps 'secret'
    session(proxy, 'changed')
    session(proxy, 'secret')                        # the cached OK
    alive = time.monotonic() - stored
    assert [r.unescaped('Auth-Pass') for r in auth.parsed] == ['secret', 'changed']
    assert alive < 2, 'too slow to see the entry alive (%.2fs)' % alive

    def old_password_rejected():
        try:
            session(proxy, 'secret')            # still the cached OK
        except Refused as e:
            return e.line
        return None
    line = until(old_password_rejected, 'the old password rejected')
    assert line == INVALID['imap']
    assert time.monotonic() - stored >= 2
    assert [r.unescaped('Auth-Pass') for r in auth.parsed] == ['secret', 'changed',
                                                               'secret']
