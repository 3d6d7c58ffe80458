"""PROXY protocol from clients and to backends, set_real_ip_from, and the client address
passed on in IMAP ID and Client-Port (realip_proxy_protocol.md, proxy.md section 4).

The test clients connect from 127.0.0.1 (or ::1); ``set_real_ip_from`` decides whether
that peer may name the real client in its PROXY header.
"""
import re
import socket
import time

import pytest

from tests.support.fake_backend import FakeBackend
from tests.support.net import Client

CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    timeout %(timeout)s;
    %(directives)s
    server {
        listen 127.0.0.1:{port} proxy_protocol;
        listen [::1]:{port2} proxy_protocol;
        protocol %(protocol)s;
    }
}
'''
SIG = bytes.fromhex('0d0a0d0a000d0a515549540a')
V1_TCP4 = b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n'
V1_TCP6 = b'PROXY TCP6 2001:db8::1 2001:db8::2 443 993\r\n'
V2_INET = SIG + bytes.fromhex('2111000c' 'c0000201' 'c0000202' '007b' '162e')
V2_INET6 = SIG + bytes.fromhex(
    '2121' '0024' '20010db8000000000000000000000001'
    '20010db8000000000000000000000002' '01bb' '03e1')
PROXY_4 = (b'Proxy-Protocol-Addr: 192.0.2.1\r\n'
           b'Proxy-Protocol-Port: 123\r\n'
           b'Proxy-Protocol-Server-Addr: 192.0.2.2\r\n'
           b'Proxy-Protocol-Server-Port: 5678\r\n')
PROXY_6 = (b'Proxy-Protocol-Addr: 2001:db8::1\r\n'
           b'Proxy-Protocol-Port: 443\r\n'
           b'Proxy-Protocol-Server-Addr: 2001:db8::2\r\n'
           b'Proxy-Protocol-Server-Port: 993\r\n')


class ProxiedBackend(FakeBackend):
    """A FakeBackend reading a PROXY header first, like Dovecot's haproxy listener."""

    def __init__(self, proto, replies=None):
        self.headers = []
        super().__init__(proto, replies)

    def _handle(self, sock, addr):
        sock.settimeout(5)
        try:
            header = sock.recv(1)
            if header == b'\r':                     # v2: 16 bytes, then the length
                header += _recv_exactly(sock, 15)
                header += _recv_exactly(sock, int.from_bytes(header[14:16], 'big'))
            else:
                while header and not header.endswith(b'\n'):
                    header += sock.recv(1)
        except OSError:
            sock.close()
            return
        self.headers.append(header)
        super()._handle(sock, addr)


def _recv_exactly(sock, n):
    data = b''
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            break
        data += more
    return data


@pytest.fixture
def backends(request):
    made = []

    def make(proto, proxied=True, replies=None):
        made.append((ProxiedBackend if proxied else FakeBackend)(proto, replies))
        return made[-1]
    yield make
    for backend in made:
        backend.stop()


def start(mailproxy, auth, backend, directives='', protocol='imap', timeout='5s'):
    auth.users = {'alice': {'password': 'secret', 'port': backend.port}}
    return mailproxy(CONF % {'directives': directives, 'protocol': protocol,
                             'timeout': timeout})


def connect(proxy, ipv6=False):
    if ipv6:
        return Client('::1', proxy.ports[1])
    return Client('127.0.0.1', proxy.port)


def imap_login(c, header):
    c.send(header)
    c.expect(b'* OK IMAP4 ready\r\n')
    c.send(b'a1 LOGIN alice secret\r\n')
    c.expect(b'a1 OK logged in\r\n')


def request_of(auth) -> bytes:
    return auth.wait_requests(1)[0]


def conn_id(proxy, client) -> str:
    """The ``*N`` of the session ``client`` opened (from its "connected" line)."""
    host, port = client.sock.getsockname()[:2]
    peer = ('[%s]:%d' if ':' in host else '%s:%d') % (host, port)
    log = proxy.wait_log(r'\*\d+ client %s connected' % re.escape(peer))
    return re.search(r'\*(\d+) client %s connected' % re.escape(peer), log).group(1)


# --- from the client: which address is used where -------------------------------------

def test_untrusted_peer_keeps_its_address(mailproxy, auth, backends):
    """nginx-tests mail_proxy_protocol.t without set_real_ip_from."""
    be = backends('imap')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on;')
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)
        cport = c.sock.getsockname()[1]
        req = request_of(auth)
        assert b'\r\nClient-IP: 127.0.0.1\r\n' + PROXY_4 + b'\r\n' in req
        assert be.headers == [b'PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n'
                              % (cport, proxy.port)]
        proxy.wait_log(r'\[info\] \d+#\d+: \*\d+ client logged in, '
                       r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, '
                       r'login: "alice", upstream: 127\.0\.0\.1:%d\n'
                       % (proxy.port, be.port))


def test_trusted_peer_names_the_client(mailproxy, auth, backends):
    """nginx-tests mail_proxy_protocol.t with set_real_ip_from 127.0.0.1/32."""
    be = backends('imap')
    proxy = start(mailproxy, auth, be,
                  'proxy_protocol on; set_real_ip_from 127.0.0.1/32;')
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)
        cport = c.sock.getsockname()[1]
        req = request_of(auth)
        assert b'\r\nClient-IP: 192.0.2.1\r\n' + PROXY_4 + b'\r\n' in req
        assert be.headers == [b'PROXY TCP4 192.0.2.1 127.0.0.1 123 %d\r\n' % proxy.port]
        log = proxy.wait_log(r'client logged in, client: 192\.0\.2\.1, server: '
                             r'127\.0\.0\.1:%d, login: "alice"' % proxy.port)
        # the first line is logged before the header is read: the TCP peer
        assert re.search(r'\[info\] \d+#\d+: \*\d+ client 127\.0\.0\.1:%d connected to '
                         r'127\.0\.0\.1:%d\n' % (cport, proxy.port), log)


@pytest.mark.parametrize('header, client_ip, proxy_lines, backend_line', [
    (V1_TCP6, b'2001:db8::1', PROXY_6,
     b'PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 443 %d\r\n'),
    (V2_INET, b'192.0.2.1', PROXY_4, b'PROXY TCP4 192.0.2.1 127.0.0.1 123 %d\r\n'),
    (V2_INET6, b'2001:db8::1', PROXY_6,
     b'PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 443 %d\r\n'),
], ids=['v1-tcp6', 'v2-inet', 'v2-inet6'])
@pytest.mark.parametrize('trust', ['set_real_ip_from 127.0.0.0/8;',
                                   'set_real_ip_from 192.0.2.0/24;', ''],
                         ids=['trusted', 'other-network', 'none'])
def test_v1_v2_ipv4_ipv6_headers(mailproxy, auth, backends, header, client_ip,
                                 proxy_lines, backend_line, trust):
    be = backends('imap')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on; ' + trust)
    with connect(proxy) as c:
        imap_login(c, header)
        cport = c.sock.getsockname()[1]
    if trust.endswith('127.0.0.0/8;'):
        expected_ip, expected_header = client_ip, backend_line % proxy.port
    else:
        expected_ip = b'127.0.0.1'
        expected_header = (b'PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n'
                           % (cport, proxy.port))
    req = request_of(auth)
    assert b'\r\nClient-IP: ' + expected_ip + b'\r\n' + proxy_lines + b'\r\n' in req
    assert be.headers == [expected_header]
    proxy.wait_log(r'client logged in, client: %s, server: 127\.0\.0\.1:%d, '
                   r'login: "alice"' % (re.escape(expected_ip.decode()), proxy.port))


@pytest.mark.parametrize('trust, client_ip, backend_line', [
    # beyond nginx (which writes "TCP4 192.0.2.1 ::1"): one family for both ends
    ('set_real_ip_from ::1;', '192.0.2.1',
     b'PROXY TCP6 ::ffff:192.0.2.1 ::1 123 %(port)d\r\n'),
    ('set_real_ip_from 127.0.0.1;', '::1',
     b'PROXY TCP6 ::1 ::1 %(cport)d %(port)d\r\n'),
])
def test_ipv6_peer(mailproxy, auth, backends, trust, client_ip, backend_line):
    be = backends('imap')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on; ' + trust)
    with connect(proxy, ipv6=True) as c:
        imap_login(c, V1_TCP4)
        cport = c.sock.getsockname()[1]
    req = request_of(auth)
    assert b'\r\nClient-IP: %s\r\n' % client_ip.encode() + PROXY_4 in req
    assert be.headers == [backend_line % {b'port': proxy.ports[1], b'cport': cport}]
    proxy.wait_log(r'client logged in, client: %s, server: \[::1\]:%d, login: "alice"'
                   % (re.escape(client_ip), proxy.ports[1]))


def test_v2_to_backend(mailproxy, auth, backends):
    be = backends('imap')
    proxy = start(mailproxy, auth, be, 'proxy_protocol v2; set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        imap_login(c, V2_INET6)
    port = proxy.port.to_bytes(2, 'big')
    header = be.headers[0]
    # IPv6 family because the client is IPv6; our IPv4 end as ::ffff:127.0.0.1
    assert header[:52] == SIG + bytes.fromhex(
        '2121' '002b' '20010db8000000000000000000000001'
        '00000000000000000000ffff7f000001' '01bb') + port
    assert header[52:55] == b'\x03\x00\x04' and len(header) == 59      # CRC32C TLV


def test_unknown_is_as_if_no_header(mailproxy, auth, backends):
    be = backends('imap')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on; set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        imap_login(c, b'PROXY UNKNOWN whatever\r\n')
        cport = c.sock.getsockname()[1]
    req = request_of(auth)
    assert b'\r\nClient-IP: 127.0.0.1\r\n\r\n' in req and b'Proxy-Protocol' not in req
    assert be.headers == [b'PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n'
                          % (cport, proxy.port)]


def test_no_backend_header_by_default(mailproxy, auth, backends):
    be = backends('imap', proxied=False)
    proxy = start(mailproxy, auth, be, 'set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)
    assert be.lines[0] == b'a1 LOGIN {5}\r\n'


# --- from the client: how the header arrives ------------------------------------------

def test_header_split_across_packets(mailproxy, auth, backends):
    """Beyond nginx (which parses one peek and logs a broken header): the rest is
    waited for, within ``timeout``."""
    be = backends('imap', proxied=False)
    proxy = start(mailproxy, auth, be, 'set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in (V1_TCP4[:9], V1_TCP4[9:30]):
            c.send(part)
            assert c.silent(0.1)                # neither an error nor the greeting yet
        c.send(V1_TCP4[30:])
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN alice secret\r\n')
        c.expect(b'a1 OK logged in\r\n')
    assert b'\r\nClient-IP: 192.0.2.1\r\n' in request_of(auth)


def test_bytes_after_the_header_are_left_for_the_dialogue(mailproxy, auth, backends):
    be = backends('imap', proxied=False)
    proxy = start(mailproxy, auth, be)
    with connect(proxy) as c:
        c.send(V2_INET + b'a1 CAPABILITY\r\n')
        c.expect(b'* OK IMAP4 ready\r\n'
                 b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS ID AUTH=PLAIN\r\n'
                 b'a1 OK completed\r\n')


@pytest.mark.parametrize('data, message', [
    (b'GET / HTTP/1.0\r\nHost: x\r\n\r\n', 'broken header: "GET / HTTP/1.0"'),
    (b'a1 LOGIN alice secret\r\n', 'broken header: "a1 LOGIN alice secret"'),
    (b'PROXY TCP4 1.2.3.4 192.0.2.2 ' + b'9' * 300 + b'\r\n',
     'broken header: "PROXY TCP4 1.2.3.4 192.0.2.2 ' + '9' * 78 + '"'),
    (b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\n',
     'broken header: "PROXY TCP4 192.0.2.1 192.0.2.2 123 5678"'),
    (SIG + bytes.fromhex('2111ffff') + b'\0' * 100, 'header is too large'),
    (SIG + bytes.fromhex('1111000c') + b'\0' * 12, 'unknown PROXY protocol version: 1'),
], ids=['http', 'imap', 'oversized-v1', 'bare-lf', 'oversized-v2', 'v2-version'])
def test_garbage_or_oversized_header_closes_without_reply(mailproxy, auth, backends,
                                                         data, message):
    proxy = start(mailproxy, auth, backends('imap'))
    with connect(proxy) as c:
        c.send(data)
        assert c.closed(timeout=2)                  # no greeting, no error line
        cport = c.sock.getsockname()[1]
    log = proxy.wait_log(r'\[error\] \d+#\d+: \*\d+ %s while reading PROXY protocol, '
                         r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d\n'
                         % (re.escape(message), proxy.port))
    assert '127.0.0.1:%d connected' % cport in log
    assert auth.requests == []


def test_client_closing_before_the_header(mailproxy, auth, backends):
    """As nginx: a connection that closes at once is a broken (empty) header."""
    proxy = start(mailproxy, auth, backends('imap'))
    connect(proxy).close()
    proxy.wait_log(r'\[error\] \d+#\d+: \*\d+ broken header: "" while reading PROXY '
                   r'protocol, client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d\n'
                   % proxy.port)


def test_client_closing_mid_header(mailproxy, auth, backends):
    proxy = start(mailproxy, auth, backends('imap'))
    with connect(proxy) as c:
        c.send(b'PROXY TCP4 192.0.2.1')
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed(timeout=2)
    proxy.wait_log(r'broken header: "PROXY TCP4 192\.0\.2\.1" while reading PROXY '
                   r'protocol, client: 127\.0\.0\.1, server')


def test_silent_client_times_out(mailproxy, auth, backends):
    proxy = start(mailproxy, auth, backends('imap'), timeout='300ms')
    with connect(proxy) as c:
        began = time.monotonic()
        assert c.closed(timeout=3)
        assert 0.25 < time.monotonic() - began < 2
    proxy.wait_log(r'\[info\] \d+#\d+: \*\d+ client timed out \(110: Connection timed '
                   r'out\) while reading PROXY protocol, client: 127\.0\.0\.1, '
                   r'server: 127\.0\.0\.1:%d\n' % proxy.port)


def test_partial_header_then_silence_times_out(mailproxy, auth, backends):
    proxy = start(mailproxy, auth, backends('imap'), timeout='300ms')
    with connect(proxy) as c:
        c.send(V1_TCP4[:20])
        assert c.closed(timeout=3)
    proxy.wait_log(r'client timed out \(110: Connection timed out\) while reading '
                   r'PROXY protocol, client: 127\.0\.0\.1, server')


# --- to the backend: all three protocols ----------------------------------------------

def test_pop3_backend_header(mailproxy, auth, backends):
    be = backends('pop3')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on; set_real_ip_from 127.0.0.1;',
                  protocol='pop3')
    with connect(proxy) as c:
        c.send(V1_TCP4)
        c.expect(b'+OK')
        c.send(b'USER alice\r\n')
        c.expect(b'+OK\r\n')
        c.send(b'PASS secret\r\n')
        c.expect(b'+OK\r\n')
    assert be.headers == [b'PROXY TCP4 192.0.2.1 127.0.0.1 123 %d\r\n' % proxy.port]
    assert be.lines[:2] == [b'USER alice\r\n', b'PASS secret\r\n']
    assert b'\r\nClient-IP: 192.0.2.1\r\n' in request_of(auth)


def test_smtp_backend_header_and_xclient(mailproxy, auth, backends):
    be = backends('smtp')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on; set_real_ip_from 127.0.0.1; '
                  'server_name mx.example;', protocol='smtp')
    with connect(proxy) as c:
        c.send(V1_TCP6)
        c.expect(b'220 ')
        c.send(b'EHLO client.example\r\n')
        c.read_lines_until(b'250 ')
        c.send(b'AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n')
        c.expect(b'235 2.0.0 OK\r\n')
    assert be.headers == [b'PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 443 %d\r\n'
                          % proxy.port]
    assert be.lines[:3] == [
        b'EHLO mx.example\r\n',
        b'XCLIENT ADDR=IPV6:2001:db8::1 LOGIN=alice NAME=[UNAVAILABLE]\r\n',
        b'EHLO client.example\r\n']


def test_backend_header_write_uses_realip_even_without_proxy_header_fields(
        mailproxy, auth, backends):
    """v2 LOCAL from the client: the backend still learns the TCP peer."""
    be = backends('imap')
    proxy = start(mailproxy, auth, be, 'proxy_protocol on; set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        imap_login(c, SIG + bytes.fromhex('20000000'))
        cport = c.sock.getsockname()[1]
    assert be.headers == [b'PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n'
                          % (cport, proxy.port)]


# --- beyond nginx: IMAP ID and Client-Port --------------------------------------------

def test_imap_id_forwarded_before_login(mailproxy, auth, backends):
    be = backends('imap', proxied=False, replies={
        'ID': b'* ID ("name" "backend")\r\n{tag} OK ID completed\r\n'})
    proxy = start(mailproxy, auth, be, 'imap_forward_client_id on; '
                  'set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)          # the client sees none of the ID exchange
        n = conn_id(proxy, c)
    pid = re.search(r'\] (\d+)#', proxy.log_text()).group(1)
    assert be.lines[0] == (
        b'a1 ID ("x-originating-ip" "192.0.2.1" "x-originating-port" "123"'
        b' "x-connected-ip" "127.0.0.1" "x-connected-port" "%d"'
        b' "x-session-id" "%s-%s")\r\n' % (proxy.port, pid.encode(), n.encode()))
    assert be.lines[1] == b'a1 LOGIN {5}\r\n'


def test_imap_id_without_proxy_protocol_names_the_tcp_peer(mailproxy, auth, backends):
    be = backends('imap', proxied=False)
    proxy = start(mailproxy, auth, be, 'imap_forward_client_id on;')
    with connect(proxy, ipv6=True) as c:
        imap_login(c, V2_INET)
        cport = c.sock.getsockname()[1]
    assert be.lines[0].startswith(
        b'a1 ID ("x-originating-ip" "::1" "x-originating-port" "%d"'
        b' "x-connected-ip" "::1" "x-connected-port" "%d" "x-session-id" "'
        % (cport, proxy.ports[1]))


@pytest.mark.parametrize('answer', [b'{tag} BAD unknown command\r\n',
                                    b'* BAD what\r\n{tag} NO not now\r\n'])
def test_imap_id_answer_is_ignored_if_tagged(mailproxy, auth, backends, answer):
    be = backends('imap', proxied=False, replies={'ID': answer})
    proxy = start(mailproxy, auth, be, 'imap_forward_client_id on;')
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)


def test_imap_id_untagged_only_answer_fails(mailproxy, auth, backends):
    be = backends('imap', proxied=False, replies={'ID': b'+ what\r\n'})
    proxy = start(mailproxy, auth, be, 'imap_forward_client_id on;')
    with connect(proxy) as c:
        c.send(V1_TCP4)
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN alice secret\r\n')
        c.expect(b'* BAD internal server error\r\n')
    proxy.wait_log(r'\[error\] .*upstream sent invalid response: "\+ what" while '
                   r'reading response from upstream, client: 127\.0\.0\.1')


def test_client_port_to_auth_http(mailproxy, auth, backends):
    be = backends('imap', proxied=False)
    proxy = start(mailproxy, auth, be,
                  'auth_http_client_port on; set_real_ip_from 127.0.0.1;')
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)
    assert (b'\r\nClient-IP: 192.0.2.1\r\nClient-Port: 123\r\n' + PROXY_4
            in request_of(auth))


def test_client_port_off_by_default(mailproxy, auth, backends):
    be = backends('imap', proxied=False)
    proxy = start(mailproxy, auth, be)
    with connect(proxy) as c:
        imap_login(c, V1_TCP4)
    assert b'Client-Port' not in request_of(auth)


# --- PROXY header, then implicit TLS --------------------------------------------------

TLS_CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    timeout 5s;
    set_real_ip_from 127.0.0.1;
    proxy_protocol v2;
    server {
        listen 127.0.0.1:{port} ssl proxy_protocol;
        protocol imap;
        ssl_certificate %s;
        ssl_certificate_key %s;
    }
}
'''


@pytest.fixture(scope='module')
def cert(tmp_path_factory):
    from tests.support.backends import make_cert
    return make_cert(tmp_path_factory.mktemp('cert'), cn='mail.example')


def tlvs(data: bytes) -> dict:
    """type -> value of a TLV list (HAProxy's PROXY protocol spec, section 2.2)."""
    found = {}
    while data:
        kind, size = data[0], int.from_bytes(data[1:3], 'big')
        found[kind], data = data[3:3 + size], data[3 + size:]
    return found


def test_proxy_header_then_implicit_tls(mailproxy, auth, backends, cert):
    be = backends('imap')
    auth.users = {'alice': {'password': 'secret', 'port': be.port}}
    proxy = mailproxy(TLS_CONF % cert)
    with connect(proxy) as c:
        c.send(V1_TCP4)          # the ClientHello follows at once: it must stay unread
        c.starttls(server_hostname='mail.example')
        c.expect(b'* OK IMAP4 ready\r\n')
        c.send(b'a1 LOGIN alice secret\r\n')
        c.expect(b'a1 OK logged in\r\n')
        version = c.sock.version().encode()
        cipher = c.sock.cipher()[0].encode()
    req = request_of(auth)
    assert b'\r\nClient-IP: 192.0.2.1\r\n' + PROXY_4 + b'Auth-SSL: on\r\n' in req
    header = be.headers[0]
    assert header[12:14] == bytes.fromhex('2111')
    assert header[14:16] == (len(header) - 16).to_bytes(2, 'big')
    assert header[16:28] == bytes.fromhex('c0000201' '7f000001' '007b') + \
        proxy.port.to_bytes(2, 'big')
    found = tlvs(header[28:])
    assert sorted(found) == [0x03, 0x20]              # SSL, CRC32C
    ssl_tlv = found[0x20]
    assert ssl_tlv[:5] == b'\x01\x00\x00\x00\x01'     # SSL; verify 1: no client cert
    assert tlvs(ssl_tlv[5:]) == {0x21: version, 0x23: cipher}
    proxy.wait_log(r'client logged in, client: 192\.0\.2\.1, server: 127\.0\.0\.1:%d, '
                   % proxy.port)
