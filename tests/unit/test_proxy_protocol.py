"""gmailproxy.proxy_protocol: incremental v1/v2 parsing, nginx's errors, building."""
import ipaddress
import logging

import pytest
from hypothesis import given, strategies as st

from gmailproxy import proxy_protocol as pp
from gmailproxy.errors import ProxyError
from gmailproxy.proxy_protocol import ProxyInfo, ProxyProtocolError, SSLInfo, parse

SIG = bytes.fromhex('0d0a0d0a000d0a515549540a')

# Hand-written v2 headers (HAProxy spec section 2.2).
V2_INET = SIG + bytes.fromhex(
    '21' '11' '000c'                        # v2 PROXY, INET STREAM, 12 bytes follow
    'c0000201' 'c0000202' '007b' '162e')    # 192.0.2.1 192.0.2.2 123 5678
V2_INET6 = SIG + bytes.fromhex(
    '21' '21' '0024'
    '20010db8000000000000000000000001'      # 2001:db8::1
    '00000000000000000000000000000001'      # ::1
    '01bb' '03e1')                          # 443 993
V2_INET_TLVS = SIG + bytes.fromhex(
    '21' '11' '0029'
    'c0000201' 'c0000202' '007b' '162e'
    '02' '0003') + b'a.b' + bytes.fromhex(  # AUTHORITY
    '20' '0014' '05' '00000000'             # SSL: flags SSL|CERT_SESS, verify 0
    '21' '0007') + b'TLSv1.3' + bytes.fromhex('22' '0002') + b'cn'


def crc32c_bitwise(data: bytes) -> int:
    """An independent bit-at-a-time CRC-32C to check the table-driven one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def broken(text):
    return pytest.raises(ProxyProtocolError, match='^broken header: "%s"$' % text)


# --- the error class ------------------------------------------------------------------

def test_error_class():
    e = ProxyProtocolError('header is too large')
    assert isinstance(e, ProxyError)
    assert e.reply is None
    assert e.level == logging.ERROR
    assert e.message == 'header is too large'


# --- v1 -------------------------------------------------------------------------------

def test_v1_tcp4():
    buf = b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n'
    assert parse(buf) == (ProxyInfo('192.0.2.1', 123, '192.0.2.2', 5678, 1, {}), 41)


def test_v1_tcp6_and_following_bytes_left_alone():
    buf = b'PROXY TCP6 2001:db8::1 ::1 65535 0\r\n\x16\x03\x01'
    info, n = parse(buf)
    assert (info.src_addr, info.src_port, info.dst_addr, info.dst_port) == \
        ('2001:db8::1', 65535, '::1', 0)
    assert n == 36
    assert buf[n:] == b'\x16\x03\x01'


def test_v1_nginx_leniencies():
    # Addresses are not validated beyond their characters; ports may have leading zeros.
    assert parse(b'PROXY TCP4 ABC ::: 00080 0000\r\n') == (
        ProxyInfo('ABC', 80, ':::', 0), 31)
    assert parse(b'PROXY TCP6 1.2.3.4 1.2.3.5 1 2\r\n')[0].src_addr == '1.2.3.4'
    assert parse(b'PROXY TCP4   1 2\r\n') == (ProxyInfo('', 1, '', 2), 18)


@pytest.mark.parametrize('buf, n', [
    (b'PROXY UNKNOWN\r\n', 15),
    (b'PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\nEHLO', 35),
    (b'PROXY UNKNOWNjunk\rstill\nskipped\r\nx', 33),
])
def test_v1_unknown_is_ignored(buf, n):
    assert parse(buf) == (ProxyInfo(), n)
    assert parse(buf)[0].src_addr is None


@pytest.mark.parametrize('buf, quoted', [
    (b'GET / HTTP/1.1\r\n', 'GET / HTTP/1.1'),
    (b'proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n', 'proxy TCP4 1.2.3.4 1.2.3.4 1 2'),
    (b'PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n', 'PROXY TCP5 1.2.3.4 1.2.3.4 1 2'),
    (b'PROXY TCP4\r\n', 'PROXY TCP4'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n', 'PROXY TCP4 1.2.3.4 1.2.3.4 1 2'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX', 'PROXY TCP4 1.2.3.4 1.2.3.4 1 2'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n', 'PROXY TCP4 1.2.3.4 1.2.3.4 1 65536'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 99999 1\r\n', 'PROXY TCP4 1.2.3.4 1.2.3.4 99999 1'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4  2\r\n', 'PROXY TCP4 1.2.3.4 1.2.3.4  2'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 1 \r\n', 'PROXY TCP4 1.2.3.4 1.2.3.4 1 '),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n', 'PROXY TCP4 1.2.3.4 1.2.3.4 -1 2'),
    (b'PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n', 'PROXY TCP4 1.2.3.4  1.2.3.4 1 2'),
    (b'PROXY TCP4 host 1.2.3.4 1 2\r\n', 'PROXY TCP4 host 1.2.3.4 1 2'),
    (b'PROXY TCP4 1.2.3.4\t1.2.3.4 1 2\r\n', 'PROXY TCP4 1.2.3.4\t1.2.3.4 1 2'),
    (b'PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n', 'PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3'),
    (b'PROXY UNKNOW\r\n', 'PROXY UNKNOW'),
    (b'\r\nX', ''),
    (b'\nPROXY', ''),
    (b'a1 CAPABILITY\r\n', 'a1 CAPABILITY'),
    (b'PROXY \xff', 'PROXY \xff'),
])
def test_v1_broken_header(buf, quoted):
    with broken(quoted):
        parse(buf)


def test_v1_broken_header_fails_early_without_line_end():
    # No continuation can repair these, so nobody waits for a timeout.
    for buf in (b'G', b'PROXX', b'PROXY TCP4 1.2.3.4 g', b'PROXY TCP4 a b 1 2\r\r',
                b'PROXY TCP4 a b 70000', b'PROXY TCP4 a b 1 123456'):
        with pytest.raises(ProxyProtocolError):
            parse(buf)


def test_v1_107_byte_limit():
    line = b'PROXY UNKNOWN' + b'x' * 92 + b'\r\n'
    assert len(line) == 107
    assert parse(line) == (ProxyInfo(), 107)
    longer = b'PROXY UNKNOWN' + b'x' * 93 + b'\r\n'
    with broken('PROXY UNKNOWN' + 'x' * 93):
        parse(longer)
    with broken('PROXY UNKNOWN' + 'x' * 293):
        parse(longer[:-2] + b'x' * 200)
    # An incomplete line stops being "incomplete" at 107 bytes.
    assert parse(line[:106]) == (None, 0)
    assert parse((b'PROXY UNKNOWN' + b'x' * 200)[:106]) == (None, 0)
    with pytest.raises(ProxyProtocolError):
        parse((b'PROXY UNKNOWN' + b'x' * 200)[:107])

    six = 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff'
    tcp6 = b'PROXY TCP6 %s %s 65535 65535\r\n' % (six.encode(), six.encode())
    assert len(tcp6) == 104
    assert parse(tcp6)[1] == 104
    tcp6 = b'PROXY TCP6 %s %s 0065535 065535\r\n' % (six.encode(), six.encode())
    assert len(tcp6) == 107
    assert parse(tcp6)[0].src_port == 65535
    tcp6 = b'PROXY TCP6 %s %s 00065535 065535\r\n' % (six.encode(), six.encode())
    with pytest.raises(ProxyProtocolError):
        parse(tcp6)


@pytest.mark.parametrize('buf', [
    b'', b'P', b'PROXY', b'PROXY ', b'PROXY T', b'PROXY TCP4', b'PROXY TCP4 ',
    b'PROXY TCP4 1.2.3.4', b'PROXY TCP4 1.2.3.4 ', b'PROXY TCP4 1.2.3.4 5.6.7.8 1',
    b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2', b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r',
    b'PROXY UNK', b'PROXY UNKNOWN', b'PROXY UNKNOWN\r', b'PROXY UNKNOWN\n\r',
    b'\r', b'\r\n\r\n\x00\r\nQUIT\n', b'\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00',
])
def test_needs_more(buf):
    assert parse(buf) == (None, 0)


# --- v2 -------------------------------------------------------------------------------

def test_v2_inet():
    assert parse(V2_INET + b'rest') == (
        ProxyInfo('192.0.2.1', 123, '192.0.2.2', 5678, 2, {}), 28)


def test_v2_inet6():
    assert parse(V2_INET6) == (ProxyInfo('2001:db8::1', 443, '::1', 993, 2, {}), 52)


def test_v2_inet6_v4_mapped_written_like_nginx():
    buf = SIG + bytes.fromhex('2121' '0024' '00000000000000000000ffffc0000201'
                              '00000000000000000000ffff7f000001' '0001' '0002')
    info, n = parse(buf)
    assert (info.src_addr, info.dst_addr) == ('::ffff:192.0.2.1', '::ffff:127.0.0.1')


def test_v2_tlvs_and_ssl():
    info, n = parse(V2_INET_TLVS)
    assert n == len(V2_INET_TLVS) == 57
    assert info.src_addr == '192.0.2.1'
    assert info.tlvs == {
        0x02: b'a.b',
        0x20: bytes.fromhex('0500000000' '210007') + b'TLSv1.3' + b'\x22\x00\x02cn'}
    assert info.ssl == SSLInfo(client=5, verify=0, version=b'TLSv1.3', cn=b'cn',
                               tlvs={0x21: b'TLSv1.3', 0x22: b'cn'})


def test_v2_truncated_tlv_keeps_the_earlier_ones():
    buf = SIG + bytes.fromhex('2111' '0014' 'c0000201c0000202007b162e'
                              '010001' '78' '02000a' '79')
    info, n = parse(buf)
    assert n == 36
    assert info.tlvs == {0x01: b'x'}
    assert info.ssl is None


def test_v2_short_ssl_tlv_is_not_decoded():
    buf = SIG + bytes.fromhex('2111' '0013' 'c0000201c0000202007b162e'
                              '200004' '01000000')
    info, _ = parse(buf)
    assert info.tlvs == {0x20: b'\x01\x00\x00\x00'}
    assert info.ssl is None


@pytest.mark.parametrize('header, n', [
    (SIG + bytes.fromhex('2000' '0000'), 16),                       # LOCAL, UNSPEC
    (SIG + bytes.fromhex('2011' '000c' 'c0000201c0000202007b162e'), 28),  # LOCAL, INET
    (SIG + bytes.fromhex('2112' '000c' 'c0000201c0000202007b162e'), 28),  # INET DGRAM
    (SIG + bytes.fromhex('2131' '00d8') + bytes(216), 232),        # UNIX STREAM
    (SIG + bytes.fromhex('2101' '0000'), 16),                       # UNSPEC STREAM
    (SIG + bytes.fromhex('2151' '0003' '010203'), 19),              # unknown family
    (SIG + bytes.fromhex('2f11' '000c' 'c0000201c0000202007b162e'), 28),  # bad command
])
def test_v2_ignored_headers(header, n):
    info, consumed = parse(header + b'tail')
    assert consumed == n
    assert (info.src_addr, info.src_port, info.dst_addr, info.dst_port) == \
        (None, None, None, None)
    assert info.version == 2


def test_v2_local_keeps_tlvs():
    info, n = parse(SIG + bytes.fromhex('2000' '0007' '0300041c2b486c'))
    assert n == 23
    assert info.tlvs == {0x03: bytes.fromhex('1c2b486c')}
    assert info.src_addr is None


@pytest.mark.parametrize('byte, version', [(0x11, 1), (0x01, 0), (0x31, 3), (0xF1, 15)])
def test_v2_unknown_version(byte, version):
    buf = SIG + bytes((byte,)) + bytes.fromhex('11000c') + bytes(12)
    with pytest.raises(ProxyProtocolError,
                       match='^unknown PROXY protocol version: %d$' % version):
        parse(buf)


def test_v2_header_too_large():
    with pytest.raises(ProxyProtocolError, match='^header is too large$'):
        parse(SIG + bytes.fromhex('2111' '0ff1'))          # 16 + 4081 > 4096
    # 16 + 4080 = 4096 still fits: it only needs more bytes.
    assert parse(SIG + bytes.fromhex('2111' '0ff0')) == (None, 0)
    buf = SIG + bytes.fromhex('2111' '0ff0' 'c0000201c0000202007b162e') + bytes(4068)
    assert parse(buf)[1] == 4096


def test_v2_address_block_too_short():
    buf = SIG + bytes.fromhex('2111' '0008' 'c0000201c0000202')
    with pytest.raises(ProxyProtocolError) as info:
        parse(buf)
    assert info.value.level == logging.DEBUG      # nginx logs nothing here
    buf = SIG + bytes.fromhex('2121' '000c') + bytes(12)
    with pytest.raises(ProxyProtocolError):
        parse(buf)


def test_v2_bad_signature_is_a_broken_v1_header():
    with broken(''):
        parse(b'\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c')
    with broken(''):
        parse(b'\r\r')


def test_bytearray_and_memoryview_accepted():
    buf = b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n'
    assert parse(bytearray(buf))[1] == 32
    assert parse(memoryview(V2_INET))[1] == 28


# --- incremental parsing --------------------------------------------------------------

GOOD = [
    b'PROXY TCP4 192.0.2.1 192.0.2.2 123 5678\r\n',
    b'PROXY TCP6 2001:db8::1 ::1 65535 0\r\n',
    b'PROXY UNKNOWN\r\n',
    b'PROXY UNKNOWN ff::1 ff::2 1 2\r\n',
    V2_INET, V2_INET6, V2_INET_TLVS,
    SIG + bytes.fromhex('2000' '0000'),
]


@pytest.mark.parametrize('header', GOOD)
def test_split_at_every_byte(header):
    for i in range(len(header)):
        assert parse(header[:i]) == (None, 0), i
    whole = parse(header + b'a1 LOGIN')
    assert whole[1] == len(header)
    assert parse(header) == whole


@pytest.mark.parametrize('bad', [
    b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n',
    b'PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n',
    b'PROXY TCP4 1.2.3.4 5.6.7.x 1 2\r\n',
    SIG + bytes.fromhex('1111000c') + bytes(12),
    SIG + bytes.fromhex('21110008') + bytes(8),
])
def test_split_broken_fails_once_and_for_good(bad):
    failed = False
    for i in range(len(bad) + 1):
        try:
            result = parse(bad[:i])
        except ProxyProtocolError:
            failed = True
        else:
            assert not failed, i
            assert result == (None, 0)
    assert failed


# --- building -------------------------------------------------------------------------

@pytest.mark.parametrize('src, dst, line', [
    (('192.0.2.1', 123), ('127.0.0.1', 143),
     b'PROXY TCP4 192.0.2.1 127.0.0.1 123 143\r\n'),
    (('2001:db8:0:0:0:0:0:1', 5, 0, 0), ('::1', 6, 0, 0),
     b'PROXY TCP6 2001:db8::1 ::1 5 6\r\n'),
    (('fe80::1%eth0', 5, 0, 2), ('fe80::2', 6, 0, 2),
     b'PROXY TCP6 fe80::1 fe80::2 5 6\r\n'),
    (('::ffff:192.0.2.1', 5, 0, 0), ('::ffff:127.0.0.1', 6, 0, 0),
     b'PROXY TCP6 ::ffff:192.0.2.1 ::ffff:127.0.0.1 5 6\r\n'),
    # realip can give an IPv4 client on an IPv6 listener: as in nginx, the source
    # address decides.
    (('192.0.2.1', 5), ('::1', 6, 0, 0), b'PROXY TCP4 192.0.2.1 ::1 5 6\r\n'),
    (None, ('127.0.0.1', 143), b'PROXY UNKNOWN\r\n'),
    ('/run/mail.sock', '/run/mail.sock', b'PROXY UNKNOWN\r\n'),
    (('192.0.2.1', 5), None, b'PROXY UNKNOWN\r\n'),
    (('not-an-ip', 5), ('127.0.0.1', 6), b'PROXY UNKNOWN\r\n'),
])
def test_build_v1(src, dst, line):
    assert pp.build_v1(src, dst) == line


def test_build_v2_inet():
    assert pp.build_v2(('192.0.2.1', 123), ('192.0.2.2', 5678)) == bytes.fromhex(
        '0d0a0d0a000d0a515549540a' '2111' '0013'
        'c0000201' 'c0000202' '007b' '162e'
        '030004' '1c2b486c')


def test_build_v2_mixed_is_inet6_with_v4_mapped_end():
    assert pp.build_v2(('2001:db8::1', 443, 0, 0), ('192.0.2.2', 993)) == bytes.fromhex(
        '0d0a0d0a000d0a515549540a' '2121' '002b'
        '20010db8000000000000000000000001' '00000000000000000000ffffc0000202'
        '01bb' '03e1' '030004' 'd57cd899')


def test_build_v2_both_v4_mapped_is_inet():
    mapped = pp.build_v2(('::ffff:192.0.2.1', 123, 0, 0),
                         ('::ffff:192.0.2.2', 5678, 0, 0))
    assert mapped == pp.build_v2(('192.0.2.1', 123), ('192.0.2.2', 5678))
    assert pp.build_v2(('::ffff:192.0.2.1', 123, 0, 0), ('192.0.2.2', 5678))[13] == 0x11


def test_build_v2_local():
    expected = bytes.fromhex(
        '0d0a0d0a000d0a515549540a' '2000' '0007' '030004' 'a9b87e8f')
    assert pp.build_v2(None, ('192.0.2.2', 993)) == expected
    assert pp.build_v2('/run/sock', ('192.0.2.2', 993)) == expected


TLS = {'sni': 'mail.example.com', 'alpn': 'imap', 'version': 'TLSv1.3',
       'cipher': 'TLS_AES_256_GCM_SHA384', 'cn': 'client', 'verify': 0,
       'client_cert': True, 'presented': True, 'sig_alg': 'RSA-SHA256',
       'key_alg': 'RSA2048'}


def test_build_v2_tls_exact():
    assert pp.build_v2(('192.0.2.1', 123), ('192.0.2.2', 5678), TLS) == bytes.fromhex(
        '0d0a0d0a000d0a515549540a' '2111' '0078' 'c0000201c0000202007b162e'
        '020010') + b'mail.example.com' + bytes.fromhex(
        '010004') + b'imap' + bytes.fromhex(
        '200048' '07' '00000000'
        '210007') + b'TLSv1.3' + bytes.fromhex(
        '220006') + b'client' + bytes.fromhex(
        '230016') + b'TLS_AES_256_GCM_SHA384' + bytes.fromhex(
        '24000a') + b'RSA-SHA256' + bytes.fromhex(
        '250007') + b'RSA2048' + bytes.fromhex(
        '030004' '7166ae34')


@pytest.mark.parametrize('tls, flags, verify', [
    ({}, 0x01, 1),                                       # no client certificate
    ({'client_cert': True}, 0x05, 0),                    # resumed session
    ({'client_cert': True, 'presented': True}, 0x07, 0),
    ({'client_cert': True, 'presented': True, 'verify': 20}, 0x07, 20),
    ({'presented': True}, 0x01, 1),
])
def test_build_v2_ssl_flags(tls, flags, verify):
    info, _ = parse(pp.build_v2(('192.0.2.1', 1), ('192.0.2.2', 2), tls))
    assert (info.ssl.client, info.ssl.verify) == (flags, verify)
    assert pp.PP2_TYPE_AUTHORITY not in info.tlvs
    assert pp.PP2_TYPE_ALPN not in info.tlvs


def test_build_v2_tls_round_trip():
    info, n = parse(pp.build_v2(('192.0.2.1', 123), ('192.0.2.2', 5678), TLS))
    assert n == 136
    assert info.tlvs[pp.PP2_TYPE_AUTHORITY] == b'mail.example.com'
    assert info.tlvs[pp.PP2_TYPE_ALPN] == b'imap'
    assert info.ssl == SSLInfo(
        client=7, verify=0, version=b'TLSv1.3', cn=b'client',
        cipher=b'TLS_AES_256_GCM_SHA384', sig_alg=b'RSA-SHA256', key_alg=b'RSA2048',
        tlvs={0x21: b'TLSv1.3', 0x22: b'client', 0x23: b'TLS_AES_256_GCM_SHA384',
              0x24: b'RSA-SHA256', 0x25: b'RSA2048'})


@pytest.mark.parametrize('tls', [None, {}, TLS])
def test_build_v2_crc_covers_header_with_zeroed_field(tls):
    header = pp.build_v2(('2001:db8::5', 1, 0, 0), ('::1', 2, 0, 0), tls)
    assert header[-7:-4] == b'\x03\x00\x04'
    zeroed = header[:-4] + b'\x00\x00\x00\x00'
    assert int.from_bytes(header[-4:], 'big') == crc32c_bitwise(zeroed)


# --- CRC32C ---------------------------------------------------------------------------

def test_crc32c_known_vectors():
    assert pp.crc32c(b'123456789') == 0xE3069283
    assert pp.crc32c(b'') == 0
    assert pp.crc32c(bytes(32)) == 0x8A9136AA             # RFC 3720 B.4
    assert pp.crc32c(b'\xff' * 32) == 0x62A8AB43


@given(st.binary(max_size=200), st.binary(max_size=50))
def test_crc32c_matches_bitwise_and_chains(a, b):
    assert pp.crc32c(a) == crc32c_bitwise(a)
    assert pp.crc32c(b, pp.crc32c(a)) == pp.crc32c(a + b)


# --- round trips and properties -------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


def endpoint(addrs):
    return st.tuples(addrs, ports)


def canonical(text):
    """What nginx prints for an address: IPv4 as is, IPv6 per ngx_inet6_ntop."""
    addr = ipaddress.ip_address(text)
    return text if addr.version == 4 else pp._inet6_ntop(addr.packed)


ip_endpoint = st.one_of(endpoint(ipv4), endpoint(ipv6))


@given(ip_endpoint, ip_endpoint)
def test_v1_round_trip(src, dst):
    line = pp.build_v1(src, dst)
    assert len(line) <= 107
    info, n = parse(line + b'next')
    assert n == len(line)
    assert (info.src_addr, info.src_port, info.dst_addr, info.dst_port) == \
        (canonical(src[0]), src[1], canonical(dst[0]), dst[1])


@given(ip_endpoint, ip_endpoint,
       st.none() | st.fixed_dictionaries({}, optional={
           'sni': st.text('abc.-', min_size=1, max_size=20),
           'alpn': st.sampled_from(['imap', 'pop3']), 'version': st.just('TLSv1.2'),
           'cn': st.text('xyz\u00e9 ', min_size=1, max_size=20),
           'verify': st.integers(0, 2 ** 32 - 1), 'client_cert': st.booleans()}))
def test_v2_round_trip(src, dst, tls):
    header = pp.build_v2(src, dst, tls)
    info, n = parse(header + b'\x16\x03')
    assert n == len(header)
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    v4 = [a if a.version == 4 else a.ipv4_mapped for a in (s, d)]
    if None not in v4:
        expected = (str(v4[0]), str(v4[1]))
    else:
        expected = tuple(pp._inet6_ntop(a.packed if a.version == 6 else
                                        ipaddress.IPv6Address('::ffff:%s' % a).packed)
                         for a in (s, d))
    assert (info.src_addr, info.dst_addr) == expected
    assert (info.src_port, info.dst_port) == (src[1], dst[1])
    assert pp.PP2_TYPE_CRC32C in info.tlvs
    if tls is None:
        assert info.ssl is None
    else:
        assert info.ssl.client & pp.PP2_CLIENT_SSL
        if 'cn' in tls:
            assert info.ssl.cn == tls['cn'].encode()
        if 'sni' in tls:
            assert info.tlvs[pp.PP2_TYPE_AUTHORITY] == tls['sni'].encode()


@given(st.binary(min_size=16, max_size=16))
def test_inet6_ntop_text_parses_back(packed):
    assert ipaddress.IPv6Address(pp._inet6_ntop(packed)).packed == packed


@pytest.mark.parametrize('text, nginx', [
    ('::', '::'),
    ('::1', '::1'),
    ('::2', '::2'),
    ('1::', '1::'),
    ('1:0:0:2:0:0:3:4', '1::2:0:0:3:4'),         # the first of equal runs wins
    ('1:0:0:2::3', '1:0:0:2::3'),                # the longest run wins
    ('1:0:2:3:4:5:6:7', '1:0:2:3:4:5:6:7'),      # a single zero word is not compressed
    ('::ffff:1.2.3.4', '::ffff:1.2.3.4'),
    ('::1.2.3.4', '::1.2.3.4'),                  # v4-compatible
    ('::0.0.1.2', '::0.0.1.2'),                  # nginx's max == 7 case
    ('2001:db8::ff00:42:8329', '2001:db8::ff00:42:8329'),
])
def test_inet6_ntop_like_nginx(text, nginx):
    assert pp._inet6_ntop(ipaddress.IPv6Address(text).packed) == nginx


def check_parse(buf):
    try:
        info, n = parse(buf)
    except ProxyProtocolError as e:
        assert e.message
        return None
    if info is None:
        assert n == 0
    else:
        assert 0 < n <= len(buf)
        assert parse(buf[:n]) == (info, n)
    return info, n


@given(st.binary(max_size=300))
def test_parse_any_bytes(buf):
    check_parse(buf)


@given(st.sampled_from([b'PROXY ', b'PROXY TCP4 ', b'PROXY TCP6 ', b'PROXY UNKNOWN',
                        SIG, SIG + b'\x21', SIG + b'\x21\x11', SIG + b'\x21\x21\x00']),
       st.lists(st.sampled_from(list(b'0123456789abcdef.: \r\n\x00\x01\x0c\x24\xff')),
                max_size=120).map(bytes),
       st.binary(max_size=20))
def test_parse_near_valid_bytes(prefix, middle, extra):
    buf = prefix + middle
    result = check_parse(buf)
    if result is not None and result[0] is not None:
        # More bytes never change a complete header.
        assert parse(buf + extra) == result
