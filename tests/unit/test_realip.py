"""gmailproxy.realip: reading a PROXY header off a socket, set_real_ip_from matching,
the backend's PROXY header, and the IMAP ID / Client-Port extras."""
import socket
import struct
from types import SimpleNamespace

import gevent
import pytest

from gmailproxy import errors, realip
from gmailproxy.config import values
from gmailproxy.proxy_protocol import ProxyInfo, ProxyProtocolError

SIG = bytes.fromhex('0d0a0d0a000d0a515549540a')
V2_INET = SIG + bytes.fromhex('2111000c' 'c0000201' 'c0000202' '007b' '162e')
V2_INET6 = SIG + bytes.fromhex(
    '21' '21' '0024' '20010db8000000000000000000000001'
    '00000000000000000000000000000001' '01bb' '03e1')
V2_LOCAL = SIG + bytes.fromhex('2000' '0000')
TIMEOUT = 5


def entries(*texts):
    """``set_real_ip_from`` values as the configuration stores them (one tuple each)."""
    ctx = SimpleNamespace(cache={}, warn=lambda *a, **k: None, name='set_real_ip_from')
    return tuple(values.real_ip_from([t], ctx) for t in texts)


def session(peer=('127.0.0.1', 40000), local=('127.0.0.1', 8143), trusted=(),
            proxy_protocol='off', tls=False, sock=None, **conf):
    conf = SimpleNamespace(set_real_ip_from=entries(*trusted),
                           proxy_protocol=proxy_protocol, auth_http_client_port=False,
                           **conf)
    client_ip = peer[0] if isinstance(peer, tuple) else 'unix:'
    return SimpleNamespace(sock=sock, peer=peer, local=local, client_ip=client_ip,
                           conf=conf, proxy_info=None, tls=tls, conn_id=7,
                           action='sending client greeting line')


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def read(sock):
    with gevent.Timeout(TIMEOUT):
        return realip.read_header(sock)


def rest(sock, n=100):
    """What is left on the socket after the header (the reader took none of it)."""
    sock.settimeout(TIMEOUT)
    return sock.recv(n)


# --- reading the header ---------------------------------------------------------------

@pytest.mark.parametrize('header, info', [
    (b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n',
     ProxyInfo('192.0.2.1', 123, '192.0.2.2', 5678)),
    (b'PROXY TCP6 2001:db8::1 ::1 443 993\r\n',
     ProxyInfo('2001:db8::1', 443, '::1', 993)),
    (V2_INET, ProxyInfo('192.0.2.1', 123, '192.0.2.2', 5678, 2)),
    (V2_INET6, ProxyInfo('2001:db8::1', 443, '::1', 993, 2)),
    (b'PROXY UNKNOWN whatever\r\n', ProxyInfo()),
    (V2_LOCAL, ProxyInfo(version=2)),
])
def test_header_read_exactly(pair, header, info):
    client, server = pair
    client.sendall(header + b'\x16\x03\x01 TLS hello follows')
    assert read(server) == info
    assert rest(server) == b'\x16\x03\x01 TLS hello follows'


@pytest.mark.parametrize('header', [b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n',
                                    V2_INET6])
def test_header_split_across_segments(pair, header):
    client, server = pair
    reader = gevent.spawn(read, server)
    for i in range(0, len(header), 5):
        client.sendall(header[i:i + 5])
        gevent.sleep(0.01)
    client.sendall(b'a1 CAPABILITY\r\n')
    info = reader.get(timeout=TIMEOUT)
    assert (info.src_addr, info.src_port) in (('192.0.2.1', 123), ('2001:db8::1', 443))
    assert rest(server) == b'a1 CAPABILITY\r\n'


@pytest.mark.parametrize('data, message', [
    (b'', 'broken header: ""'),
    (b'PROXY TCP4 192.0.2.1 ', 'broken header: "PROXY TCP4 192.0.2.1 "'),
    (b'\r\n\r\n', 'broken header: ""'),
    (SIG + bytes.fromhex('2111000c') + b'\xc0\x00', 'header is too large'),
])
def test_end_of_file_mid_header_is_nginx_snapshot_error(pair, data, message):
    client, server = pair
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyProtocolError) as e:
        read(server)
    assert e.value.message == message
    assert e.value.reply is None


@pytest.mark.parametrize('data, message', [
    (b'GET / HTTP/1.0\r\nHost: x\r\n\r\n', 'broken header: "GET / HTTP/1.0"'),
    (b'PROXY TCP4 1.2.3.4 192.0.2.2 ' + b'1' * 200 + b'\r\n',
     'broken header: "PROXY TCP4 1.2.3.4 192.0.2.2 ' + '1' * 78 + '"'),   # 107 bytes
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n',
     'broken header: "PROXY TCP4 1.2.3.4 5.6.7.8 65536 1"'),
    (SIG + bytes.fromhex('2111') + b'\x0f\xf1', 'header is too large'),   # 16 + 4081
    (SIG + bytes.fromhex('3111000c'), 'unknown PROXY protocol version: 3'),
])
def test_garbage_and_oversized_fail_at_once(pair, data, message):
    client, server = pair
    client.sendall(data)          # the connection stays open: no waiting for more bytes
    with pytest.raises(ProxyProtocolError) as e:
        read(server)
    assert e.value.message == message


def test_long_garbage_is_quoted_up_to_107_bytes(pair):
    client, server = pair
    client.sendall(b'X' * 3000)
    with pytest.raises(ProxyProtocolError, match='^broken header: "X{107}"$'):
        read(server)


def test_reset_is_a_client_error():
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        client.close()                      # RST: linger on, timeout 0
        gevent.sleep(0.05)
        with pytest.raises(errors.ClientError, match=r'^recv\(\) failed \(104: '):
            read(server)
        server.close()
    finally:
        listener.close()


# --- set_real_ip_from -----------------------------------------------------------------

@pytest.mark.parametrize('texts, peer, expected', [
    ((), ('127.0.0.1', 1), False),
    (('127.0.0.1',), ('127.0.0.1', 1), True),
    (('127.0.0.1/32',), ('127.0.0.2', 1), False),
    (('127.0.0.0/8',), ('127.9.9.9', 1), True),
    (('10.0.0.0/8', '127.0.0.1'), ('127.0.0.1', 1), True),
    (('::1',), ('::1', 1, 0, 0), True),
    (('::1',), ('127.0.0.1', 1), False),
    (('2001:db8::/32',), ('2001:db8:1::5', 1, 0, 0), True),
    (('127.0.0.1',), ('::ffff:127.0.0.1', 1, 0, 0), True),      # v4-mapped is IPv4
    (('::ffff:0:0/96',), ('::ffff:127.0.0.1', 1, 0, 0), False),
    (('unix:',), '', True),
    (('unix:',), ('127.0.0.1', 1), False),
    (('127.0.0.0/8',), '', False),
])
def test_trusted(texts, peer, expected):
    assert realip.trusted(entries(*texts), peer) is expected


def accept_with(header: bytes, **kw):
    a, b = socket.socketpair()
    try:
        a.sendall(header)
        s = session(sock=b, **kw)
        with gevent.Timeout(TIMEOUT):
            realip.accept(s)
        return s
    finally:
        a.close()
        b.close()


def test_accept_untrusted_keeps_the_peer_but_records_the_header():
    s = accept_with(b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n')
    assert (s.client_ip, s.peer) == ('127.0.0.1', ('127.0.0.1', 40000))
    assert s.proxy_info == ProxyInfo('192.0.2.1', 123, '192.0.2.2', 5678)
    assert s.action == 'sending client greeting line'


def test_accept_trusted_replaces_address_and_port():
    s = accept_with(b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n',
                    trusted=['127.0.0.1/32'])
    assert (s.client_ip, s.peer) == ('192.0.2.1', ('192.0.2.1', 123))


@pytest.mark.parametrize('header, client_ip', [
    (b'PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n', '2001:db8::1'),     # nginx's text
    (b'PROXY TCP4 010.1.1.1 1.1.1.1 1 2\r\n', '10.1.1.1'),               # ngx_inet_addr
    (b'PROXY TCP4 1.2.3 1.1.1.1 1 2\r\n', '127.0.0.1'),              # not an address
    (b'PROXY TCP4 255.255.255.255 1.1.1.1 1 2\r\n', '127.0.0.1'),        # INADDR_NONE
    (b'PROXY TCP4 ::1 1.1.1.1 1 2\r\n', '::1'),                      # family unchecked
    (b'PROXY UNKNOWN\r\n', '127.0.0.1'),
    (V2_LOCAL, '127.0.0.1'),
    (V2_INET6, '2001:db8::1'),
])
def test_accept_trusted_address_forms(header, client_ip):
    s = accept_with(header, trusted=['127.0.0.0/8'])
    assert s.client_ip == client_ip


def test_accept_unknown_and_local_leave_no_proxy_info():
    assert accept_with(b'PROXY UNKNOWN\r\n').proxy_info is None
    assert accept_with(V2_LOCAL).proxy_info is None


def test_accept_over_unix_socket():
    s = accept_with(b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n', peer='',
                    trusted=['unix:'])
    assert (s.client_ip, s.peer) == ('192.0.2.1', ('192.0.2.1', 123))


# --- the backend's PROXY header -------------------------------------------------------

def test_backend_header_off():
    assert realip.backend_header(session()) is None


@pytest.mark.parametrize('peer, local, header', [
    (('192.0.2.1', 123), ('127.0.0.1', 8143),
     b'PROXY TCP4 192.0.2.1 127.0.0.1 123 8143\r\n'),
    (('2001:db8::1', 443, 0, 0), ('::1', 993, 0, 0),
     b'PROXY TCP6 2001:db8::1 ::1 443 993\r\n'),
    # beyond nginx (which writes mixed families): one family for both ends
    (('2001:db8::1', 443), ('127.0.0.1', 8143),
     b'PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 443 8143\r\n'),
    (('192.0.2.1', 123), ('::1', 143, 0, 0),
     b'PROXY TCP6 ::ffff:192.0.2.1 ::1 123 143\r\n'),
    (('192.0.2.1', 123), ('::ffff:127.0.0.1', 143, 0, 0),
     b'PROXY TCP4 192.0.2.1 127.0.0.1 123 143\r\n'),
    ('', '/run/mail.sock', b'PROXY UNKNOWN\r\n'),
    (('192.0.2.1', 123), '/run/mail.sock', b'PROXY UNKNOWN\r\n'),
])
def test_backend_header_v1(peer, local, header):
    assert realip.backend_header(session(peer, local, proxy_protocol='on')) == header


def test_backend_header_v2_ipv4():
    got = realip.backend_header(session(('192.0.2.1', 123), ('127.0.0.1', 8143),
                                        proxy_protocol='v2'))
    assert got[:28] == SIG + bytes.fromhex(
        '2111' '0013' 'c0000201' '7f000001' '007b' '1fcf')
    assert got[28:31] == b'\x03\x00\x04' and len(got) == 35


def test_backend_header_v2_mixed_is_ipv6():
    got = realip.backend_header(session(('2001:db8::1', 443), ('127.0.0.1', 8143),
                                        proxy_protocol='v2'))
    assert got[12:16] == bytes.fromhex('2121' '002b')
    assert got[16:52] == bytes.fromhex('20010db8000000000000000000000001'
                                       '00000000000000000000ffff7f000001' '01bb' '1fcf')


class FakeTLSSocket:
    """What realip asks of the client's SSLSocket when no certificate was sent."""
    session_reused = False

    def version(self):
        return 'TLSv1.3'

    def cipher(self):
        return ('TLS_AES_256_GCM_SHA384', 'TLSv1.3', 256)

    def selected_alpn_protocol(self):
        return 'imap'

    def getpeercert(self, binary_form=False):
        return None


def test_backend_header_v2_tls_tlvs():
    got = realip.backend_header(session(('192.0.2.1', 123), ('127.0.0.1', 8143),
                                        proxy_protocol='v2', tls=True,
                                        sock=FakeTLSSocket()))
    assert got[12:16] == bytes.fromhex('2111' '0045')
    assert got[28:-4] == (
        b'\x01\x00\x04imap'                                  # ALPN
        b'\x20\x00\x28\x01\x00\x00\x00\x01'                # SSL; verify 1: no cert
        b'\x21\x00\x07TLSv1.3'                               # VERSION
        b'\x23\x00\x16TLS_AES_256_GCM_SHA384'                # CIPHER
        b'\x03\x00\x04')                                    # CRC32C follows


class FakeSocket:
    def __init__(self, accept: int | None = None):
        self.data = b''
        self.accept = accept

    def send(self, data):
        n = len(data) if self.accept is None else self.accept
        self.data += data[:n]
        return n


def test_send_backend_header_in_one_write():
    s = session(('192.0.2.1', 123), proxy_protocol='on')
    sock = FakeSocket()
    realip.send_backend_header(s, sock)
    assert sock.data == b'PROXY TCP4 192.0.2.1 127.0.0.1 123 8143\r\n'
    assert s.action == 'sending PROXY protocol header to upstream'


def test_send_backend_header_short_write_is_nginx_error():
    s = session(proxy_protocol='on')
    with pytest.raises(errors.UpstreamError,
                       match='^could not send PROXY protocol header at once$'):
        realip.send_backend_header(s, FakeSocket(accept=10))


def test_send_backend_header_off_sends_nothing():
    sock = FakeSocket()
    s = session()
    realip.send_backend_header(s, sock)
    assert sock.data == b'' and s.action == 'sending client greeting line'


# --- IMAP ID and Client-Port ----------------------------------------------------------

def test_imap_id_command(monkeypatch):
    monkeypatch.setattr(realip.os, 'getpid', lambda: 4242)
    s = session(('192.0.2.1', 123), ('127.0.0.1', 8143))
    s.client_ip = '192.0.2.1'
    assert realip.imap_id_command(s, b'a1 ') == (
        b'a1 ID ("x-originating-ip" "192.0.2.1" "x-originating-port" "123"'
        b' "x-connected-ip" "127.0.0.1" "x-connected-port" "8143"'
        b' "x-session-id" "4242-7")\r\n')


def test_imap_id_command_unix(monkeypatch):
    monkeypatch.setattr(realip.os, 'getpid', lambda: 1)
    s = session('', '/run/imap.sock')
    assert realip.imap_id_command(s, b'x ') == (
        b'x ID ("x-session-id" "1-7")\r\n')


def test_client_port_header():
    s = session(('192.0.2.1', 123))
    assert realip.client_port_header(s) == b''
    s.conf.auth_http_client_port = True
    assert realip.client_port_header(s) == b'Client-Port: 123\r\n'
    s.peer = ''
    assert realip.client_port_header(s) == b''
