"""PROXY protocol: parse v1/v2 from clients, build v1/v2 for backends.

Parsing mirrors ngx_proxy_protocol_read / ngx_proxy_protocol_v2_read
(realip_proxy_protocol.md section 1) but is incremental: ``parse`` says when it needs
more bytes, and fails as soon as no continuation could make a valid header. Building
mirrors ngx_proxy_protocol_write / ngx_proxy_protocol_v2_write (proxy.md section 4).
"""
import ipaddress
import logging
import re
from dataclasses import dataclass, field

from .errors import ProxyError

V1_MAX_HEADER = 107         # NGX_PROXY_PROTOCOL_V1_MAX_HEADER: longest valid v1 line
MAX_HEADER = 4096           # NGX_PROXY_PROTOCOL_MAX_HEADER: what nginx peeks at once
V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'

# v2 TLV types (and the SSL sub-TLVs) from the HAProxy specification.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_ADDR_SIZES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}      # UNSPEC, INET, INET6, UNIX

# A complete v1 TCP line: addresses are runs of hex digits, '.' and ':' (possibly empty,
# as nginx does not check further); ports are decimal (ngx_atoi).
_V1_TCP = re.compile(
    rb'PROXY TCP([46]) ([0-9A-Fa-f.:]*) ([0-9A-Fa-f.:]*) ([0-9]+) ([0-9]+)\r\n')
# Everything a v1 TCP line can start with once "PROXY TCPn " is in: used to tell
# "incomplete" from "broken" without waiting for more bytes.
_V1_TCP_PARTIAL = re.compile(
    rb'PROXY TCP[46] [0-9A-Fa-f.:]*(?: [0-9A-Fa-f.:]*'
    rb'(?: ([0-9]*)(?:(?<=[0-9]) ([0-9]*)(?:(?<=[0-9])\r)?)?)?)?')
_V1_STARTS = (b'PROXY TCP4 ', b'PROXY TCP6 ', b'PROXY UNKNOWN')
_UP_TO_EOL = re.compile(rb'[^\r\n]*')


class ProxyProtocolError(ProxyError):
    """A malformed PROXY header: logged, then the connection closes without a reply."""
    reply = None
    level = logging.ERROR


@dataclass(slots=True)
class SSLInfo:
    """The v2 SSL TLV: client flags, verify result, sub-TLVs (by name and raw)."""
    client: int
    verify: int
    version: bytes | None = None
    cn: bytes | None = None
    cipher: bytes | None = None
    sig_alg: bytes | None = None
    key_alg: bytes | None = None
    tlvs: dict = field(default_factory=dict)


@dataclass(slots=True)
class ProxyInfo:
    """What a PROXY header said. Addresses and ports are None for v1 UNKNOWN, v2 LOCAL
    and non-IP v2 headers, which nginx treats as if no header had been sent."""
    src_addr: str | None = None
    src_port: int | None = None
    dst_addr: str | None = None
    dst_port: int | None = None
    version: int = 1
    tlvs: dict = field(default_factory=dict)        # v2: type -> value, first wins
    ssl: SSLInfo | None = None                      # v2: the decoded SSL TLV


# --- parsing --------------------------------------------------------------------------

def parse(buf: bytes) -> tuple[ProxyInfo | None, int]:
    """Parse a PROXY header at the start of ``buf``.

    Returns ``(None, 0)`` while more bytes are needed, ``(info, consumed)`` for a
    complete header, and raises ``ProxyProtocolError`` with nginx's log text otherwise.
    """
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    if buf[:1] == b'\r':            # the v2 signature starts with CRLF, v1 with "PROXY"
        return _parse_v2(buf)
    return _parse_v1(buf)


def _broken(buf: bytes) -> ProxyProtocolError:
    quoted = _UP_TO_EOL.match(buf, 0, MAX_HEADER).group()
    return ProxyProtocolError('broken header: "%s"' % quoted.decode('latin-1'))


def _parse_v1(buf: bytes) -> tuple[ProxyInfo | None, int]:
    m = _V1_TCP.match(buf)
    if m is not None:
        src_port, dst_port = int(m.group(4)), int(m.group(5))
        if m.end() > V1_MAX_HEADER or src_port > 65535 or dst_port > 65535:
            raise _broken(buf)
        return ProxyInfo(m.group(2).decode('ascii'), src_port,
                         m.group(3).decode('ascii'), dst_port), m.end()
    if buf.startswith(b'PROXY UNKNOWN'):
        # nginx skips anything up to the first CRLF and ignores the header.
        end = buf.find(b'\r\n', 13, V1_MAX_HEADER)
        if end >= 0:
            return ProxyInfo(), end + 2
    elif not _v1_may_continue(buf):
        raise _broken(buf)
    if len(buf) >= V1_MAX_HEADER:
        raise _broken(buf)
    return None, 0


def _v1_may_continue(buf: bytes) -> bool:
    """True when some continuation of ``buf`` is a valid v1 TCP or UNKNOWN line."""
    if any(start.startswith(buf) for start in _V1_STARTS):
        return True
    m = _V1_TCP_PARTIAL.fullmatch(buf)
    if m is None:
        return False
    # Adding digits never makes a port smaller, so an oversized one is final.
    return all(not port or int(port) <= 65535 for port in m.groups())


def _parse_v2(buf: bytes) -> tuple[ProxyInfo | None, int]:
    if not V2_SIGNATURE.startswith(buf[:12]):
        raise _broken(buf)
    if len(buf) < 16:
        return None, 0
    version = buf[12] >> 4
    if version != 2:
        raise ProxyProtocolError('unknown PROXY protocol version: %d' % version)
    end = 16 + int.from_bytes(buf[14:16], 'big')
    if end > MAX_HEADER:
        raise ProxyProtocolError('header is too large')
    if len(buf) < end:
        return None, 0
    command, family, transport = buf[12] & 0x0F, buf[13] >> 4, buf[13] & 0x0F
    body = buf[16:end]
    size = _ADDR_SIZES.get(family)
    info = ProxyInfo(version=2)
    if command != 1 or transport != 1 or family not in (1, 2):
        # nginx consumes and ignores LOCAL, non-STREAM and non-IP headers.
        if size is not None and len(body) >= size:
            _read_tlvs(info, body[size:])
        return info, end
    if len(body) < size:
        # nginx closes the connection here without logging anything.
        raise ProxyProtocolError('PROXY protocol v2 address block is too short',
                                 level=logging.DEBUG)
    half = (size - 4) // 2
    ntop = _inet_ntop if family == 1 else _inet6_ntop
    info.src_addr, info.dst_addr = ntop(body[:half]), ntop(body[half:2 * half])
    info.src_port = int.from_bytes(body[2 * half:2 * half + 2], 'big')
    info.dst_port = int.from_bytes(body[2 * half + 2:size], 'big')
    _read_tlvs(info, body[size:])
    return info, end


def _split_tlvs(data: bytes) -> dict:
    """type -> value for each TLV, the first of a type winning
    (ngx_proxy_protocol_lookup_tlv). A truncated TLV ends the list: nginx only
    complains when a module asks for a TLV, and the mail modules never do."""
    tlvs = {}
    pos, n = 0, len(data)
    while pos + 3 <= n:
        length = int.from_bytes(data[pos + 1:pos + 3], 'big')
        if pos + 3 + length > n:
            break
        tlvs.setdefault(data[pos], data[pos + 3:pos + 3 + length])
        pos += 3 + length
    return tlvs


def _read_tlvs(info: ProxyInfo, data: bytes) -> None:
    info.tlvs = _split_tlvs(data)
    value = info.tlvs.get(PP2_TYPE_SSL)
    if value is None or len(value) < 5:
        return
    sub = _split_tlvs(value[5:])
    info.ssl = SSLInfo(value[0], int.from_bytes(value[1:5], 'big'),
                       sub.get(PP2_SUBTYPE_SSL_VERSION), sub.get(PP2_SUBTYPE_SSL_CN),
                       sub.get(PP2_SUBTYPE_SSL_CIPHER),
                       sub.get(PP2_SUBTYPE_SSL_SIG_ALG),
                       sub.get(PP2_SUBTYPE_SSL_KEY_ALG), sub)


def _inet_ntop(packed: bytes) -> str:
    return '%d.%d.%d.%d' % tuple(packed)


def _inet6_ntop(p: bytes) -> str:
    """IPv6 text exactly as nginx's ngx_inet6_ntop writes it: the first longest run of
    two or more zero words becomes "::", and v4-mapped (and some v4-compatible)
    addresses end in dotted decimal."""
    words = [p[i] << 8 | p[i + 1] for i in range(0, 16, 2)]
    zero, best, run, start = -1, 1, 0, -1
    for i, w in enumerate(words + [1]):         # the sentinel closes a trailing run
        if w == 0:
            if run == 0:
                start = i
            run += 1
            continue
        if run > best:
            zero, best = start, run
        run = 0
    count = 8
    out = ''
    if zero == 0:
        if ((best == 5 and words[5] == 0xFFFF) or best == 6
                or (best == 7 and p[14] != 0 and p[15] != 1)):
            count = 6
        out = ':'
    i = 0
    while i < count:
        if i == zero:
            out += ':'
            i += best
            continue
        out += '%x' % words[i]
        if i < 7:
            out += ':'
        i += 1
    if count == 6:
        out += '%d.%d.%d.%d' % tuple(p[12:])
    return out


# --- building -------------------------------------------------------------------------

def _ip(endpoint) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a socket address tuple, or None for anything else (UNIX)."""
    if not (isinstance(endpoint, tuple) and endpoint and isinstance(endpoint[0], str)):
        return None
    try:
        return ipaddress.ip_address(endpoint[0].split('%', 1)[0])   # drop a scope id
    except ValueError:
        return None


def _ntop(addr) -> bytes:
    if addr.version == 4:
        return str(addr).encode()
    return _inet6_ntop(addr.packed).encode()


def build_v1(src: tuple | None, dst: tuple | None) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` (ngx_proxy_protocol_write).

    As in nginx the source address decides TCP4 or TCP6; a non-IP end (None or a UNIX
    socket address) gives ``PROXY UNKNOWN\\r\\n``.
    """
    s, d = _ip(src), _ip(dst)
    if s is None or d is None:
        return b'PROXY UNKNOWN\r\n'
    return b'PROXY TCP%d %s %s %d %d\r\n' % (s.version, _ntop(s), _ntop(d),
                                             src[1], dst[1])


def _as_v4(addr):
    if addr.version == 4:
        return addr
    return addr.ipv4_mapped


def _as_v6(addr) -> bytes:
    if addr.version == 6:
        return addr.packed
    return b'\x00' * 10 + b'\xff\xff' + addr.packed


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + len(value).to_bytes(2, 'big') + value


def _text(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _tls_tlvs(tls: dict) -> bytes:
    """AUTHORITY, ALPN and SSL (with its sub-TLVs) as proxy.md section 4 lists them."""
    out = b''
    if tls.get('sni'):
        out += _tlv(PP2_TYPE_AUTHORITY, _text(tls['sni']))
    if tls.get('alpn'):
        out += _tlv(PP2_TYPE_ALPN, _text(tls['alpn']))
    client = PP2_CLIENT_SSL
    has_cert = bool(tls.get('client_cert'))
    if has_cert:
        client |= PP2_CLIENT_CERT_SESS
        if tls.get('presented'):
            client |= PP2_CLIENT_CERT_CONN
    verify = tls.get('verify')
    if verify is None:
        verify = 0 if has_cert else 1           # 1: no client certificate
    ssl = bytes((client,)) + (verify & 0xFFFFFFFF).to_bytes(4, 'big')
    for kind, key in ((PP2_SUBTYPE_SSL_VERSION, 'version'), (PP2_SUBTYPE_SSL_CN, 'cn'),
                      (PP2_SUBTYPE_SSL_CIPHER, 'cipher'),
                      (PP2_SUBTYPE_SSL_SIG_ALG, 'sig_alg'),
                      (PP2_SUBTYPE_SSL_KEY_ALG, 'key_alg')):
        if tls.get(key):
            ssl += _tlv(kind, _text(tls[key]))
    return out + _tlv(PP2_TYPE_SSL, ssl)


def build_v2(src: tuple | None, dst: tuple | None, tls: dict | None = None) -> bytes:
    """A v2 header (ngx_proxy_protocol_v2_write, proxy.md section 4).

    IPv4 when both ends are IPv4 or v4-mapped, else IPv6 (IPv4 ends as ::ffff:a.b.c.d);
    LOCAL with no addresses when either end is not IP. ``tls`` (keys sni, alpn, version,
    cipher, cn, verify, client_cert, presented, sig_alg, key_alg) adds the AUTHORITY,
    ALPN and SSL TLVs. A CRC32C TLV always ends the header.
    """
    s, d = _ip(src), _ip(dst)
    if s is None or d is None:
        command, family, addrs = 0x20, 0x00, b''
    else:
        ports = src[1].to_bytes(2, 'big') + dst[1].to_bytes(2, 'big')
        s4, d4 = _as_v4(s), _as_v4(d)
        if s4 is not None and d4 is not None:
            command, family, addrs = 0x21, 0x11, s4.packed + d4.packed + ports
        else:
            command, family, addrs = 0x21, 0x21, _as_v6(s) + _as_v6(d) + ports
    tlvs = _tls_tlvs(tls) if tls is not None else b''
    header = (V2_SIGNATURE + bytes((command, family))
              + (len(addrs) + len(tlvs) + 7).to_bytes(2, 'big') + addrs + tlvs
              + b'\x03\x00\x04')
    return header + crc32c(header + b'\x00\x00\x00\x00').to_bytes(4, 'big')


# --- CRC32C ---------------------------------------------------------------------------
# Pure Python: no CRC32C package is installed, and headers are a few hundred bytes.

def _crc32c_table() -> tuple:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1     # reflected Castagnoli
        table.append(n)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as the v2 PP2_TYPE_CRC32C TLV carries it."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
