"""Value parsers for directive arguments: ``parse(args, ctx) -> value``.

``args`` are the directive's arguments (without its name). A parser raises ``ValueError``
with nginx's full message (the parser appends `` in file:line``); ``ctx`` offers ``name``,
``file``, ``line``, ``previous`` (this level's value so far), ``warn(msg)``, ``path(p)``
(against the configuration folder), ``prefix_path(p)`` (against the prefix), ``cache``
(host names resolved during this load) and ``listens`` (addresses already listed).
Times are float seconds, sizes int bytes, lists tuples.
"""
import ipaddress
import os
import pwd
import grp
import resource
import socket
from dataclasses import dataclass
from typing import NamedTuple

import gevent.ssl

from . import address
from .. import log
from .address import UrlError, atoi, parse_size, parse_time

PROTOCOL_NAMES = ('imap', 'pop3', 'smtp')
LOG_LEVELS = ('emerg', 'alert', 'crit', 'error', 'warn', 'notice', 'info', 'debug')
DEBUG_LEVELS = ('debug_core', 'debug_alloc', 'debug_mutex', 'debug_event', 'debug_http',
                'debug_mail', 'debug_stream')
SYSLOG_KEYS = ('server=', 'facility=', 'severity=', 'tag=', 'nohostname')


def _lower(word: str) -> str:
    """ASCII-only case folding, as nginx's ngx_strcasecmp."""
    return word.lower() if word.isascii() else word


def _reason(ctx, reason: str) -> ValueError:
    """nginx's short handler reasons read ``"NAME" directive invalid value``."""
    return ValueError('"%s" directive %s' % (ctx.name, reason))


_hostname = None


def hostname() -> str:
    """Default ``server_name``: the machine's host name, lower-cased (nginx)."""
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname().lower()
    return _hostname


def page_size() -> int:
    """Default buffer sizes: the memory page size."""
    return resource.getpagesize()


def ignored(args, ctx):
    return None


def flag(args, ctx) -> bool:
    word = _lower(args[0])
    if word in ('on', 'off'):
        return word == 'on'
    raise ValueError('invalid value "%s" in "%s" directive, it must be "on" or "off"'
                     % (args[0], ctx.name))


def number(args, ctx) -> int:
    n = atoi(args[0])
    if n is None:
        raise _reason(ctx, 'invalid number')
    return n


def number_or_off(args, ctx) -> int:
    return 0 if _lower(args[0]) == 'off' else number(args, ctx)


def worker_connections(args, ctx) -> int:
    n = atoi(args[0])
    if n is None:
        raise ValueError('invalid number "%s"' % args[0])
    return n


def worker_processes(args, ctx) -> int:
    if args[0] == 'auto':
        return os.cpu_count() or 1
    n = atoi(args[0])
    if n is None:
        raise _reason(ctx, 'invalid value')
    return n


def size(args, ctx) -> int:
    n = parse_size(args[0])
    if not n:   # zero makes a buffer unusable: refused, unlike nginx
        raise _reason(ctx, 'invalid value')
    return n


def time_ms(args, ctx) -> float:
    """A millisecond-valued time (``500ms``, ``1h30m``, ``60``), as float seconds."""
    ms = parse_time(args[0], False)
    if ms is None:
        raise _reason(ctx, 'invalid value')
    return ms / 1000


def time_s(args, ctx) -> float:
    """A second-valued time (``5m``, ``1y``; no ``ms``), as float seconds."""
    s = parse_time(args[0], True)
    if s is None:
        raise _reason(ctx, 'invalid value')
    return float(s)


def string(args, ctx) -> str:
    return args[0]


def path(args, ctx) -> str:
    """A file name, relative to the configuration folder (nginx's conf prefix)."""
    return ctx.path(args[0])


def prefix_path(args, ctx) -> str:
    """A file name relative to the prefix (``pid``, error log files)."""
    return ctx.prefix_path(args[0])


def path_or_data(args, ctx) -> str:
    """A file name, or ``data:...`` / ``engine:...`` kept as written."""
    if args[0].startswith(('data:', 'engine:')):
        return args[0]
    return ctx.path(args[0])


def pair(args, ctx) -> tuple[str, str]:
    return (args[0], args[1])


def words(args, ctx) -> tuple[str, ...]:
    return tuple(args)


def choice(*allowed: str):
    """One word of ``allowed``, case-insensitive (nginx enum slot); canonical spelling."""
    table = {a.lower(): a for a in allowed}

    def parse(args, ctx) -> str:
        value = table.get(_lower(args[0]))
        if value is None:
            raise ValueError('invalid value "%s"' % args[0])
        return value
    return parse


def methods(*allowed: str):
    """Words of ``allowed``, case-insensitive (nginx bitmask slot).

    Returns the canonical spellings not already set at this level; a repeated word only
    warns ``duplicate value``, so several directives at one level add up.
    """
    table = {a.lower(): a for a in allowed}

    def parse(args, ctx) -> tuple[str, ...]:
        seen = list(ctx.previous or ())
        for word in args:
            value = table.get(_lower(word))
            if value is None:
                raise ValueError('invalid value "%s"' % word)
            if value in seen:
                ctx.warn('duplicate value "%s"' % word)
            else:
                seen.append(value)
        return tuple(seen[len(ctx.previous or ()):])
    return parse


def protocol(args, ctx) -> str:
    if args[0] not in PROTOCOL_NAMES:
        raise ValueError('unknown protocol "%s"' % args[0])
    return args[0]


def server_name(args, ctx) -> str:
    return args[0] or hostname()


def listen(args, ctx) -> list:
    return address.listen(args, ctx)


@dataclass(frozen=True, slots=True)
class Resolver:
    """``resolver``: name servers as (ip, port); ``valid`` overrides TTLs (seconds)."""
    addresses: tuple
    valid: float | None = None
    ipv4: bool = True
    ipv6: bool = True


def resolver(args, ctx) -> Resolver | None:
    """nginx ngx_resolver_create."""
    if args[0] == 'off':
        return None
    servers, opts = [], {}
    for word in args:
        if word.startswith('valid='):
            valid = parse_time(word[6:], True)
            if valid is None:
                raise ValueError('invalid parameter: %s' % word)
            opts['valid'] = float(valid)
        elif word.startswith(('ipv4=', 'ipv6=')):
            if word[5:] not in ('on', 'off'):
                raise ValueError('invalid parameter: %s' % word)
            opts[word[:4]] = word[5:] == 'on'
        else:
            try:
                url = address.parse_url(word, default_port=53, cache=ctx.cache)
            except UrlError as e:
                raise ValueError('%s in resolver "%s"' % (e, word)) from None
            if not url.ports:                    # unix: has no port: not a name server
                raise ValueError('invalid value "%s" in resolver' % word)
            servers += [(ip, url.ports[0]) for _, ip in url.addrs]
    if not opts.get('ipv4', True) and not opts.get('ipv6', True):
        raise ValueError('"ipv4" and "ipv6" cannot both be "off"')
    if not servers:
        raise ValueError('no name servers defined')
    return Resolver(tuple(servers), **opts)


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """``auth_http``: where to connect, and the ``Host:`` header and URI to send."""
    text: str               # the URL as written, without "http://" (for messages)
    family: int
    sockaddr: object        # (ip, port), (ip, port, 0, 0) or a unix path
    addr_text: str          # 127.0.0.1:9000, [::1]:9000, unix:/path
    host_header: bytes      # the host as written, or b"localhost" for unix:
    uri: bytes
    tls: object = None      # an ssl.SSLContext for https:// (beyond nginx)
    server_hostname: str | None = None


_client_tls = None


def _tls_client():
    global _client_tls
    if _client_tls is None:
        _client_tls = gevent.ssl.create_default_context()
    return _client_tls


def auth_http_url(args, ctx) -> HttpUrl:
    """nginx ngx_mail_auth_http: ``[http://]HOST[:PORT][/URI]`` or ``unix:/PATH[:/URI]``;
    a host name is resolved now and only its first address is used. Beyond nginx,
    ``https://`` (port 443 by default) connects with TLS, verifying the host."""
    tls = args[0].startswith('https://')
    text = args[0][7 + tls:] if args[0].startswith(('http://', 'https://')) else args[0]
    try:
        url = address.parse_url(text, uri_part=True, default_port=443 if tls else 80,
                                cache=ctx.cache)
    except UrlError as e:
        raise ValueError('%s in auth_http "%s"' % (e, text)) from None
    uri = (url.uri or '/').encode('utf-8', 'surrogateescape')
    family, ip = url.addrs[0]
    if family == socket.AF_UNIX:
        return HttpUrl(text, family, ip, 'unix:' + ip, b'localhost', uri)
    port = url.ports[0]
    return HttpUrl(text, family, address.sockaddr(family, ip, port),
                   address.addr_text(family, ip, port),
                   url.host.encode('utf-8', 'surrogateescape'), uri,
                   _tls_client() if tls else None, url.host.strip('[]') if tls else None)


def ssl_session_cache(args, ctx) -> tuple[str, ...]:
    """nginx ngx_mail_ssl_session_cache: ``off``, ``none``, ``builtin[:N]``,
    ``shared:NAME:SIZE`` (at least 8 pages); returns the words as given."""
    for word in args:
        if word in ('off', 'none', 'builtin'):
            continue
        if word.startswith('builtin:') and len(word) > 8:
            if atoi(word[8:]) is None:
                raise ValueError('invalid session cache "%s"' % word)
            continue
        if word.startswith('shared:') and len(word) > 7:
            name, colon, size_text = word[7:].partition(':')
            n = parse_size(size_text) if name and colon else None
            if n is None:
                raise ValueError('invalid session cache "%s"' % word)
            if n < 8 * page_size():
                raise ValueError('session cache "%s" is too small' % word)
            continue
        raise ValueError('invalid session cache "%s"' % word)
    return tuple(args)


def real_ip_from(args, ctx) -> tuple:
    """nginx ngx_mail_realip_from: ``unix:``, an address or CIDR, or a host name (each of
    its addresses). Returns a tuple of ``ipaddress`` networks (or the string ``unix:``)."""
    text = args[0]
    if text == 'unix:':
        return ('unix:',)
    net = _cidr(text, ctx)
    if net is not None:
        return (net,)
    try:
        addrs = address.resolve(text, ctx.cache)
    except UrlError as e:
        raise ValueError('%s in set_real_ip_from "%s"' % (e, text)) from None
    return tuple(ipaddress.ip_network(ip) for _, ip in addrs)


def _cidr(text: str, ctx):
    """nginx ngx_ptocidr; host bits set only warn. None when it is no address."""
    addr, slash, bits = text.partition('/')
    ip = address.inet_addr(addr) or address.inet6_addr(addr)
    if ip is None:
        return None
    if not slash:
        return ipaddress.ip_network(ip)
    width = 32 if ':' not in ip else 128
    n = atoi(bits)
    if n is None or n > width:
        return None
    net = ipaddress.ip_network('%s/%d' % (ip, n), strict=False)
    if net.network_address != ipaddress.ip_address(ip):
        ctx.warn('low address bits of %s are meaningless' % text)
    return net


class ErrorLog(NamedTuple):
    """One ``error_log``: target is ``stderr``, ``syslog:...`` or an absolute path."""
    target: str
    level: str = 'error'


def error_log(args, ctx) -> ErrorLog:
    """nginx ngx_log_set_log and ngx_log_set_levels (levels are case-sensitive)."""
    target = args[0]
    if target.startswith('memory:'):
        raise ValueError('the "memory:" error log is not supported')
    if target.startswith('syslog:'):
        log.parse_syslog(target[7:])
    elif target != 'stderr':
        target = ctx.prefix_path(target)
    level = None
    debug = False
    for word in args[1:]:
        if word in LOG_LEVELS:
            if level is not None or debug:
                raise ValueError('duplicate log level "%s"' % word)
            level = word
        elif word in DEBUG_LEVELS and level is None:
            debug = True    # debug subsystems: we log all of debug
        else:
            raise ValueError('invalid log level "%s"' % word)
    return ErrorLog(target, level or ('debug' if debug else 'error'))


@dataclass(frozen=True, slots=True)
class User:
    name: str
    group: str
    uid: int
    gid: int


def user(args, ctx) -> User | None:
    """nginx ngx_set_user: the group defaults to the user's name."""
    if os.geteuid() != 0:
        ctx.warn('the "user" directive makes sense only if the master process runs '
                 'with super-user privileges, ignored')
        return None
    name = args[0]
    group = args[1] if len(args) > 1 else name
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError('getpwnam("%s") failed' % name) from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError('getgrnam("%s") failed' % group) from None
    return User(name, group, uid, gid)
