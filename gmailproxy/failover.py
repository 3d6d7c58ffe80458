"""Backend failover (beyond nginx, which connects to the one backend the auth answer
names): the answer may name several (repeated ``Auth-Server``/``Auth-Port`` pairs, or
comma lists: ``Auth-Server: 10.0.0.1, 10.0.0.2`` with one ``Auth-Port`` for all or as
many ports); ``upstream.connect`` tries them in order, logging each failed try at
``error`` as nginx logs a failed connect.

With any of these directives set, this module also bounds and orders the tries:

* ``proxy_connect_timeout TIME``: a connect that takes longer fails and the next
  backend is tried (default: none of its own; the session's ``timeout``, which covers
  the connect and the whole backend login, then ends the session as in nginx);
* ``proxy_next_upstream_tries N``: at most N connects per login (0, the default: one
  per server named);
* ``proxy_backend_failures N`` (default ``off``) and ``proxy_backend_cooldown TIME``
  (default 10s): a circuit breaker. A backend whose connects failed N times in a row
  (refused, unreachable, timed out) is marked down for the cool-down, logged at
  ``warn`` (``upstream X is marked down for 10s after 3 failures``), and skipped while
  down; after the cool-down the next login tries it again (one more failure marks it
  down again, a success forgets its failures). When every backend an answer names is
  down they are tried anyway, earliest cool-down end first: the breaker saves time
  for logins that have somewhere else to go; it never refuses one on its own.

The breaker's state is per worker process (each learns on its own), keyed by the
backend's ``address:port``, holds only backends that are failing, and is bounded
(``MAX_TRACKED``: the longest-untouched entry is dropped).
"""
import collections
import errno
import time

import gevent

from . import errors, log
from .config import values
from .config.directives import D, MAIL_SERVER

DIRECTIVES = [
    D('proxy_connect_timeout', MAIL_SERVER, '1', values.time_ms),
    D('proxy_next_upstream_tries', MAIL_SERVER, '1', values.number, default=0),
    D('proxy_backend_failures', MAIL_SERVER, '1', values.number_or_off, default=0),
    D('proxy_backend_cooldown', MAIL_SERVER, '1', values.time_ms, default=10.0),
]

MAX_TRACKED = 4096
clock = time.monotonic


class Settings:
    __slots__ = ('connect_timeout', 'tries', 'failures', 'cooldown')

    def __init__(self, connect_timeout, tries, failures, cooldown):
        self.connect_timeout = connect_timeout      # seconds or None
        self.tries = tries                          # 0: no limit
        self.failures = failures                    # 0: no breaker
        self.cooldown = cooldown


def finalize(conf) -> None:
    """``conf.failover``: None (nginx's plain loop) unless a directive asks for more."""
    if conf.proxy_connect_timeout is None and not conf.proxy_next_upstream_tries \
            and not conf.proxy_backend_failures:
        conf.failover = None
    else:
        conf.failover = Settings(conf.proxy_connect_timeout, conf.proxy_next_upstream_tries,
                                 conf.proxy_backend_failures, conf.proxy_backend_cooldown)


class _Entry:
    __slots__ = ('failures', 'down_until')

    def __init__(self):
        self.failures = 0
        self.down_until = 0.0


_state: 'collections.OrderedDict[str, _Entry]' = collections.OrderedDict()


def order(servers: list, settings: Settings, now: float | None = None) -> list:
    """The servers to try, in order: those not marked down as given (or, when all are
    down, all of them by the end of their cool-down), at most ``settings.tries``."""
    if settings.failures and _state:
        now = clock() if now is None else now
        live, down = [], []
        for server in servers:
            entry = _state.get(server[2])
            if entry is not None and entry.down_until > now:
                down.append(server)
            else:
                live.append(server)
        if down:
            servers = live or sorted(down, key=lambda srv: _state[srv[2]].down_until)
    if settings.tries:
        servers = servers[:settings.tries]
    return servers


def connect(s, connect_socket, sock, sockaddr, name: str) -> None:
    """One try, ``connect_socket(sock, sockaddr)`` (stream.py), under
    ``proxy_connect_timeout``; the breaker learns how it went. A connect that takes too
    long raises ``TimeoutError`` (an ``OSError``, as a refused one)."""
    settings = s.conf.failover
    try:
        if settings.connect_timeout is None:
            connect_socket(sock, sockaddr)
        else:
            timed_out = TimeoutError(errno.ETIMEDOUT, 'Connection timed out')
            with gevent.Timeout(settings.connect_timeout, timed_out):
                connect_socket(sock, sockaddr)
    except (OSError, errors.UpstreamTimeout):
        if settings.failures:
            failed(s, name, settings)
        raise
    if _state:
        succeeded(s, name, settings)


def failed(s, name: str, settings: Settings) -> None:
    """Count a failed connect; at ``proxy_backend_failures`` in a row, mark it down."""
    now = clock()
    entry = _state.pop(name, None)
    if entry is None:
        entry = _Entry()
    _state[name] = entry                    # most recently touched last
    if len(_state) > MAX_TRACKED:
        _state.popitem(last=False)
    entry.failures += 1
    if entry.failures >= settings.failures and entry.down_until <= now:
        entry.down_until = now + settings.cooldown
        log.session_line(s, log.WARN, 'upstream %s is marked down for %gs after %d failures'
                         % (name, settings.cooldown, entry.failures))


def succeeded(s, name: str, settings: Settings) -> None:
    entry = _state.pop(name, None)
    if entry is not None and settings.failures and entry.failures >= settings.failures:
        log.session_line(s, log.INFO, 'upstream %s is up again after %d failures'
                         % (name, entry.failures))


def reset() -> None:
    """Forget every failure (tests)."""
    _state.clear()
