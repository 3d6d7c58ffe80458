"""The access log (beyond nginx, issue 12): one line per client connection.

nginx's mail modules write only the error log. Here::

    access_log PATH|stderr|off [format=text|json];     # mail {} or server {}
    access_log_format 'TEMPLATE';                       # the text format

``PATH`` is relative to the prefix, like ``error_log``; files are opened when the
configuration is loaded (by the master, so workers inherit them after dropping
privileges), appended to with one ``write()`` per line (``O_APPEND``: workers share the
file), and reopened by ``reopen()`` on USR1, the new file given to ``user``.

A line is written when the connection ends, with what the session knew then:

=====================  =============================================================
``$time_local``        end time, ``01/May/2026:12:00:00 +0200`` (nginx's)
``$time_iso8601``      end time, ``2026-05-01T12:00:00+02:00``
``$msec``              end time, seconds since the epoch with milliseconds
``$connection``        the connection number (the error log's ``*N``)
``$client``            client address (the real one after a PROXY header)
``$server``            the listen address that accepted it
``$protocol``          ``imap``, ``pop3`` or ``smtp``
``$login``             the login (as the auth answer named it), ``-`` if none
``$backend``           the backend address, ``-`` if none was reached
``$outcome``           ``ok`` (proxied) or why it ended (``limits.outcome``)
``$duration``          seconds from accept to end, with milliseconds
``$bytes_from_client`` bytes relayed from client to backend (the pump's counts)
``$bytes_to_client``   bytes relayed from backend to client
``$tls``               the TLS version, ``-`` without TLS
=====================  =============================================================

In text lines, ``"``, ``\\`` and bytes outside printable ASCII in ``$login`` are written
``\\xHH`` (nginx's access-log escaping). ``format=json`` writes one JSON object per line
with these names as keys (``time`` is ``$time_iso8601``; ``null`` for a missing login,
backend or TLS version). Passwords are never written.
"""
import json
import os
import re
import time

from .config.directives import D, MAIL_SERVER
from .errors import ConfigError

DEFAULT_FORMAT = ('$client [$time_local] $protocol $server "$login" $backend $outcome '
                  '$duration $bytes_from_client $bytes_to_client')
FIELDS = ('time_local', 'time_iso8601', 'msec', 'connection', 'client', 'server',
          'protocol', 'login', 'backend', 'outcome', 'duration', 'bytes_from_client',
          'bytes_to_client', 'tls')
_VARIABLE = re.compile(r'\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))')
_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')


class AccessLog:
    """``access_log`` as written: where, and ``text`` or ``json``."""
    __slots__ = ('path', 'format', 'file', 'line')

    def __init__(self, path: str, fmt: str, file: str, line: int):
        self.path, self.format, self.file, self.line = path, fmt, file, line


def access_log(args, ctx) -> AccessLog | None:
    if args[0] == 'off':
        if len(args) > 1:
            raise ValueError('invalid parameter "%s"' % args[1])
        return None
    fmt = 'text'
    for word in args[1:]:
        if word in ('format=text', 'format=json'):
            fmt = word[7:]
        else:
            raise ValueError('invalid parameter "%s"' % word)
    path = args[0] if args[0] == 'stderr' else ctx.prefix_path(args[0])
    return AccessLog(path, fmt, ctx.file, ctx.line)


def log_format(args, ctx) -> tuple:
    """A template -> (literal, variable, literal, variable, ..., literal)."""
    parts, pos = [], 0
    for m in _VARIABLE.finditer(args[0]):
        name = m.group(1) or m.group(2)
        if name not in FIELDS:
            raise ValueError('unknown "%s" variable' % name)
        parts += [args[0][pos:m.start()], name]
        pos = m.end()
    parts.append(args[0][pos:])
    return tuple(parts)


DIRECTIVES = [
    D('access_log', MAIL_SERVER, '12', access_log),
    D('access_log_format', MAIL_SERVER, '1', log_format,
      default=lambda: log_format([DEFAULT_FORMAT], None)),
]


class _File:
    """An open log file; ``reopen`` swaps the file under the same descriptor."""
    __slots__ = ('path', 'fd')

    def __init__(self, path: str):
        self.path = path
        self.fd = 2 if path == 'stderr' else _open(path)

    def write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:
            pass                        # a full disk must not end sessions

    def reopen(self, owner=None) -> None:
        if self.fd == 2:
            return
        fd = _open(self.path)
        try:
            if owner is not None:
                try:
                    os.fchown(fd, owner[0], owner[1])
                except OSError:
                    pass
            os.dup2(fd, self.fd)
        finally:
            os.close(fd)


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


_files: dict[str, _File] = {}


class Writer:
    """A server's access log: the file and how lines look (``conf.access_logger``)."""
    __slots__ = ('file', 'json', 'template')

    def __init__(self, file: _File, as_json: bool, template: tuple):
        self.file, self.json, self.template = file, as_json, template


def finalize(conf) -> None:
    """Open the file (once per path and process) and set ``conf.access_logger``."""
    spec = conf.access_log
    writer = None
    if spec is not None:
        f = _files.get(spec.path)
        if f is None:
            try:
                f = _files[spec.path] = _File(spec.path)
            except OSError as e:
                raise ConfigError('open() "%s" failed (%d: %s)'
                                  % (spec.path, e.errno, e.strerror), spec.file,
                                  spec.line) from None
        writer = Writer(f, spec.format == 'json', conf.access_log_format)
    conf.access_logger = writer
    conf.tracked = getattr(conf, 'tracked', False) or writer is not None


def reopen(owner=None) -> None:
    """USR1 (beside ``log.reopen``): reopen every access log file."""
    for f in list(_files.values()):
        try:
            f.reopen(owner)
        except OSError:
            pass


# --- lines ----------------------------------------------------------------------------

def _escape(data: bytes) -> str:
    return _UNSAFE.sub(lambda m: b'\\x%02X' % m.group()[0], data).decode('ascii')


def _tz(now: float) -> tuple[time.struct_time, str]:
    tm = time.localtime(now)
    off = tm.tm_gmtoff or 0
    sign = '-' if off < 0 else '+'
    off = abs(off) // 60
    return tm, '%s%02d%02d' % (sign, off // 60, off % 60)


MONTHS = ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov',
          'Dec')


def fields(s, outcome: str, now: float) -> dict:
    """The line's values: ints, floats, strings, or None (missing)."""
    t = s.track
    tm, tz = _tz(now)
    sent = t.bytes or (0, 0)
    return {
        'time_local': '%02d/%s/%d:%02d:%02d:%02d %s' % (
            tm.tm_mday, MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min,
            tm.tm_sec, tz),
        'time_iso8601': '%d-%02d-%02dT%02d:%02d:%02d%s:%s' % (
            tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
            tz[:3], tz[3:]),
        'msec': '%.3f' % now,
        'connection': s.conn_id,
        'client': s.client_ip,
        'server': s.listen.addr_text,
        'protocol': s.proto.NAME,
        'login': s.login,
        'backend': s.upstream_name,
        'outcome': outcome,
        'duration': round(time.monotonic() - t.started, 3),
        'bytes_from_client': sent[0],
        'bytes_to_client': sent[1],
        'tls': t.tls_version,
    }


def text_line(template: tuple, values_: dict) -> bytes:
    out = []
    for i, part in enumerate(template):
        if not i % 2:
            out.append(part)
            continue
        value = values_[part]
        if value is None:
            out.append('-')
        elif part == 'login':
            out.append(_escape(value))
        elif part == 'duration':
            out.append('%.3f' % value)
        else:
            out.append(str(value))
    out.append('\n')
    return ''.join(out).encode('utf-8', 'backslashreplace')


def json_line(values_: dict) -> bytes:
    record = {'time': values_['time_iso8601']}
    for name in FIELDS[3:]:
        record[name] = values_[name]
    login = record['login']
    if login is not None:
        record['login'] = login.decode('utf-8', 'backslashreplace')
    return (json.dumps(record, separators=(',', ':')) + '\n').encode('ascii')


def session_done(s, outcome: str) -> None:
    """From ``limits.end``: write the session's line."""
    writer = s.conf.access_logger
    if writer is None:
        return
    values_ = fields(s, outcome, time.time())
    if writer.json:
        writer.file.write(json_line(values_))
    else:
        writer.file.write(text_line(writer.template, values_))
