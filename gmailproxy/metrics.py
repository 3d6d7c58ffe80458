"""Prometheus metrics (beyond nginx, issue 12): ``metrics_listen ADDR;`` in ``mail {}``.

nginx's mail modules have no metrics (spec README, "What nginx does not do"). This
module keeps the counters with the official ``prometheus_client`` library and serves
them in Prometheus' text format over HTTP on their own address (any path; ``/metrics``
is usual).

Processes. With ``master_process off`` (and in-process tests) the serving process holds
the values in a private registry and serves them itself. With workers
(``master_process on``, the default) the values live in the workers while the master
serves the page, so ``start(config, workers=True)`` switches the library to its
multiprocess mode before any value exists: each process writes its values to files
(``mmap``) in a private folder made for this master (``PROMETHEUS_MULTIPROC_DIR``,
chowned to ``user``), and the master's page sums the files of every worker at each
scrape (``MultiProcessCollector``). Counters of workers that exited stay in the sums
(totals never go back after a reload or a crash); gauges count live workers only
(``worker_exited(pid)`` drops a dead worker's files). The folder is removed when the
master stops. The first ``start()`` fixes the mode for the process's life.

What is counted (labels ``protocol`` and ``server``, the listen address as the error
log's ``server:`` shows it):

* ``gmailproxy_connections_total`` / ``gmailproxy_connections_active``: accepted client
  connections;
* ``gmailproxy_sessions_total`` / ``gmailproxy_sessions_active``: connections that
  logged in and are (were) proxied to a backend;
* ``gmailproxy_session_outcomes_total{outcome}``: how connections ended, the access
  log's ``outcome`` (``limits.OUTCOMES``);
* ``gmailproxy_logins_total{outcome}``: login attempts: ``ok``, ``failed`` (rejected by
  the auth service), ``error`` (the auth service failed), ``refused`` (a limit);
* ``gmailproxy_limit_refusals_total{limit}``: ``address``, ``login`` or ``failures``;
* ``gmailproxy_proxied_bytes_total{direction}``: ``from_client`` and ``to_client``, the
  bytes of "proxied session done", added when a session ends;
* ``gmailproxy_tls_handshakes_total{version}``: ``TLSv1.3`` ... or ``failed``;
* ``gmailproxy_auth_duration_seconds`` (histogram): time the auth service took to answer
  (``auth_http`` and its WAIT retries; cache hits are not timed);
* ``gmailproxy_auth_cache_lookups_total{result}``: ``hit`` / ``miss``;
* ``gmailproxy_backend_connect_duration_seconds`` (histogram): from the auth answer to a
  connected backend socket.

Every function here is a no-op until ``start()`` made the metrics (``_m is None``); the
session calls them only when ``conf.tracked`` is set.
"""
import logging
import os
import shutil
import socket
import tempfile
import time

import prometheus_client as prom
from gevent import pywsgi
from prometheus_client import multiprocess
from prometheus_client import values as prom_values

from . import log
from .config import address
from .config.directives import D, MAIL

_log = logging.getLogger(__name__)


class MetricsListen:
    __slots__ = ('family', 'sockaddr', 'addr_text')

    def __init__(self, family: int, sockaddr, addr_text: str):
        self.family, self.sockaddr, self.addr_text = family, sockaddr, addr_text


def metrics_listen(args, ctx) -> MetricsListen | None:
    """``ADDR:PORT``, ``PORT`` (IPv4 wildcard), ``[IPV6]:PORT``, ``unix:PATH``, or
    ``off``."""
    text = args[0]
    if text == 'off':
        return None
    try:
        url = address.parse_url(text, listen=True, cache=ctx.cache)
    except address.UrlError as e:
        raise ValueError('%s in "%s" of the "metrics_listen" directive'
                         % (e, text)) from None
    if url.family == socket.AF_UNIX:
        path = url.addrs[0][1]
        return MetricsListen(socket.AF_UNIX, path, 'unix:' + path)
    if url.no_port or len(url.ports) != 1:
        raise ValueError('invalid port in "%s" of the "metrics_listen" directive'
                         % text)
    family, ip = url.addrs[0]
    port = url.ports[0]
    return MetricsListen(family, address.sockaddr(family, ip, port),
                         address.addr_text(family, ip, port))


DIRECTIVES = [
    D('metrics_listen', MAIL, '1', metrics_listen),
]


def finalize(conf) -> None:
    """``conf.metrics``: whether sessions of this server are counted."""
    conf.metrics = getattr(conf, 'metrics_listen', None) is not None
    conf.tracked = getattr(conf, 'tracked', False) or conf.metrics


# --- the metrics --------------------------------------------------------------------

PS = ('protocol', 'server')


class _Metrics:
    """Every metric of one process, in ``registry`` (unused for serving in multiprocess
    mode, where the page is built from the files)."""

    def __init__(self):
        r = self.registry = prom.CollectorRegistry(auto_describe=True)
        c, g, h = prom.Counter, prom.Gauge, prom.Histogram
        self.connections = c('gmailproxy_connections', 'Accepted client connections.',
                             PS, registry=r)
        self.connections_active = g('gmailproxy_connections_active',
                                    'Client connections open now.', PS, registry=r,
                                    multiprocess_mode='livesum')
        self.sessions = c('gmailproxy_sessions', 'Sessions logged in and proxied.', PS,
                          registry=r)
        self.sessions_active = g('gmailproxy_sessions_active',
                                 'Sessions being proxied now.', PS, registry=r,
                                 multiprocess_mode='livesum')
        self.outcomes = c('gmailproxy_session_outcomes',
                          'How client connections ended.', PS + ('outcome',),
                          registry=r)
        self.logins = c('gmailproxy_logins', 'Login attempts by outcome.',
                        PS + ('outcome',), registry=r)
        self.refusals = c('gmailproxy_limit_refusals',
                          'Connections or logins refused by a limit.', PS + ('limit',),
                          registry=r)
        self.bytes = c('gmailproxy_proxied_bytes', 'Bytes relayed between client and '
                       'backend, counted when a session ends.', PS + ('direction',),
                       registry=r)
        self.tls = c('gmailproxy_tls_handshakes', 'Client TLS handshakes by version.',
                     PS + ('version',), registry=r)
        self.auth_time = h('gmailproxy_auth_duration_seconds', 'Time the auth service '
                           'took to answer.', registry=r)
        self.cache = c('gmailproxy_auth_cache_lookups', 'Authentication cache lookups.',
                       ('result',), registry=r)
        self.connect_time = h('gmailproxy_backend_connect_duration_seconds',
                              'Time from the auth answer to a connected backend.',
                              registry=r)


_m: _Metrics | None = None
_mode: str | None = None        # 'single' or 'workers', fixed by the first start()
_dir: str | None = None         # the multiprocess folder (multiprocess mode)
_dir_owner: int | None = None   # the pid that made it and removes it
_served: tuple | None = None    # (addr_text, WSGIServer, unix path or None, pid)


def _labels(s) -> tuple:
    return (s.proto.NAME, s.listen.addr_text)


def connected(s) -> None:
    m = _m
    if m is None:
        return
    labels = _labels(s)
    m.connections.labels(*labels).inc()
    m.connections_active.labels(*labels).inc()
    s.track.metered = True


def tls_handshake(s, version: str) -> None:
    m = _m
    if m is not None:
        m.tls.labels(*_labels(s), version).inc()


def tls_failed(s) -> None:
    m = _m
    if m is not None:
        m.tls.labels(*_labels(s), 'failed').inc()


def login(s, outcome: str) -> None:
    m = _m
    if m is not None:
        m.logins.labels(*_labels(s), outcome).inc()


def refused(s, limit: str) -> None:
    m = _m
    if m is not None:
        m.refusals.labels(*_labels(s), limit).inc()


def auth_time(seconds: float) -> None:
    m = _m
    if m is not None:
        m.auth_time.observe(seconds)


def cache_lookup(hit: bool) -> None:
    m = _m
    if m is not None:
        m.cache.labels('hit' if hit else 'miss').inc()


def backend_connected(s) -> None:
    """Hook: ``upstream.connect`` returned (session.run)."""
    m = _m
    t = s.track
    if m is not None and t.authed is not None:
        m.connect_time.observe(time.monotonic() - t.authed)


def logged_in(s) -> None:
    """Hook: "client logged in" (session.run)."""
    m = _m
    if m is None or not s.track.metered:
        return
    labels = _labels(s)
    m.sessions.labels(*labels).inc()
    m.sessions_active.labels(*labels).inc()
    s.track.logged_in = True


def session_done(s, outcome: str) -> None:
    """From ``limits.end``: the connection is over."""
    m = _m
    t = s.track
    if m is None or not t.metered:
        return
    labels = _labels(s)
    m.connections_active.labels(*labels).dec()
    if t.logged_in:
        m.sessions_active.labels(*labels).dec()
    m.outcomes.labels(*labels, outcome).inc()
    if t.bytes is not None:
        from_client, to_client = t.bytes
        if from_client:
            m.bytes.labels(*labels, 'from_client').inc(from_client)
        if to_client:
            m.bytes.labels(*labels, 'to_client').inc(to_client)


# --- serving the page ---------------------------------------------------------------

def listen_of(config) -> MetricsListen | None:
    for conf in config.servers:
        where = getattr(conf, 'metrics_listen', None)
        if where is not None:
            return where
    return None


def start(config, workers: bool = False) -> str | None:
    """Serve ``metrics_listen`` of ``config`` (at start and after each reload; the same
    address keeps its socket, ``off`` stops serving). Returns None, or the error
    (already logged at emerg) when the address cannot be opened; the old endpoint
    then stays."""
    global _mode
    where = listen_of(config)
    if _mode is None:
        _mode = 'workers' if workers else 'single'
    if where is None:
        _stop_serving()
        return None
    if _m is None:
        _create(getattr(config.main, 'user', None))
    if _served is not None and _served[0] == where.addr_text:
        return None
    try:
        sock = _open(where)
    except OSError as e:
        error = 'bind() to %s failed (%d: %s)' % (where.addr_text, e.errno or 0,
                                                  e.strerror)
        _log.log(log.EMERG, '%s', error)
        return error
    _stop_serving()
    _serve(sock, where)
    return None


def _create(user) -> None:
    global _m, _dir, _dir_owner
    if _mode == 'workers':
        _dir = tempfile.mkdtemp(prefix='gmailproxy-metrics-')
        _dir_owner = os.getpid()
        if user is not None and os.geteuid() == 0:
            os.chown(_dir, user.uid, user.gid)
        os.environ['PROMETHEUS_MULTIPROC_DIR'] = _dir
        # What the library picks at import when the variable is set (values.py).
        prom_values.ValueClass = prom_values.MultiProcessValue()
    _m = _Metrics()


def _open(where: MetricsListen) -> socket.socket:
    sock = socket.socket(where.family, socket.SOCK_STREAM)
    try:
        if where.family == socket.AF_UNIX:
            try:
                os.unlink(where.sockaddr)
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where.sockaddr)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def registry():
    """What the page shows: this process's registry, or the sum of every process's
    files in multiprocess mode."""
    if _dir is None:
        return _m.registry
    merged = prom.CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=_dir)
    return merged


def _app(environ, start_response):
    return prom.make_wsgi_app(registry())(environ, start_response)


def _serve(sock, where: MetricsListen) -> None:
    global _served
    server = pywsgi.WSGIServer(sock, _app, spawn=32, log=None, error_log=_log)
    server.start()
    path = where.sockaddr if where.family == socket.AF_UNIX else None
    _served = (where.addr_text, server, path, os.getpid())


def _stop_serving() -> None:
    global _served
    if _served is not None:
        _, server, path, pid = _served
        _served = None
        server.close()
        if path is not None and pid == os.getpid():
            try:
                os.unlink(path)
            except OSError:
                pass


def forget() -> None:
    """Hook: in a freshly forked worker: the master serves the page, not a worker."""
    _stop_serving()


def worker_exited(pid: int) -> None:
    """Hook: in the master when a worker is gone: its live gauges stop counting."""
    if _dir is not None:
        multiprocess.mark_process_dead(pid, _dir)


def stop() -> None:
    """Hook: the process ends (and between in-process tests): stop serving; the master
    removes the multiprocess folder. The next ``start()`` begins from zero."""
    global _m, _mode, _dir, _dir_owner
    _stop_serving()
    if _dir is not None:
        if _dir_owner == os.getpid():
            shutil.rmtree(_dir, ignore_errors=True)
        os.environ.pop('PROMETHEUS_MULTIPROC_DIR', None)
        prom_values.ValueClass = prom_values.MutexValue
    _m = _mode = _dir = _dir_owner = None
