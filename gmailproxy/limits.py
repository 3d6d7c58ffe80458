"""Limits and per-session accounting (beyond nginx, issue 12).

nginx's mail proxy has no connection or rate limits (spec README, "What nginx does not
do"); these are each off by default, so an nginx configuration behaves as under nginx:

* ``max_sessions_per_address N;``: concurrent connections from one client address (the
  real one after a PROXY header), counted per protocol, checked once the connection is
  accepted (after the PROXY header and an implicit TLS handshake, before the greeting).
  Refused with the reply ``limit_address`` instead of the greeting, then closed.
* ``max_sessions_per_login N;``: concurrent sessions of one login (the login the auth
  answer names), counted per protocol from the auth answer to the end of the session.
  Checked after the auth answer, before the backend is contacted: reply ``limit_login``.
* ``max_login_failures N [WINDOW];``: N rejected logins (auth service answers other
  than OK, including cached ones) from one address within WINDOW (default 5m) refuse
  that address's further logins, without asking the auth service, until fewer than N
  fall within the last WINDOW: reply ``limit_failures``. Failures count per address
  across protocols and servers. SMTP without authentication (``smtp_auth none``) is not
  counted. ``limit_table_size N;`` (``mail {}``, default 100000) bounds how many
  addresses are remembered (least recently failed forgotten first).
* ``auth_cache N;`` caches up to N auth answers (least recently stored dropped first),
  OK answers for ``auth_cache_ttl`` (60s) and rejections for ``auth_cache_negative_ttl``
  (10s; 0 = not cached). The key is a keyed BLAKE2b hash of the protocol, the method,
  the login, the password, the client address and whether TLS is in use, so a new
  password never meets an answer given for the old one (an old password keeps working
  until its entry expires). Only methods whose password is the credential are cached
  (``plain``, ``login``, ``xoauth2``, ``oauthbearer``); APOP and CRAM-MD5 digests change
  with every salt, EXTERNAL and ``smtp_auth none`` are never cached. Each ``server {}``
  has its own cache, emptied by a reload.

The replies, all temporary failures (the refusal is logged at ``warn``)::

    key             IMAP                                         POP3 / SMTP
    limit_address   * BYE [UNAVAILABLE] Too many connections      -ERR [SYS/TEMP] ... /
                    from your address                             421 4.7.0 ...
    limit_login     <tag> NO [UNAVAILABLE] Too many sessions      (same words)
                    for this user
    limit_failures  <tag> NO [UNAVAILABLE] Too many failed        (same words)
                    logins, try again later

Counters live in the worker process: with ``worker_processes N`` a client whose
connections land on different workers can hold up to N times a concurrency limit, and
make up to N times the failures. The concurrency tables hold only keys with live
sessions (bounded by ``worker_connections``); the failure table and the caches are LRU.

This module is also where per-session accounting starts and ends: ``begin`` (accept),
``admit``, ``authenticate`` (in place of ``auth.authenticate``) and ``end`` keep the
session's ``Track`` for ``metrics`` and ``accesslog``. The session calls them only when
``conf.tracked`` is set (a limit, the cache, metrics or an access log is on).
"""
import collections
import hashlib
import os
import sys
import time

from . import accesslog, auth, errors, log, metrics
from .config import values
from .config.directives import D, MAIL, MAIL_SERVER

DEFAULT_WINDOW = 300.0
DEFAULT_TABLE_SIZE = 100000


def login_failures(args, ctx) -> tuple[int, float]:
    """``N|off [WINDOW]`` -> (N, window seconds); (0, window) is off."""
    n = values.number_or_off(args[:1], ctx)
    window = values.time_ms(args[1:], ctx) if len(args) > 1 else DEFAULT_WINDOW
    if window <= 0:
        raise ValueError('"%s" directive invalid value' % ctx.name)
    return n, window


DIRECTIVES = [
    D('max_sessions_per_address', MAIL_SERVER, '1', values.number_or_off, default=0),
    D('max_sessions_per_login', MAIL_SERVER, '1', values.number_or_off, default=0),
    D('max_login_failures', MAIL_SERVER, '12', login_failures,
      default=(0, DEFAULT_WINDOW)),
    D('limit_table_size', MAIL, '1', values.number),
    D('auth_cache', MAIL_SERVER, '1', values.number_or_off, default=0),
    D('auth_cache_ttl', MAIL_SERVER, '1', values.time_ms, default=60.0),
    D('auth_cache_negative_ttl', MAIL_SERVER, '1', values.time_ms, default=10.0),
]

CACHEABLE = frozenset(('plain', 'login', 'xoauth2', 'oauthbearer'))
_SECRET = os.urandom(32)        # cache keys are useless outside this process


class Refused(errors.ProxyError):
    """A limit refused the connection or the login: ``reply`` names the REPLIES key."""
    level = log.WARN


class Limits:
    """One server's limits (``conf.limits``), None when all are off."""
    __slots__ = ('per_address', 'per_login', 'failures', 'window', 'cache')

    def __init__(self, conf):
        self.per_address = conf.max_sessions_per_address
        self.per_login = conf.max_sessions_per_login
        self.failures, self.window = conf.max_login_failures
        size = conf.auth_cache
        self.cache = AuthCache(size, conf.auth_cache_ttl,
                               conf.auth_cache_negative_ttl) if size else None


def finalize(conf) -> None:
    lim = Limits(conf)
    if not (lim.per_address or lim.per_login or lim.failures or lim.cache):
        lim = None
    conf.limits = lim
    conf.tracked = getattr(conf, 'tracked', False) or lim is not None
    _failures.size = getattr(conf, 'limit_table_size', None) or DEFAULT_TABLE_SIZE


class Track:
    """What one session's accounting needs (``s.track``)."""
    __slots__ = ('started', 'exc', 'bytes', 'auth', 'authed', 'address_key',
                 'login_key', 'metered', 'logged_in', 'tls_version')

    def __init__(self):
        self.started = time.monotonic()
        self.exc = None             # the ProxyError that ended it (session.fail)
        self.bytes = None           # (from client, to client), set by the pump
        self.auth = None            # last login: 'ok' 'failed' 'error' 'refused'
        self.authed = None          # monotonic time of the OK auth answer
        self.address_key = self.login_key = None
        self.metered = self.logged_in = False
        self.tls_version = None     # 'TLSv1.3' ... once a client handshake succeeded

    def handshake(self, s) -> None:
        """Hook: a client TLS handshake succeeded (ssl._handshake)."""
        self.tls_version = s.sock.version() or 'unknown'
        metrics.tls_handshake(s, self.tls_version)


# --- tables ---------------------------------------------------------------------------

_address_sessions: dict[tuple, int] = {}     # (protocol, client ip) -> live sessions
_login_sessions: dict[tuple, int] = {}       # (protocol, login) -> live sessions


def _acquire(table: dict, key, limit: int) -> bool:
    n = table.get(key, 0)
    if n >= limit:
        return False
    table[key] = n + 1
    return True


def _release(table: dict, key) -> None:
    if key is None:
        return
    n = table.get(key, 0) - 1
    if n > 0:
        table[key] = n
    else:
        table.pop(key, None)


class FailureTable:
    """Client address -> times of its last N failed logins; LRU-bounded."""

    def __init__(self, size: int = DEFAULT_TABLE_SIZE):
        self.size = size
        self.entries: collections.OrderedDict[str, list] = collections.OrderedDict()

    def record(self, key: str, keep: int, now: float) -> None:
        times = self.entries.pop(key, None) or []
        times.append(now)
        del times[:-keep]
        self.entries[key] = times
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def blocked(self, key: str, limit: int, window: float, now: float) -> bool:
        times = self.entries.get(key)
        return (times is not None and len(times) >= limit
                and now - times[-limit] < window)

    def clear(self) -> None:
        self.entries.clear()


_failures = FailureTable()


class AuthCache:
    """Hashed credentials -> (expiry, AuthResult or a rejection), LRU-bounded."""

    def __init__(self, size: int, ttl: float, negative_ttl: float):
        self.size, self.ttl, self.negative_ttl = size, ttl, negative_ttl
        self.entries: collections.OrderedDict[bytes, tuple] = collections.OrderedDict()

    def get(self, key: bytes, now: float):
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self.entries[key]
            return None
        return entry[1]

    def put(self, key: bytes, answer, now: float) -> None:
        ttl = self.negative_ttl if isinstance(answer, tuple) else self.ttl
        if ttl <= 0:
            return
        self.entries.pop(key, None)
        self.entries[key] = (now + ttl, answer)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def cache_key(s) -> bytes | None:
    """The cache key of the credentials in ``s``; None when not cacheable."""
    if s.auth_method not in CACHEABLE or not s.login or s.passwd is None:
        return None
    h = hashlib.blake2b(key=_SECRET, digest_size=32)
    for part in (s.proto.NAME.encode(), s.auth_method.encode(), s.login, s.passwd,
                 s.client_ip.encode(), b'tls' if s.tls else b''):
        h.update(b'%d:' % len(part))
        h.update(part)
    return h.digest()


# --- the session's calls --------------------------------------------------------------

def begin(s) -> None:
    """Hook: a connection was accepted (session.handle, when ``conf.tracked``)."""
    s.track = Track()
    metrics.connected(s)


def admit(s) -> None:
    """Hook: before the greeting: ``max_sessions_per_address``."""
    lim = s.conf.limits
    if lim is None or not lim.per_address:
        return
    key = (s.proto.NAME, s.client_ip)
    if not _acquire(_address_sessions, key, lim.per_address):
        metrics.refused(s, 'address')
        raise Refused('too many connections from this address (limit %d)'
                      % lim.per_address, reply='limit_address')
    s.track.address_key = key


def authenticate(s):
    """Hook: ``auth.authenticate(s)`` with the failure window, the answer cache and the
    per-login limit around it, timed and counted."""
    t = s.track
    lim = s.conf.limits
    now = time.monotonic()
    counted = lim is not None and lim.failures and s.auth_method != 'none'
    if counted and _failures.blocked(s.client_ip, lim.failures, lim.window, now):
        t.auth = 'refused'
        metrics.login(s, 'refused')
        metrics.refused(s, 'failures')
        raise Refused('too many failed logins from this address (limit %d in %gs)'
                      % (lim.failures, lim.window), reply='limit_failures')
    cache = lim.cache if lim is not None else None
    key = cache_key(s) if cache is not None else None
    try:
        result = _ask(s, cache, key, now)
    except errors.AuthFailed:
        t.auth = 'failed'
        metrics.login(s, 'failed')
        if counted:
            _failures.record(s.client_ip, lim.failures, time.monotonic())
        raise
    except errors.AuthServiceError:
        t.auth = 'error'
        metrics.login(s, 'error')
        raise
    if lim is not None and lim.per_login and s.login:
        login_key = (s.proto.NAME, s.login)
        _release(_login_sessions, t.login_key)
        t.login_key = None
        if not _acquire(_login_sessions, login_key, lim.per_login):
            t.auth = 'refused'
            metrics.login(s, 'refused')
            metrics.refused(s, 'login')
            raise Refused('too many sessions for this login (limit %d)' % lim.per_login,
                          reply='limit_login')
        t.login_key = login_key
    t.auth = 'ok'
    t.authed = time.monotonic()
    metrics.login(s, 'ok')
    return result


def _ask(s, cache, key, now):
    """The answer: from the cache (applied as ``auth_http.interpret`` applies one), else
    from the auth service (timed, then stored)."""
    if key is not None:
        answer = cache.get(key, now)
        metrics.cache_lookup(answer is not None)
        if isinstance(answer, tuple):
            message, wait, code = answer
            raise errors.AuthFailed(message, wait=wait, error_code=code)
        if answer is not None:
            s.login, s.passwd = answer.login, answer.passwd
            return answer
    started = time.monotonic()
    try:
        result = auth.authenticate(s)
    except errors.AuthFailed as exc:
        metrics.auth_time(time.monotonic() - started)
        if key is not None:
            cache.put(key, (exc.message, exc.wait, exc.error_code), time.monotonic())
        raise
    except errors.AuthServiceError:
        metrics.auth_time(time.monotonic() - started)
        raise
    metrics.auth_time(time.monotonic() - started)
    if key is not None:
        cache.put(key, result, time.monotonic())
    return result


# Exception class names (the first found in the MRO) -> outcome; names, not classes,
# so that server.ShutdownTimeout and gevent's GreenletExit need no import here.
OUTCOMES = {
    'Refused': 'refused',
    'SessionDone': 'quit',
    'ClientClosed': 'closed',
    'ClientError': 'closed',
    'ClientTimeout': 'timeout',
    'AuthFailed': 'auth_failed',
    'AuthServiceError': 'auth_error',
    'UpstreamError': 'upstream_error',
    'TLSError': 'tls_error',
    'BadCommand': 'invalid',
    'TooLong': 'invalid',
    'TooManyErrors': 'invalid',
    'ShutdownTimeout': 'shutdown',
    'GreenletExit': 'killed',
}
# A client leaving after its login was rejected or refused: that is the outcome.
_AFTER_AUTH = {'failed': 'auth_failed', 'refused': 'refused'}


def outcome(t: Track, inflight: BaseException | None) -> str:
    """``ok`` (proxied), ``quit``, ``closed``, ``timeout``, ``auth_failed``,
    ``auth_error``, ``refused``, ``upstream_error``, ``tls_error``, ``invalid``,
    ``shutdown``, ``killed`` or ``internal``."""
    exc = t.exc if t.exc is not None else inflight
    if exc is None:
        return 'ok' if t.bytes is not None else 'internal'
    name = 'internal'
    for cls in type(exc).__mro__:
        found = OUTCOMES.get(cls.__name__)
        if found is not None:
            name = found
            break
    if name in ('quit', 'closed', 'timeout') and t.auth in _AFTER_AUTH:
        return _AFTER_AUTH[t.auth]
    return name


def end(s) -> None:
    """Hook: the connection is over (session.handle's ``finally``): release the limits,
    then count and log the session. Never raises."""
    t = s.track
    try:
        _release(_address_sessions, t.address_key)
        _release(_login_sessions, t.login_key)
        t.address_key = t.login_key = None
        result = outcome(t, sys.exc_info()[1])
        if result == 'tls_error' and not s.tls:
            metrics.tls_failed(s)
        metrics.session_done(s, result)
        accesslog.session_done(s, result)
    except Exception:
        log.session_line(s, log.ALERT, 'session accounting failed', exc_info=True)


def reset() -> None:
    """Forget every counter (tests)."""
    _address_sessions.clear()
    _login_sessions.clear()
    _failures.clear()
