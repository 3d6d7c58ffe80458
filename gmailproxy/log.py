"""nginx's error-log format on top of ``logging`` (logging.md).

Lines read ``YYYY/MM/DD HH:MM:SS [info] PID#TID: *N message, client: ..., server: ...``.
A session logs through ``session_line()``, which appends the nginx context suffix, so
call sites never repeat it.

Targets (``error_log`` values, ngx_log_set_log): a file (opened once, in the master, so
workers inherit it even after dropping privileges; ``reopen()`` on USR1), ``stderr``,
and ``syslog:server=ADDR[:PORT][,facility=F][,severity=S][,tag=T][,nohostname]``
(RFC 3164 over UDP or a unix datagram socket, ngx_syslog.c).
"""
import logging
import mmap
import os
import socket
import struct
import sys
import threading
import time
from typing import NamedTuple

from gevent import monkey

# nginx's levels, mapped onto logging's numeric scale.
DEBUG, INFO, NOTICE, WARN, ERROR, CRIT, ALERT, EMERG = 10, 20, 25, 30, 40, 50, 55, 60
LEVELS = {'debug': DEBUG, 'info': INFO, 'notice': NOTICE, 'warn': WARN, 'error': ERROR,
          'crit': CRIT, 'alert': ALERT, 'emerg': EMERG}
for _name, _num in LEVELS.items():
    logging.addLevelName(_num, _name)

ROOT = 'gmailproxy'
MAX_ERROR_STR = 2048        # NGX_MAX_ERROR_STR: longer lines are cut


def _line(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    stamp = time.strftime('%Y/%m/%d %H:%M:%S', time.localtime(record.created))
    msg = record.getMessage()
    if record.exc_info:
        msg = '%s\n%s' % (msg, formatter.formatException(record.exc_info))
    return '%s [%s] %d#%d: %s' % (stamp, record.levelname, record.process,
                                  threading.get_native_id(), msg)


class NginxFormatter(logging.Formatter):
    """``2026/05/01 12:00:00 [info] 4242#4242: message`` (ngx_log_error_core)."""

    def format(self, record: logging.LogRecord) -> str:
        return _line(record, self)


# Syslog (ngx_syslog.c): facility names, nginx level -> RFC 3164 severity.
FACILITIES = ('kern', 'user', 'mail', 'daemon', 'auth', 'intern', 'lpr', 'news', 'uucp',
              'clock', 'authpriv', 'ftp', 'ntp', 'audit', 'alert', 'cron', 'local0',
              'local1', 'local2', 'local3', 'local4', 'local5', 'local6', 'local7')
SEVERITIES = ('emerg', 'alert', 'crit', 'error', 'warn', 'notice', 'info', 'debug')
SYSLOG_PORT = 514
MONTHS = ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov',
          'Dec')


class SyslogTarget(NamedTuple):
    """A parsed ``syslog:`` value; ``address`` is a (host, port) pair or a unix path."""
    address: object
    facility: int = 23          # local7
    severity: int | None = None
    tag: str = 'gmailproxy'
    nohostname: bool = False


def parse_syslog(params: str) -> SyslogTarget:
    """The part after ``syslog:``, with nginx's messages (ngx_syslog_parse_args)."""
    address, facility, severity, tag, nohostname = None, 23, None, 'gmailproxy', False
    for item in params.split(','):
        if item.startswith('server='):
            address = _syslog_address(item[7:])
        elif item.startswith('facility='):
            if item[9:] not in FACILITIES:
                raise ValueError('unknown syslog facility "%s"' % item[9:])
            facility = FACILITIES.index(item[9:])
        elif item.startswith('severity='):
            if item[9:] not in SEVERITIES:
                raise ValueError('unknown syslog severity "%s"' % item[9:])
            severity = SEVERITIES.index(item[9:])
        elif item.startswith('tag='):
            tag = item[4:]
            if not tag:
                raise ValueError('syslog "tag" cannot be empty')
            if len(tag) > 32:
                raise ValueError('syslog tag length exceeds 32')
            if not all(c.isascii() and (c.isalnum() or c == '_') for c in tag):
                raise ValueError('syslog "tag" only allows alphanumeric characters '
                                 'and underscore')
        elif item == 'nohostname':
            nohostname = True
        else:
            raise ValueError('unknown syslog parameter "%s"' % item)
    if address is None:
        raise ValueError('no syslog server specified')
    return SyslogTarget(address, facility, severity, tag, nohostname)


def _syslog_address(text: str):
    if text.startswith('unix:'):
        return text[5:]
    if text.startswith('['):
        host, _, rest = text[1:].partition(']')
        port = rest[1:] if rest.startswith(':') else ''
    elif text.count(':') == 1:
        host, _, port = text.partition(':')
    else:
        host, port = text, ''
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError('invalid port in "%s"' % text)
    if not host:
        raise ValueError('no host in "%s"' % text)
    return host, int(port) if port else SYSLOG_PORT


# Never the patched socket: a log call may come from the hub, which must not block.
_socket = monkey.get_original('socket', 'socket')


class SyslogHandler(logging.Handler):
    """One datagram per line: ``<PRI>Mmm dd hh:mm:ss HOST TAG: LINE`` (RFC 3164), where
    LINE is the whole error-log line and PRI = facility * 8 + the line's severity
    (``severity=`` only concerns access logs in nginx). Datagrams that cannot be sent
    at once are dropped, as nginx does."""

    def __init__(self, target: SyslogTarget):
        super().__init__()
        self.target = target
        self.hostname = socket.gethostname().lower()
        self.sock = None

    def _connect(self):
        address = self.target.address
        if isinstance(address, str):
            sock = _socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        else:
            info = socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_DGRAM)[0]
            sock = _socket(info[0], socket.SOCK_DGRAM)
            address = info[4]
        sock.setblocking(False)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock

    def packet(self, record: logging.LogRecord) -> bytes:
        name = record.levelname
        severity = SEVERITIES.index(name) if name in SEVERITIES else 6
        tm = time.localtime(record.created)
        head = '<%d>%s %2d %02d:%02d:%02d ' % (self.target.facility * 8 + severity,
                                               MONTHS[tm.tm_mon - 1], tm.tm_mday,
                                               tm.tm_hour, tm.tm_min, tm.tm_sec)
        if not self.target.nohostname:
            head += self.hostname + ' '
        head += self.target.tag + ': '
        line = _line(record, self.formatter or _FORMATTER)
        return head.encode() + line.encode('utf-8', 'backslashreplace')[:MAX_ERROR_STR]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.packet(record)
            if self.sock is None:
                self.sock = self._connect()
            self.sock.send(data)
        except OSError:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        super().close()


_FORMATTER = NginxFormatter()


class _FileHandler(logging.FileHandler):
    """Appends (O_APPEND: workers write the same open file); reopened on USR1."""

    def __init__(self, path: str):
        super().__init__(path, mode='a', encoding='utf-8', delay=False,
                         errors='backslashreplace')

    def reopen(self, owner=None) -> OSError | None:
        """A new file under the same name; on failure (returned) the open one stays
        in use, as in nginx ngx_reopen_files."""
        self.acquire()
        try:
            try:
                stream = self._open()
            except OSError as e:
                return e
            if owner is not None:
                try:
                    os.fchown(stream.fileno(), owner[0], owner[1])
                except OSError:
                    pass
            old, self.stream = self.stream, stream
            if old is not None:
                old.close()
        finally:
            self.release()
        return None


def _handler(target: str) -> logging.Handler:
    if target == 'stderr':
        handler = logging.StreamHandler(sys.stderr)
    elif target.startswith('syslog:'):
        handler = SyslogHandler(parse_syslog(target[7:]))
    else:
        handler = _FileHandler(target)
    handler.setFormatter(_FORMATTER)
    return handler


_loggers: dict[tuple, logging.Logger] = {}
_serial = 0


def get_logger(specs) -> logging.Logger:
    """One logger per distinct ``error_log`` list; ``specs`` are (target, level) pairs.
    A message goes to every target whose level admits it (ngx_log_error_core walks the
    list). Raises OSError when a file cannot be opened (``open() "F" failed ...``)."""
    global _serial
    key = tuple(tuple(spec) for spec in specs)
    logger = _loggers.get(key)
    if logger is None:
        handlers = []
        try:
            for target, level_name in key:
                handler = _handler(target)
                handler.setLevel(LEVELS[level_name])
                handlers.append(handler)
        except (OSError, ValueError):
            for handler in handlers:
                handler.close()
            raise
        _serial += 1
        logger = logging.getLogger('%s.errorlog%d' % (ROOT, _serial))
        logger.propagate = False
        logger.handlers[:] = handlers
        logger.setLevel(min((h.level for h in handlers), default=EMERG))
        _loggers[key] = logger
    return logger


def prune(keep) -> None:
    """Close the loggers no longer used (after a reload), so their files are closed."""
    keep = set(map(id, keep))
    for key, logger in list(_loggers.items()):
        if id(logger) not in keep:
            del _loggers[key]
            for handler in logger.handlers:
                handler.close()
            logger.handlers[:] = []


def reopen(owner=None) -> None:
    """USR1: reopen every log file (logrotate moved the old one away); ``owner`` is the
    (uid, gid) the new files are given (the ``user`` directive, ngx_reopen_files)."""
    failed = []
    for logger in _loggers.values():
        for handler in logger.handlers:
            if isinstance(handler, _FileHandler):
                error = handler.reopen(owner)
                if error is not None:
                    failed.append((handler.baseFilename, error))
            elif isinstance(handler, SyslogHandler):
                handler.close()
    for path, e in failed:
        logging.getLogger(ROOT).log(EMERG, 'open() "%s" failed (%d: %s)', path, e.errno,
                                    e.strerror)


def flush() -> None:
    for logger in _loggers.values():
        for handler in logger.handlers:
            try:
                handler.flush()
            except (OSError, ValueError):
                pass


def setup_main(specs) -> logging.Logger:
    """The process-wide log (main-level ``error_log``), also used by
    ``logging.getLogger`` callers under ``gmailproxy``."""
    logger = get_logger(specs)
    root = logging.getLogger(ROOT)
    root.propagate = False
    root.handlers[:] = logger.handlers
    root.setLevel(logger.level)
    return logger


class ConnectionCounter:
    """nginx's ``ngx_connection_counter``: the ``*N`` numbers, from one counter in
    shared memory, so the workers of a master never hand out the same number. Create
    it before forking; ``next(counter)`` in any process."""

    def __init__(self):
        import multiprocessing
        self._mem = mmap.mmap(-1, 8)
        self._lock = multiprocessing.Lock()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        # A worker killed inside the (sub-microsecond) critical section must not stall
        # the others for good: after a short wait the number is taken without the lock.
        locked = self._lock.acquire(timeout=0.05)
        try:
            n = struct.unpack_from('Q', self._mem)[0] + 1
            struct.pack_into('Q', self._mem, 0, n)
        finally:
            if locked:
                self._lock.release()
        return n


def session_suffix(s) -> str:
    """`` while ACTION, client: ADDR[ using starttls], server: ADDR[, login: "L"][, upstream: U]``."""
    parts = []
    if s.action:
        parts.append(' while ')
        parts.append(s.action)
    parts.append(', client: ')
    parts.append(s.client_ip)
    if s.starttls_used:
        parts.append(' using starttls')
    parts.append(', server: ')
    parts.append(s.listen.addr_text)
    if s.login:
        parts.append(', login: "%s"' % s.login.decode('utf-8', 'backslashreplace'))
    if s.upstream_name:
        parts.append(', upstream: ')
        parts.append(s.upstream_name)
    return ''.join(parts)


def session_line(s, level: int, msg: str, exc_info=False, tail: str = '') -> None:
    logger = s.logger
    if logger.isEnabledFor(level):
        logger.log(level, '*%d %s%s%s', s.conn_id, msg, session_suffix(s), tail,
                   exc_info=exc_info)


def printable(data: bytes, limit: int = 256) -> str:
    """Raw client or backend bytes for a log line: CR/LF and controls escaped, bounded."""
    text = data[:limit].decode('latin-1')
    return ''.join(c if ' ' <= c < '\x7f' else '\\x%02x' % ord(c) for c in text)


def pid_line() -> str:
    return '%d#%d' % (os.getpid(), threading.get_native_id())
