"""Address syntaxes (nginx ngx_inet.c, ngx_parse_url) and the ``listen`` directive.

Shared by ``listen``, ``resolver``, ``auth_http`` and ``set_real_ip_from``. Host names are
resolved here, at load time, with a per-load cache.
"""
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

MAX_INT = 2 ** 63 - 1
_PORT_ONLY = re.compile(r'[0-9]+(?:-[0-9]+)?\Z')
SUN_PATH_MAX = 108  # sizeof(sun_path) on Linux, including the NUL


class UrlError(ValueError):
    """A parse failure; ``str()`` is nginx's short reason (``invalid port``)."""


def atoi(text: str) -> int | None:
    """nginx ngx_atoi: ASCII digits only, no sign, no overflow; else None."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    n = int(text)
    return n if n <= MAX_INT else None


def inet_addr(text: str) -> str | None:
    """nginx ngx_inet_addr: a dotted quad (empty octets count as 0); canonical text."""
    addr = octet = dots = 0
    for c in text:
        if '0' <= c <= '9':
            octet = octet * 10 + ord(c) - 48
            if octet > 255:
                return None
        elif c == '.':
            addr = (addr << 8) + octet
            octet = 0
            dots += 1
        else:
            return None
    if dots != 3:
        return None
    return socket.inet_ntoa(struct.pack('!I', ((addr << 8) + octet) & 0xffffffff))


def inet6_addr(text: str) -> str | None:
    """A literal IPv6 address (no zone index, as nginx's ngx_inet6_addr); canonical text."""
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def resolve(host: str, cache: dict | None = None) -> list[tuple[int, str]]:
    """Every address of ``host``, IPv4 first then IPv6, without duplicates
    (ngx_inet_resolve_host). Raises ``UrlError('host not found')``."""
    if cache is not None and host in cache:
        return cache[host]
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UrlError('host not found') from None
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for fam, _, _, _, sockaddr in infos:
            if fam == family and (fam, sockaddr[0]) not in found:
                found.append((fam, sockaddr[0]))
    if not found:
        raise UrlError('host not found')
    if cache is not None:
        cache[host] = found
    return found


@dataclass(slots=True)
class Url:
    """A parsed address: ``addrs`` lists (family, ip) pairs, or (AF_UNIX, path)."""
    family: int
    host: str                   # as written (IPv6 with its brackets); the path for unix:
    addrs: list
    ports: list = field(default_factory=list)
    uri: str = ''
    wildcard: bool = False
    no_port: bool = False


def parse_url(text: str, listen: bool = False, uri_part: bool = False,
              default_port: int = 0, cache: dict | None = None) -> Url:
    """nginx ngx_parse_url: ``unix:PATH``, ``[IPV6][:PORT]``, ``HOST[:PORT][/URI]``.

    ``listen`` allows a bare port, ``*`` and port ranges and forbids a URI.
    """
    if text[:5].lower() == 'unix:':
        return _parse_unix(text[5:], uri_part)
    if text[:1] == '[':
        return _parse_inet6(text, listen, uri_part, default_port)
    return _parse_inet(text, listen, uri_part, default_port, cache)


def _parse_unix(path: str, uri_part: bool) -> Url:
    uri = ''
    if uri_part:
        colon = path.find(':')
        if colon >= 0:
            path, uri = path[:colon], path[colon + 1:]
    if not path:
        raise UrlError('no path in the unix domain socket')
    if len(path.encode('utf-8', 'surrogateescape')) + 1 > SUN_PATH_MAX:
        raise UrlError('too long path in the unix domain socket')
    return Url(socket.AF_UNIX, path, [(socket.AF_UNIX, path)], uri=uri)


def _ports(text: str, listen: bool) -> list[int]:
    """A port, or for ``listen`` a LOW-HIGH range."""
    low, dash, high = text.partition('-') if listen else (text, '', '')
    first = atoi(low)
    if first is None or not 1 <= first <= 65535:
        raise UrlError('invalid port')
    if not dash:
        return [first]
    last = atoi(high)
    if last is None or not 1 <= last <= 65535:
        raise UrlError('invalid port')
    if last < first:
        raise UrlError('invalid port range')
    return list(range(first, last + 1))


def _split_uri(text: str, listen: bool, uri_part: bool) -> tuple[str, str]:
    uri_at = text.find('/')
    args_at = text.find('?')
    if args_at >= 0 and (uri_at < 0 or args_at < uri_at):
        uri_at = args_at
    if uri_at < 0:
        return text, ''
    if listen or not uri_part:
        raise UrlError('invalid host')
    return text[:uri_at], text[uri_at:]


def _parse_inet(text: str, listen: bool, uri_part: bool, default_port: int,
                cache: dict | None) -> Url:
    host, uri = _split_uri(text, listen, uri_part)
    colon = host.find(':')
    if colon >= 0:
        ports = _ports(host[colon + 1:], listen)
        host = host[:colon]
    elif listen and not uri and _PORT_ONLY.match(host):
        # A bare port (or range) listens on the IPv4 wildcard.
        return Url(socket.AF_INET, '*', [(socket.AF_INET, '0.0.0.0')],
                   _ports(host, listen), wildcard=True)
    else:
        return _inet_host(host, [default_port] if default_port else [], uri, listen,
                          cache, no_port=True)
    return _inet_host(host, ports, uri, listen, cache)


def _inet_host(host, ports, uri, listen, cache, no_port=False) -> Url:
    if not host:
        raise UrlError('no host')
    if listen and host == '*':
        return Url(socket.AF_INET, host, [(socket.AF_INET, '0.0.0.0')], ports, uri,
                   wildcard=True, no_port=no_port)
    ip = inet_addr(host)
    if ip is not None:
        return Url(socket.AF_INET, host, [(socket.AF_INET, ip)], ports, uri,
                   wildcard=ip == '0.0.0.0', no_port=no_port)
    addrs = resolve(host, cache)
    return Url(addrs[0][0], host, addrs, ports, uri, no_port=no_port)


def _parse_inet6(text: str, listen: bool, uri_part: bool, default_port: int) -> Url:
    close = text.find(']')
    if close < 0:
        raise UrlError('invalid host')
    rest, uri = _split_uri(text[close + 1:], listen, uri_part)
    no_port = not rest
    if rest:
        if rest[0] != ':':
            raise UrlError('invalid host')
        ports = _ports(rest[1:], listen)
    else:
        ports = [default_port] if default_port else []
    inner = text[1:close]
    if not inner:
        raise UrlError('no host')
    ip = inet6_addr(inner)
    if ip is None:
        raise UrlError('invalid IPv6 address')
    return Url(socket.AF_INET6, text[:close + 1], [(socket.AF_INET6, ip)], ports, uri,
               wildcard=ip == '::', no_port=no_port)


def sockaddr(family: int, ip: str, port: int) -> tuple:
    return (ip, port, 0, 0) if family == socket.AF_INET6 else (ip, port)


def addr_text(family: int, ip: str, port: int | None) -> str:
    """The normalised text nginx logs: ``127.0.0.1:8143``, ``[::1]:143``, ``unix:/p``."""
    if family == socket.AF_UNIX:
        return 'unix:' + ip
    if family == socket.AF_INET6:
        return '[%s]:%d' % (ip, port)
    return '%s:%d' % (ip, port)


@dataclass(slots=True, eq=False)
class Listen:
    """One listening address of one ``server {}`` (after host and range expansion)."""
    addr_text: str
    family: int
    sockaddr: Any               # (ip, port), (ip, port, 0, 0) or a unix path
    port: int | None
    wildcard: bool = False
    ssl: bool = False
    proxy_protocol: bool = False
    bind: bool = False
    backlog: int = 511
    rcvbuf: int | None = None
    sndbuf: int | None = None
    ipv6only: bool = True
    so_keepalive: Any = None    # None, True, False or (idle, intvl, cnt) with None parts
    multipath: bool = False
    file: str | None = None
    line: int | None = None
    server: Any = field(default=None, repr=False)   # its ServerConf, set after merging


def listen(args: list[str], ctx) -> list[Listen]:
    """nginx ngx_mail_core_listen: address, duplicate check, then parameters."""
    text = args[0]
    try:
        url = parse_url(text, listen=True, cache=ctx.cache)
    except UrlError as e:
        raise ValueError('%s in "%s" of the "listen" directive' % (e, text)) from None
    if url.family != socket.AF_UNIX and url.no_port:
        raise ValueError('no port in "%s" of the "listen" directive' % text)
    found = []
    for family, ip in url.addrs:
        for port in url.ports or [None]:
            key = (family, ip, port)
            if key in found:
                continue    # a name resolving twice to one address: dropped silently
            if key in ctx.listens:
                raise ValueError('duplicate "%s" address and port pair'
                                 % addr_text(family, ip, port))
            found.append(key)
    params = listen_params(args[1:], ctx)
    made = []
    for key in found:
        family, ip, port = key
        sa = ip if family == socket.AF_UNIX else sockaddr(family, ip, port)
        made.append(Listen(addr_text(family, ip, port), family, sa, port,
                           wildcard=url.wildcard or ip in ('0.0.0.0', '::'),
                           file=ctx.file, line=ctx.line, **params))
        ctx.listens[key] = made[-1]
    return made


def listen_params(words: list[str], ctx) -> dict:
    """The ``listen`` parameters, with nginx's error texts (case-sensitive)."""
    p = {}
    for word in words:
        if word in ('ssl', 'proxy_protocol', 'bind'):
            p[word] = True
        elif word == 'multipath':
            if hasattr(socket, 'IPPROTO_MPTCP'):
                p['multipath'] = p['bind'] = True
            else:
                ctx.warn('multipath is not supported on this platform, ignored', 'emerg')
        elif word.startswith('backlog='):
            n = atoi(word[8:])
            if not n or n > 0x7fffffff:
                raise ValueError('invalid backlog "%s"' % word)
            p['backlog'] = n
            p['bind'] = True
        elif word.startswith(('rcvbuf=', 'sndbuf=')):
            size = parse_size(word[7:])
            if size is None or size > 0x7fffffff:
                raise ValueError('invalid %s "%s"' % (word[:6], word))
            p[word[:6]] = size
            p['bind'] = True
        elif word.startswith('ipv6only=o'):
            if word[10:] not in ('n', 'ff'):
                raise ValueError('invalid ipv6only flags "%s"' % word[9:])
            p['ipv6only'] = word[10:] == 'n'
            p['bind'] = True
        elif word.startswith('so_keepalive='):
            p['so_keepalive'] = _keepalive(word[13:])
            p['bind'] = True
        else:
            raise ValueError('invalid parameter "%s"' % word)
    return p


def _keepalive(text: str):
    if text == 'on':
        return True
    if text == 'off':
        return False
    parts = text.split(':')
    if len(parts) > 3:
        # nginx reads the third part up to the end: "1:2:3:4" has a bad count "3:4".
        parts = parts[:2] + [':'.join(parts[2:])]
    parts += [''] * (3 - len(parts))
    idle, intvl = (parse_time(x, True) if x else 0 for x in parts[:2])
    cnt = atoi(parts[2]) if parts[2] else 0
    if idle is None or intvl is None or cnt is None or not (idle or intvl or cnt):
        raise ValueError('invalid so_keepalive value: "%s"' % text)
    return (idle or None, intvl or None, cnt or None)


def parse_size(text: str) -> int | None:
    """nginx ngx_parse_size: digits with an optional k/K/m/M suffix; None if invalid."""
    scale = {'k': 1024, 'K': 1024, 'm': 1048576, 'M': 1048576}.get(text[-1:], 1)
    n = atoi(text[:-1] if scale > 1 else text)
    if n is None or n > MAX_INT // scale:
        return None
    return n * scale


_YEAR, _MONTH, _WEEK, _DAY, _HOUR, _MIN, _SEC, _MSEC, _LAST = range(1, 10)
_UNITS = {'y': (_YEAR, 365 * 86400), 'M': (_MONTH, 30 * 86400), 'w': (_WEEK, 7 * 86400),
          'd': (_DAY, 86400), 'h': (_HOUR, 3600), 'm': (_MIN, 60), 's': (_SEC, 1)}


def parse_time(text: str, is_sec: bool) -> int | None:
    """nginx ngx_parse_time: seconds (``is_sec``) or milliseconds; None if invalid.

    Units strictly decreasing, each once; ``y``/``M`` only for seconds, ``ms`` only for
    milliseconds; a bare number is seconds.
    """
    value = total = 0
    valid = False
    step = 0 if is_sec else _MONTH
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        i += 1
        if '0' <= c <= '9':
            value = value * 10 + ord(c) - 48
            if value > MAX_INT:
                return None
            valid = True
            continue
        if c == 'm' and i < n and text[i] == 's':
            if is_sec or step >= _MSEC:
                return None
            i += 1
            step, scale = _MSEC, 1
        elif c in _UNITS:
            unit, scale = _UNITS[c]
            if step >= unit:
                return None
            step = unit
        elif c == ' ':
            if step >= _SEC:
                return None
            step, scale = _LAST, 1
        else:
            return None
        limit = MAX_INT // scale
        if step != _MSEC and not is_sec:
            scale *= 1000
            limit //= 1000
        if value > limit:
            return None
        value *= scale
        if total > MAX_INT - value:
            return None
        total += value
        value = 0
        while i < n and text[i] == ' ':
            i += 1
    if not valid:
        return None
    if not is_sec:
        if value > MAX_INT // 1000:
            return None
        value *= 1000
    if total > MAX_INT - value:
        return None
    return total + value
