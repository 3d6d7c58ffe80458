"""Limits (issue 12 item 4), in-process: each limit hit, answered with the protocol's
temporary-failure reply and logged, then recovered; the auth cache honouring a password
change."""
import base64
import re

import gevent
import pytest

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
    server { listen 127.0.0.1:{port3}; protocol smtp; }
}
'''
GREETINGS = {'imap': b'* OK IMAP4 ready\r\n', 'pop3': b'+OK POP3 ready\r\n',
             'smtp': b'220 mx.example.com ESMTP ready\r\n'}
WAIT = 5.0


pytestmark = pytest.mark.usefixtures('clean_limits')


@pytest.fixture
def backends(backends, auth):
    """The shared backends (conftest.py), with bob/secret as a second user."""
    auth.users['bob'] = {'password': 'secret'}
    return backends


def start(mailproxy, directives):
    return mailproxy(CONF % directives)


def port_of(proxy, proto):
    return proxy.ports[('imap', 'pop3', 'smtp').index(proto)]


def greeted(proxy, proto='imap'):
    return proxy.client(port_of(proxy, proto), greeting=GREETINGS[proto])


def login(c, proto, user=b'alice', password=b'secret'):
    """Send the credentials; return the proxy's answer to them."""
    if proto == 'imap':
        c.send(b'a1 LOGIN ' + user + b' ' + password + b'\r\n')
        return c.readline()
    if proto == 'pop3':
        c.send(b'USER ' + user + b'\r\n')
        c.expect(b'+OK\r\n')
        c.send(b'PASS ' + password + b'\r\n')
        return c.readline()
    c.send(b'EHLO client.example\r\n')
    c.read_lines_until(b'250 ')
    c.send(b'AUTH PLAIN ' + base64.b64encode(b'\0' + user + b'\0' + password) + b'\r\n')
    return c.readline()


LOGGED_IN = {'imap': b'a1 OK logged in\r\n', 'pop3': b'+OK\r\n',
             'smtp': b'235 2.0.0 OK\r\n'}


def eventually(check, what):
    """Retry ``check()`` (True when done) until WAIT seconds passed."""
    with gevent.Timeout(WAIT, AssertionError('never: %s' % what)):
        while not check():
            gevent.sleep(0.02)


def admitted(proxy, proto):
    """A new connection gets the greeting (not the refusal); closes it."""
    c = proxy.client(port_of(proxy, proto))
    try:
        return c.readline() == GREETINGS[proto]
    finally:
        c.close()


# --- concurrent sessions per address --------------------------------------------------

@pytest.mark.parametrize('proto, reply', [
    ('imap', b'* BYE [UNAVAILABLE] Too many connections from your address\r\n'),
    ('pop3', b'-ERR [SYS/TEMP] Too many connections from your address\r\n'),
    ('smtp', b'421 4.7.0 Too many connections from your address\r\n'),
])
def test_sessions_per_address_hit_and_recovered(mailproxy, backends, proto, reply):
    proxy = start(mailproxy, 'max_sessions_per_address 2;')
    first, second = greeted(proxy, proto), greeted(proxy, proto)
    refused = proxy.client(port_of(proxy, proto))
    refused.expect(reply)
    assert refused.closed()
    proxy.wait_log(r'\[warn\] \d+#\d+: \*\d+ too many connections from this address '
                   r'\(limit 2\) while sending client greeting line, '
                   r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d'
                   % port_of(proxy, proto))
    other = 'pop3' if proto == 'imap' else 'imap'
    greeted(proxy, other).close()           # counted per protocol
    first.close()
    eventually(lambda: admitted(proxy, proto), 'a slot freed by a closed connection')
    second.close()


def test_logged_in_sessions_hold_their_address_slot(mailproxy, backends):
    proxy = start(mailproxy, 'max_sessions_per_address 1;')
    c = greeted(proxy)
    assert login(c, 'imap') == LOGGED_IN['imap']
    c.send(b'a2 NOOP\r\n')
    c.expect(b'a2 OK done\r\n')
    refused = proxy.client()
    refused.expect(b'* BYE [UNAVAILABLE] Too many connections from your address\r\n')
    c.send(b'a3 LOGOUT\r\n')
    c.expect(b'* BYE bye\r\na3 OK logged out\r\n')
    eventually(lambda: admitted(proxy, 'imap'), 'the slot of a proxied session back')


# --- concurrent sessions per login ----------------------------------------------------

@pytest.mark.parametrize('proto, reply', [
    ('imap', b'a1 NO [UNAVAILABLE] Too many sessions for this user\r\n'),
    ('pop3', b'-ERR [SYS/TEMP] Too many sessions for this user\r\n'),
    ('smtp', b'421 4.7.0 Too many sessions for this user\r\n'),
])
def test_sessions_per_login_hit_and_recovered(mailproxy, backends, auth, proto, reply):
    proxy = start(mailproxy, 'max_sessions_per_login 1;')
    first = greeted(proxy, proto)
    assert login(first, proto) == LOGGED_IN[proto]
    second = greeted(proxy, proto)
    assert login(second, proto) == reply
    assert second.closed()
    proxy.wait_log(r'\[warn\] \d+#\d+: \*\d+ too many sessions for this login '
                   r'\(limit 1\) while in http auth state, client: 127\.0\.0\.1, '
                   r'server: 127\.0\.0\.1:%d, login: "alice"' % port_of(proxy, proto))
    assert backends[proto].connections == 1      # refused before the backend
    other = greeted(proxy, proto)
    assert login(other, proto, user=b'bob') == LOGGED_IN[proto]
    first.close()

    def third_logs_in():
        c = greeted(proxy, proto)
        try:
            return login(c, proto) == LOGGED_IN[proto]
        finally:
            c.close()
    eventually(third_logs_in, 'the login slot back after the first session ended')
    other.close()


# --- failed logins per address over a window ------------------------------------------

@pytest.mark.parametrize('proto, failed, reply', [
    ('imap', b'a1 NO Invalid login or password\r\n',
     b'a1 NO [UNAVAILABLE] Too many failed logins, try again later\r\n'),
    ('pop3', b'-ERR Invalid login or password\r\n',
     b'-ERR [SYS/TEMP] Too many failed logins, try again later\r\n'),
    ('smtp', b'535 5.7.0 Invalid login or password\r\n',
     b'421 4.7.0 Too many failed logins, try again later\r\n'),
])
def test_failed_logins_window_hit_and_recovered(mailproxy, backends, auth, proto,
                                                failed, reply):
    proxy = start(mailproxy, 'max_login_failures 2 1s;')
    for _ in range(2):
        c = greeted(proxy, proto)
        assert login(c, proto, password=b'wrong') == failed
        c.close()
    asked = len(auth.wait_requests(2))
    c = greeted(proxy, proto)
    assert login(c, proto) == reply                 # even the right password
    assert c.closed()
    assert len(auth.requests) == asked              # the auth service was not asked
    proxy.wait_log(r'\[warn\] \d+#\d+: \*\d+ too many failed logins from this address '
                   r'\(limit 2 in 1s\) while in http auth state, client: 127\.0\.0\.1, '
                   r'server: 127\.0\.0\.1:%d, login: "alice"' % port_of(proxy, proto))
    other = 'smtp' if proto != 'smtp' else 'imap'   # counted per address, any protocol
    c = greeted(proxy, other)
    assert login(c, other) != LOGGED_IN[other]
    c.close()
    gevent.sleep(1.05)                               # the window passes
    c = greeted(proxy, proto)
    assert login(c, proto) == LOGGED_IN[proto]
    c.close()


def test_failures_with_auth_wait_refuse_within_the_session(mailproxy, backends, auth):
    proxy = start(mailproxy, 'max_login_failures 2 1m;')
    auth.users['alice']['status'] = 'Temporary rejection'
    auth.users['alice']['wait'] = 1
    c = greeted(proxy)
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 NO Temporary rejection\r\n', timeout=WAIT)
    c.send(b'a2 LOGIN alice secret\r\n')
    c.expect(b'a2 NO Temporary rejection\r\n', timeout=WAIT)
    c.send(b'a3 LOGIN alice secret\r\n')
    c.expect(b'a3 NO [UNAVAILABLE] Too many failed logins, try again later\r\n')
    assert c.closed()
    assert len(auth.requests) == 2


def test_limits_off_by_default(mailproxy, backends, auth):
    proxy = start(mailproxy, '')
    assert proxy.config.servers[0].tracked is False
    clients = [greeted(proxy) for _ in range(3)]
    for c in clients:
        assert login(c, 'imap') == LOGGED_IN['imap']
    for _ in range(3):
        c = greeted(proxy)
        answer = login(c, 'imap', password=b'bad')
        assert answer == b'a1 NO Invalid login or password\r\n'
        c.close()
    for c in clients:
        c.close()


# --- the auth cache -------------------------------------------------------------------

def imap_login(proxy, password):
    c = greeted(proxy)
    try:
        return login(c, 'imap', password=password)
    finally:
        c.close()


def test_auth_cache_honours_a_password_change(mailproxy, backends, auth):
    proxy = start(mailproxy, 'auth_cache 100; auth_cache_ttl 1m; '
                             'auth_cache_negative_ttl 1m;')
    assert imap_login(proxy, b'secret') == LOGGED_IN['imap']
    assert imap_login(proxy, b'secret') == LOGGED_IN['imap']
    assert len(auth.requests) == 1                  # the second answer: from the cache
    auth.users['alice']['password'] = 'changed'
    assert imap_login(proxy, b'changed') == LOGGED_IN['imap']    # not the old answer
    assert len(auth.requests) == 2
    assert imap_login(proxy, b'changed') == LOGGED_IN['imap']
    assert len(auth.requests) == 2
    bad = b'a1 NO Invalid login or password\r\n'
    assert imap_login(proxy, b'guess') == bad
    assert imap_login(proxy, b'guess') == bad       # a cached rejection, same words
    assert len(auth.requests) == 3
    assert [re.search(rb'Auth-Pass: (\S*)', r).group(1) for r in auth.requests] == [
        b'secret', b'changed', b'guess']
    assert 'client login failed: "Invalid login or password"' in proxy.log_text()
    assert 'secret' not in proxy.log_text() and 'changed' not in proxy.log_text()


def test_auth_cache_expires_and_skips_salted_methods(mailproxy, backends, auth):
    proxy = start(mailproxy, 'auth_cache 100; auth_cache_ttl 300ms; '
                             'auth_cache_negative_ttl 0; pop3_auth plain apop;')
    assert imap_login(proxy, b'secret') == LOGGED_IN['imap']
    assert imap_login(proxy, b'secret') == LOGGED_IN['imap']
    assert len(auth.requests) == 1
    gevent.sleep(0.35)
    assert imap_login(proxy, b'secret') == LOGGED_IN['imap']
    assert len(auth.requests) == 2
    for _ in range(2):                              # negative_ttl 0: never cached
        assert imap_login(proxy, b'bad') == b'a1 NO Invalid login or password\r\n'
    assert len(auth.requests) == 4
    import hashlib
    for _ in range(2):                              # APOP: the digest changes each time
        c = proxy.client(proxy.ports[1])
        salt = re.match(rb'\+OK POP3 ready (<[^>]+>)\r\n', c.readline()).group(1)
        digest = hashlib.md5(salt + b'secret').hexdigest().encode()
        c.send(b'APOP alice ' + digest + b'\r\n')
        c.expect(b'+OK\r\n')
        c.close()
    assert len(auth.requests) == 6


def test_cached_login_keeps_the_answers_login(mailproxy, backends, auth):
    """A hit applies the answer as interpret() does: Auth-User/Auth-Pass go to the
    backend again."""
    auth.users['alice'].update({'user': 'alice@example.com', 'pass': 'backend-pw'})
    proxy = start(mailproxy, 'auth_cache 10;')
    for _ in range(2):
        assert imap_login(proxy, b'secret') == LOGGED_IN['imap']
    assert len(auth.requests) == 1
    logins = [line for line in backends['imap'].lines if b'LOGIN' in line]
    assert len(logins) == 2
    assert backends['imap'].lines.count(b'alice@example.com {10}\r\n') == 2
    assert backends['imap'].lines.count(b'backend-pw\r\n') == 2
