"""nginx's error-log format on top of ``logging`` (logging.md).

Lines read ``YYYY/MM/DD HH:MM:SS [info] PID#TID: *N message, client: ..., server: ...``.
A session logs through ``session_line()``, which appends the nginx context suffix, so
call sites never repeat it.
"""
import logging
import os
import sys
import threading
import time

# nginx's levels, mapped onto logging's numeric scale.
DEBUG, INFO, NOTICE, WARN, ERROR, CRIT, ALERT, EMERG = 10, 20, 25, 30, 40, 50, 55, 60
LEVELS = {'debug': DEBUG, 'info': INFO, 'notice': NOTICE, 'warn': WARN, 'error': ERROR,
          'crit': CRIT, 'alert': ALERT, 'emerg': EMERG}
for _name, _num in LEVELS.items():
    logging.addLevelName(_num, _name)

ROOT = 'gmailproxy'


class NginxFormatter(logging.Formatter):
    """``2026/05/01 12:00:00 [info] 4242#4242: message``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime('%Y/%m/%d %H:%M:%S', time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg = '%s\n%s' % (msg, self.formatException(record.exc_info))
        return '%s [%s] %d#%d: %s' % (stamp, record.levelname, record.process,
                                      threading.get_native_id(), msg)


def _handler(target: str) -> logging.Handler:
    if target == 'stderr':
        handler = logging.StreamHandler(sys.stderr)
    else:
        # WatchedFileHandler-like reopen is done explicitly on USR1 (reopen()).
        handler = logging.FileHandler(target, delay=False)
    handler.setFormatter(NginxFormatter())
    return handler


_loggers: dict[tuple, logging.Logger] = {}


def get_logger(specs) -> logging.Logger:
    """One logger per distinct ``error_log`` list; ``specs`` are (target, level) pairs."""
    key = tuple(specs)
    logger = _loggers.get(key)
    if logger is None:
        logger = logging.getLogger('%s.log%d' % (ROOT, len(_loggers)))
        logger.propagate = False
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        level = EMERG
        for target, level_name in key:
            handler = _handler(target)
            handler.setLevel(LEVELS[level_name])
            logger.addHandler(handler)
            level = min(level, LEVELS[level_name])
        logger.setLevel(level)
        _loggers[key] = logger
    return logger


def reopen() -> None:
    """USR1: reopen every log file (logrotate moved the old one away)."""
    for logger in _loggers.values():
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.acquire()
                try:
                    if handler.stream:
                        handler.stream.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()


def setup_main(specs) -> logging.Logger:
    """The process-wide log (main-level ``error_log``), also used by ``logging.getLogger``
    callers under ``gmailproxy``."""
    logger = get_logger(specs)
    root = logging.getLogger(ROOT)
    root.propagate = False
    root.handlers[:] = logger.handlers
    root.setLevel(logger.level)
    return logger


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
