"""The real client address end to end: client -> HAProxy (send-proxy-v2) -> gmailproxy
(listen ... proxy_protocol, set_real_ip_from) -> real Dovecot, which learns the client
from our PROXY header (its haproxy listener) or from IMAP ID (login_trusted_networks).

HAProxy reaches gmailproxy from 127.0.0.1; the clients connect from 127.0.0.2 or ::1,
so any other address in Dovecot's log came through the whole chain.
"""
import imaplib
import re
import socket
import time

import pytest

from tests.support.net import free_port

T = 10
CONF = '''
events { }
mail {
    auth_http %(auth)s;
    timeout 10s;
    set_real_ip_from 127.0.0.1;
    %(directives)s
    server {
        listen 127.0.0.1:%(port)d proxy_protocol;
        protocol imap;
    }
}
'''
# Dovecot's login line with the ports too (its default shows only rip and lip).
DOVECOT_LOG_FORMAT = ('login_log_format_elements = user=<%u> method=%m rip=%r '
                      'rport=%{rport} lip=%l lport=%{lport} mpid=%e %c '
                      'session=<%{session}>\n')


class IMAP4From(imaplib.IMAP4):
    """imaplib from a chosen source address (127.0.0.2 is loopback too on Linux)."""

    def __init__(self, source, host, port, timeout):
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        family = socket.AF_INET6 if ':' in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.bind((self.source, 0))
        sock.connect((self.host, self.port))
        return sock


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(('::1', 0))
        return True
    except OSError:
        return False


def wait_for(read, pattern, timeout=T):
    """The first match of ``pattern`` in ``read()``, polled (Dovecot logs late)."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, read())
        if m or time.monotonic() > deadline:
            assert m, 'no %r in:\n%s' % (pattern, read())
            return m
        time.sleep(0.05)


def wait_listening(host, port):
    """Until something listens on ``host:port``, found by failing to bind it: a test
    connection would make gmailproxy log a broken header (as nginx does)."""
    deadline = time.monotonic() + T
    while True:
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return
        assert time.monotonic() < deadline, 'nothing listens on %s' % port
        time.sleep(0.05)


def chain(gmailproxy, haproxy, auth, backend_port, directives, client_host):
    """gmailproxy, and HAProxy in front of it listening on ``client_host``;
    returns (HAProxy's port, the proxy, gmailproxy's port)."""
    auth.users = {'alice': {'password': 'secret', 'port': backend_port}}
    port = free_port()
    proxy = gmailproxy(CONF % {'auth': auth.url, 'port': port,
                               'directives': directives})
    wait_listening('127.0.0.1', port)
    front = free_port(client_host)
    haproxy('listen imap\n    bind %s:%d\n'
            '    server gmailproxy 127.0.0.1:%d send-proxy-v2\n'
            % (client_host, front, port))
    wait_listening(client_host, front)
    return front, proxy, port


def login_from(source, host, port):
    imap = IMAP4From(source, host, port, timeout=T)
    cport = imap.sock.getsockname()[1]
    assert imap.login('alice', 'secret')[0] == 'OK'
    assert imap.select('INBOX')[0] == 'OK'
    imap.logout()
    return cport


NO_IPV6 = pytest.mark.skipif(not ipv6_loopback(), reason='no IPv6 loopback')
# lip: our local address as our header gave it; an IPv4 end is written v4-mapped when
# the other end is IPv6 (proxy.md section 4 for v2; beyond nginx for v1: Dovecot refuses
# nginx's mixed-family line as "Proxied local address is invalid").
CLIENTS = [pytest.param('127.0.0.2', 'on', '127.0.0.1', id='ipv4-v1'),
           pytest.param('127.0.0.2', 'v2', '127.0.0.1', id='ipv4-v2'),
           pytest.param('::1', 'on', '::ffff:127.0.0.1', id='ipv6-v1', marks=NO_IPV6),
           pytest.param('::1', 'v2', '::ffff:127.0.0.1', id='ipv6-v2', marks=NO_IPV6)]


@pytest.mark.parametrize('client, version, lip', CLIENTS)
def test_haproxy_gmailproxy_dovecot_via_proxy_protocol(
        make_dovecot, haproxy, gmailproxy, auth, client, version, lip):
    dovecot = make_dovecot(haproxy=True, extra_conf=DOVECOT_LOG_FORMAT)
    front, proxy, port = chain(gmailproxy, haproxy, auth, dovecot.imap_haproxy_port,
                               'proxy_protocol %s;' % version, client)
    cport = login_from(client, client, front)

    # gmailproxy: the TCP peer is HAProxy, every later line names the real client
    log = proxy.wait_log('proxied session done')
    assert re.search(r'\[info\] \d+#\d+: \*\d+ client 127\.0\.0\.1:\d+ connected to '
                     r'127\.0\.0\.1:%d\n' % port, log)
    assert re.search(r'client logged in, client: %s, server: 127\.0\.0\.1:%d, '
                     r'login: "alice", upstream: 127\.0\.0\.1:%d\n'
                     % (re.escape(client), port, dovecot.imap_haproxy_port), log)
    # auth_http: Client-IP is the real client; Proxy-Protocol-* is what HAProxy said
    addr = client.encode()
    assert (b'\r\nClient-IP: %s\r\nProxy-Protocol-Addr: %s\r\n'
            b'Proxy-Protocol-Port: %d\r\nProxy-Protocol-Server-Addr: %s\r\n'
            b'Proxy-Protocol-Server-Port: %d\r\n' % (addr, addr, cport, addr, front)
            in auth.wait_requests(1)[0])
    # Dovecot: from our PROXY header, the client and the address it connected to
    wait_for(dovecot.log_text,
             r'imap-login: Info: Login: user=<alice>, method=PLAIN, rip=%s, rport=%d, '
             r'lip=%s, lport=%d, ' % (re.escape(client), cport, re.escape(lip), port))


def test_haproxy_gmailproxy_dovecot_via_imap_id(make_dovecot, haproxy, gmailproxy,
                                                auth):
    dovecot = make_dovecot(extra_conf=DOVECOT_LOG_FORMAT)
    front, proxy, port = chain(gmailproxy, haproxy, auth, dovecot.imap_port,
                               'imap_forward_client_id on;', '127.0.0.2')
    cport = login_from('127.0.0.2', '127.0.0.2', front)

    log = proxy.wait_log('proxied session done')
    pid, n = re.search(r'\] (\d+)#\d+: \*(\d+) client logged in, '
                       r'client: 127\.0\.0\.2, ', log).groups()
    # Dovecot: its plain listener, yet the client's address and port, and our session
    wait_for(dovecot.log_text,
             r'imap-login: Info: Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.2, '
             r'rport=%d, lip=127\.0\.0\.1, lport=%d, .*session=<%s-%s>'
             % (cport, port, pid, n))


def test_without_forwarding_dovecot_sees_the_proxy(make_dovecot, haproxy, gmailproxy,
                                                   auth):
    """The control: realip alone changes our logs, not what Dovecot sees."""
    dovecot = make_dovecot()
    front, proxy, port = chain(gmailproxy, haproxy, auth, dovecot.imap_port, '',
                               '127.0.0.2')
    login_from('127.0.0.2', '127.0.0.2', front)
    proxy.wait_log('client logged in, client: 127.0.0.2,')
    wait_for(dovecot.log_text, r'Login: user=<alice>, method=PLAIN, rip=127\.0\.0\.1, ')
