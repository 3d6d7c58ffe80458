"""The real client address: PROXY protocol in and out, ``set_real_ip_from``, and,
beyond nginx, the client passed to an IMAP backend in ``ID`` and to auth_http in
``Client-Port`` (realip_proxy_protocol.md, proxy.md section 4).

``accept`` reads the client's PROXY header without reading a byte past it (implicit
TLS may follow): it peeks, and receives exactly the bytes that belong to the header.
When the TCP peer is trusted the header's source replaces ``s.peer`` and
``s.client_ip``, which every later stage uses (logs, Client-IP, XCLIENT, resolver, the
backend's PROXY header).
"""
import ipaddress
import os
import socket

from . import errors
from . import proxy_protocol as pp
from . import ssl as tls
from .config import values
from .config.address import inet6_addr, inet_addr
from .config.directives import D, MAIL_SERVER
from .stream import os_error_text

DIRECTIVES = [
    D('set_real_ip_from', MAIL_SERVER, '1', values.real_ip_from, multi='append',
      default=()),
    # Beyond nginx: ID x-originating-ip/-port, x-connected-ip/-port, x-session-id to an
    # IMAP backend before LOGIN (Dovecot trusts them from login_trusted_networks).
    D('imap_forward_client_id', MAIL_SERVER, '1', values.flag, default=False),
    # Beyond nginx: a Client-Port header to auth_http; off keeps nginx's exact request.
    D('auth_http_client_port', MAIL_SERVER, '1', values.flag, default=False),
]

ACTION = 'reading PROXY protocol'


# --- from the client ------------------------------------------------------------------

def accept(s) -> None:
    """Read the client's PROXY header under the session's ``timeout`` deadline; a
    broken one is logged at error and closes the connection without a reply.

    Beyond nginx, a header split across TCP segments is waited for (nginx parses one
    peek and rejects it as broken); an end of file mid-header gets nginx's message for
    what had arrived.
    """
    action, s.action = s.action, ACTION
    info = read_header(s.sock)
    if info.src_addr is not None:         # UNKNOWN and LOCAL: as if no header was sent
        s.proxy_info = info
        if trusted(s.conf.set_real_ip_from, s.peer):
            set_client(s, info.src_addr, info.src_port)
    s.action = action


def read_header(sock) -> pp.ProxyInfo:
    """The header, taking exactly its bytes off ``sock``; ProxyProtocolError if
    broken."""
    got = b''                               # header bytes already taken off the socket
    while True:
        data = _recv(sock, pp.MAX_HEADER - len(got), socket.MSG_PEEK)
        buf = got + data
        if buf[:1] != b'\r':
            buf = buf[:pp.V1_MAX_HEADER]    # nginx never looks further into a v1 line
        if not data:
            raise _eof_error(buf)
        info, size = pp.parse(buf)
        if info is not None:
            _take(sock, size - len(got))
            return info
        # Incomplete: everything peeked is header, so it may be consumed; the next peek
        # then blocks until more arrives.
        _take(sock, len(buf) - len(got))
        got = buf


def _recv(sock, size: int, flags: int = 0) -> bytes:
    try:
        return sock.recv(size, flags)
    except OSError as exc:
        raise errors.ClientError(os_error_text('recv', exc)) from None


def _take(sock, size: int) -> None:
    while size > 0:
        data = _recv(sock, size)
        if not data:
            raise errors.ClientClosed()
        size -= len(data)


def _eof_error(buf: bytes) -> pp.ProxyProtocolError:
    """What nginx logs for ``buf`` taken as its only snapshot of the connection."""
    if len(buf) >= 16 and buf.startswith(pp.V2_SIGNATURE):
        return pp.ProxyProtocolError('header is too large')
    end = len(buf)
    for stop in (b'\r', b'\n'):
        found = buf.find(stop)
        if 0 <= found < end:
            end = found
    return pp.ProxyProtocolError('broken header: "%s"' % buf[:end].decode('latin-1'))


def trusted(entries, peer) -> bool:
    """nginx ngx_cidr_match on the TCP peer: ``unix:`` matches UNIX-socket clients,
    and a v4-mapped IPv6 peer is matched as IPv4. ``entries``: a tuple per directive."""
    if not isinstance(peer, tuple):
        return any(net == 'unix:' for group in entries for net in group)
    try:
        ip = ipaddress.ip_address(peer[0].split('%', 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(net != 'unix:' and ip.version == net.version and ip in net
               for group in entries for net in group)


def set_client(s, addr: str, port: int) -> None:
    """nginx ngx_mail_realip_set_addr: only an IPv4 or IPv6 literal replaces the client,
    rewritten the way nginx prints it."""
    text = inet_addr(addr)
    if text == '255.255.255.255':
        text = None                         # INADDR_NONE: ngx_inet_addr's failure value
    if text is None and inet6_addr(addr) is not None:
        # ngx_sock_ntop's spelling, as proxy_protocol writes v2 addresses
        text = pp._inet6_ntop(socket.inet_pton(socket.AF_INET6, addr))
    if text is not None:
        s.peer = (text, port)
        s.client_ip = text


# --- to the backend -------------------------------------------------------------------

def backend_header(s) -> bytes | None:
    """The PROXY header for the backend (``proxy_protocol on|v2``): source is the client
    after realip, destination our local address on the client connection."""
    version = s.conf.proxy_protocol
    if version == 'on':
        return pp.build_v1(*one_family(s.peer, s.local))
    if version == 'v2':
        return pp.build_v2(s.peer, s.local, tls_info(s) if s.tls else None)
    return None


def one_family(src, dst) -> tuple:
    """Beyond nginx: a v1 line names one family for both ends, so when realip made
    them differ (an IPv6 client on an IPv4 listener) we write them as v2 does: IPv4 if
    both can be, else IPv6 with ``::ffff:a.b.c.d``. nginx writes e.g. ``PROXY TCP6 ::1
    127.0.0.1``, which receivers reject (Dovecot: "Proxied local address is
    invalid")."""
    ends = []
    for end in (src, dst):
        try:
            ends.append(ipaddress.ip_address(end[0].split('%', 1)[0]))
        except (TypeError, ValueError, IndexError):
            return src, dst                 # not IP: build_v1 writes UNKNOWN
    if ends[0].version == ends[1].version:
        return src, dst
    v4 = [ip if ip.version == 4 else ip.ipv4_mapped for ip in ends]
    if None not in v4:
        return (str(v4[0]), src[1]), (str(v4[1]), dst[1])
    text = [str(ip) if ip.version == 6 else '::ffff:%s' % ip for ip in ends]
    return (text[0], src[1]), (text[1], dst[1])


def send_backend_header(s, sock) -> None:
    """Write the header in one send, first thing on the backend connection."""
    header = backend_header(s)
    if header is None:
        return
    s.action = 'sending PROXY protocol header to upstream'
    try:
        sent = sock.send(header)
    except OSError as exc:
        raise errors.UpstreamError(os_error_text('send', exc)) from None
    if sent != len(header):
        raise errors.UpstreamError('could not send PROXY protocol header at once')


def tls_info(s) -> dict:
    """The v2 TLS TLV values (proxy.md section 4) that the client's TLS socket shows.

    Not yet known here, so left out: the SNI name (AUTHORITY) and our own certificate's
    SIG_ALG/KEY_ALG; nginx sends them."""
    sock = s.sock
    info = {'version': sock.version(), 'alpn': sock.selected_alpn_protocol()}
    cipher = sock.cipher()
    if cipher:
        info['cipher'] = cipher[0]
    if sock.getpeercert(binary_form=True) is not None:
        info['client_cert'] = True
        info['presented'] = not sock.session_reused      # not from a resumed session
        info['verify'] = tls.lib().SSL_get_verify_result(tls.ssl_pointer(sock))
        for rdn in sock.getpeercert().get('subject', ()):
            for key, value in rdn:
                if key == 'commonName':
                    info['cn'] = value
    return info


# --- beyond nginx: the client in IMAP ID and in auth_http -----------------------------

def imap_id_command(s, tag: bytes) -> bytes:
    """``<tag>ID ("x-originating-ip" "<ip>" "x-originating-port" "<port>" ...)``: what
    Dovecot takes from a proxy in login_trusted_networks. ``tag`` ends in a space."""
    fields = []
    if isinstance(s.peer, tuple):           # not for UNIX-socket clients: no address
        fields += [(b'x-originating-ip', s.client_ip.encode()),
                   (b'x-originating-port', b'%d' % s.peer[1])]
    if isinstance(s.local, tuple):
        fields += [(b'x-connected-ip', s.local[0].split('%', 1)[0].encode()),
                   (b'x-connected-port', b'%d' % s.local[1])]
    fields.append((b'x-session-id', session_id(s)))
    pairs = b' '.join(b'"%s" "%s"' % pair for pair in fields)
    return b'%sID (%s)\r\n' % (tag, pairs)


def session_id(s) -> bytes:
    """``<pid>-<N>`` for the session our log shows as ``PID#TID: *N``; Dovecot logs
    it as ``session=<...>`` (at most 64 characters)."""
    return b'%d-%d' % (os.getpid(), s.conn_id)


def client_port_header(s) -> bytes:
    """``Client-Port: <port>\\r\\n`` for auth_http when ``auth_http_client_port`` is on
    and the client is an IP endpoint; else nothing."""
    if s.conf.auth_http_client_port and isinstance(s.peer, tuple):
        return b'Client-Port: %d\r\n' % s.peer[1]
    return b''
