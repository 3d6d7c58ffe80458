"""Serving and process control (nginx ngx_process_cycle.c, ngx_cycle.c; issue 4).

``Service`` serves one configuration in one process: a ``StreamServer`` per listening
socket, the sessions in one ``Pool`` bounded by ``worker_connections`` (the excess is
closed at once and logged as nginx logs it), and gunicorn's three-step graceful stop
(stop accepting, let the sessions finish within ``worker_shutdown_timeout``, then close
the rest, logged ``shutdown timeout``).

``run()`` is what ``gmailproxy CONF`` calls once the listening sockets are open: with
``master_process on`` (the default) a master process forks ``worker_processes`` workers
(``workers.Master``); with ``master_process off`` one process serves (``Single``). Both
obey nginx's signals: TERM/INT fast stop, QUIT graceful stop, HUP reload (parse first;
on error log ``[emerg]`` and keep serving the old configuration), USR1 reopen the logs.
The ``pid`` file is written only when the ``pid`` directive names one, and removed at
exit.
"""
import errno
import logging
import os
import signal
import sys

import gevent
import gevent.event
import gevent.queue
from gevent import monkey
from gevent.pool import Pool
from gevent.server import StreamServer

from . import errors, listeners, log, session

try:    # features with hooks into the process model (their own issues)
    from . import accesslog, metrics
except ImportError:     # pragma: no cover (not there yet)
    accesslog = metrics = None
from .config.parser import load
from .errors import ConfigError

_log = logging.getLogger('gmailproxy')

SIGNAL_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT',
                signal.SIGQUIT: 'SIGQUIT', signal.SIGHUP: 'SIGHUP',
                signal.SIGUSR1: 'SIGUSR1'}
# What a master (or single process) does on each signal, as nginx logs it.
SIGNAL_ACTIONS = {signal.SIGTERM: 'exiting', signal.SIGINT: 'exiting',
                  signal.SIGQUIT: 'shutting down', signal.SIGHUP: 'reconfiguring',
                  signal.SIGUSR1: 'reopening logs'}


IDLE = 3600.0   # a wait with a timer: signal watchers alone do not keep gevent's loop


class ShutdownTimeout(errors.ProxyError):
    """``worker_shutdown_timeout`` expired during a graceful stop: the session is closed
    without a reply and logged at info (``shutdown timeout while proxying, ...``)."""
    reply = None
    level = logging.INFO

    def __init__(self, message: str = 'shutdown timeout', **kw):
        super().__init__(message, **kw)


def attach_loggers(config) -> list[logging.Logger]:
    """Give every server its logger: its own error_log, else mail's, else the main one.
    Every file is opened before anything changes (OSError/ValueError leave the current
    logging as it was). Returns the loggers in use."""
    main_specs = config.main.error_log or [('stderr', 'error')]
    main = log.get_logger(main_specs)
    loggers = [log.get_logger(conf.error_log or main_specs) for conf in config.servers]
    log.setup_main(main_specs)
    for conf, logger in zip(config.servers, loggers):
        conf.logger = logger
    return [main] + loggers


def log_error_text(e: Exception) -> str:
    """An error opening a log target, as nginx words it."""
    if isinstance(e, OSError) and e.filename:
        return 'open() "%s" failed (%d: %s)' % (e.filename, e.errno, e.strerror)
    return str(e)


ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener(StreamServer):
    """A StreamServer whose accept() running out of descriptors or memory is logged as
    nginx logs it (ngx_event_accept: ``[crit] accept4() failed (24: Too many open
    files)``) and pauses accepting for ``ACCEPT_PAUSE`` seconds (nginx disables its
    accept events likewise), instead of gevent printing a traceback to stderr."""
    ACCEPT_PAUSE = 0.5

    def __init__(self, sock, handle, spawn, listen):
        super().__init__(sock, handle, spawn=spawn)
        self.listen = listen

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in ACCEPT_ERRORS:
                raise
            logger = getattr(self.listen.server, 'logger', None) or _log
            logger.log(log.CRIT, 'accept4() failed (%d: %s)', exc.errno,
                       os.strerror(exc.errno))
            self.stop_accepting()           # also stops gevent's own backoff timer
            self._timer = self.loop.timer(self.ACCEPT_PAUSE)
            self._timer.start(self._start_accepting_if_started)
            return None


class Service:
    """One configuration served by one process.

    ``dup=True`` serves duplicates of the listening sockets, so stopping the service
    leaves the originals open for the next configuration (single process, tests);
    a worker serves the originals it inherited (``dup=False``)."""

    def __init__(self, config, bounds, dup: bool = True):
        self.config = config
        self.group = Pool()     # no size: the limit is checked in the handler
        # nginx counts the listening sockets among a worker's connections.
        self.connections = config.main.worker_connections
        self.limit = max(1, self.connections - len(bounds))
        self.servers = [Listener(bound.sock.dup() if dup else bound.sock,
                                 self._handler(bound), spawn=self.group,
                                 listen=bound.listens[0])
                        for bound in bounds]
        self.stopping = False
        self.stopped = gevent.event.Event()

    def _handler(self, bound):
        route, group, first = bound.route, self.group, bound.listens[0]

        def handle(sock, peer):
            if len(group) > self.limit:     # this greenlet is already in the group
                logger = getattr(first.server, 'logger', None) or _log
                logger.log(log.ALERT, '%d worker_connections are not enough while '
                           'accepting new connection on %s', self.connections,
                           first.addr_text)
                return
            try:
                local = sock.getsockname()
                listen = route(local)
            except OSError:
                return
            session.handle(sock, peer, listen, local)
        return handle

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self, graceful: bool = False) -> None:
        """Fast: close everything now. Graceful: stop accepting, wait for the sessions
        (at most ``worker_shutdown_timeout`` when set), then close what is left."""
        if not self.stopping:
            self.stopping = True
            for server in self.servers:
                server.close()
        if graceful:
            # a fast stop meanwhile empties the group and ends this wait
            self.group.join(timeout=self.config.main.worker_shutdown_timeout)
            if len(self.group):
                for greenlet in list(self.group):
                    greenlet.kill(ShutdownTimeout, block=False)
                self.group.join(timeout=1)
        self.group.kill(block=True, timeout=1)
        self.stopped.set()


# Listening sockets across a reload.

def _key(lst) -> tuple:
    return (lst.family, lst.sockaddr)


def reuse_listeners(config, old: list) -> list:
    """The sockets of ``config``: those whose address was already open are kept (nginx
    ngx_init_cycle), so no connection is refused during a reload; the rest are opened.
    ConfigError (after closing what it opened) when one cannot be."""
    by_key = {_key(bound.listens[0]): bound for bound in old}
    bounds, opened, done = [], [], False
    try:
        addresses = [lst for conf in config.servers for lst in conf.listen]
        for group in listeners.plan(addresses):
            bound = listeners.Bound(None, group)
            previous = by_key.pop(_key(group[0]), None)
            if previous is not None:
                bound.sock, bound.unix_path = previous.sock, previous.unix_path
                if group[0].backlog != previous.listens[0].backlog:
                    try:
                        bound.sock.listen(group[0].backlog)
                    except OSError:
                        pass
            else:
                opened.append(bound)
                bound.sock = listeners.open_socket(group[0], bound)
            bounds.append(bound)
        done = True
    finally:
        if not done:
            listeners.close_listeners(opened)
    return bounds


def close_unused(old: list, new: list) -> None:
    """Close the sockets of ``old`` that ``new`` does not use."""
    kept = {id(bound.sock) for bound in new}
    listeners.close_listeners([bound for bound in old if id(bound.sock) not in kept])


# The pid file.

def write_pid(path: str | None) -> None:
    """nginx ngx_create_pidfile: ``PID\\n``; OSError when it cannot be written."""
    if path is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b'%d\n' % os.getpid())
    finally:
        os.close(fd)


def remove_pid(path: str | None) -> None:
    """Remove the pid file if it is still ours."""
    if path is None:
        return
    try:
        with open(path, 'rb') as f:
            if f.read(32).strip() != b'%d' % os.getpid():
                return
        os.unlink(path)
    except OSError as e:
        _log.log(log.ALERT, 'unlink() "%s" failed (%d: %s)', path, e.errno, e.strerror)


def pid_failed(path: str, e: OSError) -> str:
    return 'open() "%s" failed (%d: %s)' % (path, e.errno, e.strerror)


def set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def command_line() -> str:
    """The command as typed (nginx shows its argv in the master's title)."""
    argv = sys.argv
    if not argv or argv[0].endswith('__main__.py'):
        argv = getattr(sys, 'orig_argv', argv)
    return ' '.join(argv)


def reopen_logs(owner=None) -> None:
    """USR1: the error logs, then the access logs (nginx reopens every open file)."""
    log.reopen(owner)
    if accesslog is not None:
        accesslog.reopen(owner)


def start_metrics(config, workers: bool) -> None:
    """Serve ``metrics_listen`` (at start, after each reload); an address that cannot
    be opened is logged by ``metrics.start`` and the previous page stays."""
    if metrics is not None:
        metrics.start(config, workers=workers)


def stop_metrics() -> None:
    if metrics is not None:
        metrics.stop()


class ConfigWatcher:
    """``--watch``: calls ``notify`` (in the hub) when one of the configuration files
    changes. watchfiles (Rust notify: inotify) watches the files' folders from a thread
    of gevent's pool, so editors that replace a file are seen too; the thread wakes the
    hub through a loop ``async`` watcher (thread-safe)."""

    def __init__(self, notify):
        import watchfiles  # noqa: F401 (missing: fail now, not in the thread)
        self._notify = notify
        self._async = gevent.get_hub().loop.async_()
        self._async.start(self._fire)
        self._stop = None

    def watch(self, files) -> None:
        """Watch ``files`` (config.files) instead of what was watched."""
        self.stop_thread()
        stop = _RealEvent()
        self._stop = stop
        files = {os.path.abspath(f) for f in files}
        folders = sorted({os.path.dirname(f) for f in files})
        gevent.get_hub().threadpool.spawn(self._run, folders, files, stop)

    def _run(self, folders, files, stop) -> None:     # in a thread of its own
        import watchfiles
        try:
            for changes in watchfiles.watch(*folders, watch_filter=None, debounce=200,
                                            step=50, stop_event=stop, rust_timeout=500,
                                            recursive=False, raise_interrupt=False):
                if stop.is_set():
                    return
                if any(os.path.abspath(path) in files for _, path in changes):
                    self._async.send()
        except Exception as e:  # the folder went away, too many watches, ...
            self._error = e
            self._async.send()

    _error = None

    def _fire(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            _log.log(log.ALERT, 'watching the configuration failed: %s', error)
            return
        self._notify()

    def stop_thread(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def close(self) -> None:
        """Stop watching (in a forked worker too, where the thread does not exist)."""
        self.stop_thread()
        self._async.stop()


_RealEvent = monkey.get_original('threading', 'Event')


class Controller:
    """What the master and the single process share: signals become actions handled
    one at a time by the main greenlet; reload parses and opens everything first."""

    def __init__(self, config, bounds, options=None):
        self.config = config
        self.bounds = bounds
        self.options = options
        self.actions = gevent.queue.Queue()
        self.handles = []
        self.watcher = None
        self.pid_path = config.main.pid
        self.loggers = []

    def install_signals(self) -> None:
        for signum in SIGNAL_NAMES:
            self.handles.append(gevent.signal_handler(signum, self.actions.put,
                                                      ('signal', signum)))

    def cancel_signals(self) -> None:
        for handle in self.handles:
            handle.cancel()
        self.handles = []

    def log_signal(self, signum: int) -> None:
        _log.log(log.NOTICE, 'signal %d (%s) received, %s', signum,
                 SIGNAL_NAMES[signum], SIGNAL_ACTIONS[signum])

    def start_watcher(self) -> None:
        if getattr(self.options, 'watch', False):
            self.watcher = ConfigWatcher(lambda: self.actions.put(('watch',)))
            self.watcher.watch(self.config.files)

    def prepare_reload(self):
        """(config, bounds, loggers) for the file as it is now, or None after logging
        why it cannot be used (the running configuration stays)."""
        try:
            config = load(self.config.path, prefix=self.config.prefix,
                          extra=getattr(self.options, 'globals', None) or '')
            bounds = reuse_listeners(config, self.bounds)
        except ConfigError as e:
            _log.log(log.EMERG, '%s', e)
            return None
        except OSError as e:
            _log.log(log.EMERG, '%s', e)
            return None
        try:
            loggers = attach_loggers(config)
        except (OSError, ValueError) as e:
            _log.log(log.EMERG, '%s', log_error_text(e))
            close_unused(bounds, self.bounds)
            return None
        if config.main.pid != self.pid_path:
            try:
                write_pid(config.main.pid)
            except OSError as e:
                _log.log(log.EMERG, '%s', pid_failed(config.main.pid, e))
            else:
                remove_pid(self.pid_path)
                self.pid_path = config.main.pid
        if self.watcher is not None:
            self.watcher.watch(config.files)
        return config, bounds, loggers

    def finish(self) -> int:
        if self.watcher is not None:
            self.watcher.close()
        stop_metrics()
        listeners.close_listeners(self.bounds)
        remove_pid(self.pid_path)
        _log.log(log.NOTICE, 'exit')
        log.flush()
        return 0


class Single(Controller):
    """``master_process off``: this process serves; a reload swaps the ``Service`` while
    the old one finishes its sessions on the same sockets."""

    def run(self) -> int:
        start_metrics(self.config, workers=False)
        service = Service(self.config, self.bounds)
        service.start()
        services = {service}            # the current one and those still draining
        stopping = False
        self.install_signals()
        self.start_watcher()
        while services:
            try:
                action = self.actions.get(timeout=IDLE)
            except gevent.queue.Empty:
                continue
            if action[0] == 'done':
                services.discard(action[1])
                if not stopping and services == {service}:
                    log.prune(self.loggers)     # no session uses the old logs now
                continue
            if action[0] == 'watch':
                if stopping:
                    continue
                _log.log(log.NOTICE, 'configuration file changed, reconfiguring')
                signum = signal.SIGHUP
            else:
                signum = action[1]
                self.log_signal(signum)
            if signum == signal.SIGUSR1:
                reopen_logs()
            elif signum == signal.SIGHUP:
                if not stopping:
                    service = self.reload(service, services)
            else:
                stopping = True
                for each in services:
                    gevent.spawn(self._stop, each, signum == signal.SIGQUIT)
        return self.finish()

    def reload(self, service, services):
        """The new Service (or ``service`` when the file cannot be used); the old one
        drains in the background."""
        prepared = self.prepare_reload()
        if prepared is None:
            return service
        old_bounds = self.bounds
        self.config, self.bounds, self.loggers = prepared
        new = Service(self.config, self.bounds)
        new.start()
        start_metrics(self.config, workers=False)
        services.add(new)
        close_unused(old_bounds, self.bounds)
        gevent.spawn(self._stop, service, True)
        return new

    def _stop(self, service, graceful: bool) -> None:
        service.stop(graceful)
        self.actions.put(('done', service))


def run(config, bounds, options=None) -> int:
    """Serve until stopped; the exit status (0 after a stop, 1 when starting failed)."""
    try:
        loggers = attach_loggers(config)
    except (OSError, ValueError) as e:
        sys.stderr.write('gmailproxy: [emerg] %s\n' % log_error_text(e))
        listeners.close_listeners(bounds)
        return 1
    if config.main.daemon:
        daemonize(config)
    try:
        write_pid(config.main.pid)
    except OSError as e:
        _log.log(log.EMERG, '%s', pid_failed(config.main.pid, e))
        sys.stderr.write('gmailproxy: [emerg] %s\n' % pid_failed(config.main.pid, e))
        listeners.close_listeners(bounds)
        return 1
    try:    # *N numbers unique across workers (see log.ConnectionCounter)
        session._conn_ids = log.ConnectionCounter()
    except (OSError, ImportError) as e:  # no POSIX semaphores: numbers per process
        _log.log(log.WARN, 'connection numbers are per worker process: %s', e)
    if config.main.master_process:
        from .workers import Master
        controller = Master(config, bounds, options)
    else:
        controller = Single(config, bounds, options)
    controller.loggers = loggers
    set_title('gmailproxy: master process %s' % command_line())
    try:
        return controller.run()
    except BaseException:
        remove_pid(controller.pid_path)
        raise


def daemonize(config) -> None:
    """``daemon on`` (nginx ngx_daemon, ngx_log_redirect_stderr): fork, new session,
    stdin/stdout to /dev/null, stderr to the main error log file unless that log is
    stderr (so whoever started us is not kept waiting on our output)."""
    pid = os.fork()
    if pid:
        os._exit(0)
    os.setsid()
    os.umask(0o022)
    fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    targets = [spec[0] for spec in config.main.error_log or ()]
    if 'stderr' not in targets:
        files = [t for t in targets if not t.startswith('syslog:')]
        if files:
            try:
                err = os.open(files[0], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError:
                err = None
            if err is not None:
                os.dup2(err, 2)
                os.close(err)
        else:
            os.dup2(fd, 2)
    if fd > 2:
        os.close(fd)
