"""The master and its worker processes (nginx ngx_process_cycle.c, ngx_process.c).

The master opened the listening sockets (cli, before ``server.run``) and the log files;
it forks ``worker_processes`` workers that inherit both, re-initialise gevent's hub
(``gevent.os.fork``), drop privileges (``user``) and serve. The master only manages:

* a worker that dies is logged (``worker process N exited on signal 9``) and replaced;
* workers never outlive the master: ``PR_SET_PDEATHSIG`` (SIGKILL) in each worker, plus
  a pipe whose write end only the master holds (EOF = the master is gone);
* HUP: parse and open everything first; on success new workers start with the new
  configuration, then the old ones get QUIT (stop accepting, finish their sessions);
  sockets listed in both configurations stay open all along, so nothing is refused;
* QUIT: the master closes its sockets, workers stop gracefully, the master exits 0 when
  the last one is gone; TERM/INT: workers are told to stop at once (SIGKILL after
  ``FAST_STOP_WAIT``); USR1: the master reopens the log files, then each worker does.
"""
import ctypes
import logging
import os
import resource
import signal
import time

import gevent
import gevent.os
import gevent.queue
from gevent import socket as gsocket

from . import log, server
from .server import (Controller, Service, close_unused, metrics, reopen_logs,
                     set_title, start_metrics)

_log = logging.getLogger('gmailproxy')

PR_SET_PDEATHSIG = 1
FAST_STOP_WAIT = 3.0        # TERM: seconds before the workers are killed
RESPAWN_DELAY = 1.0         # a worker that died younger than this is restarted after it
FATAL = 2                   # a worker exit code meaning "do not respawn" (nginx)


class Worker:
    __slots__ = ('pid', 'generation', 'slot', 'started')

    def __init__(self, pid: int, generation: int, slot: int):
        self.pid, self.generation, self.slot = pid, generation, slot
        self.started = time.monotonic()


class Master(Controller):
    def __init__(self, config, bounds, options=None):
        super().__init__(config, bounds, options)
        self.pid = os.getpid()
        self.workers: dict[int, Worker] = {}
        self.generation = 0
        self.stopping = None            # None, 'graceful' or 'fast'
        self.kill_at = None             # monotonic deadline of a fast stop
        self.timers = []                # delayed respawns (greenlets)
        self.life_r, self.life_w = os.pipe()
        os.set_inheritable(self.life_r, False)
        os.set_inheritable(self.life_w, False)

    # Main loop.

    def run(self) -> int:
        self.install_signals()
        self.start_watcher()
        start_metrics(self.config, workers=True)    # before forking: shared counters
        self.start_workers()
        while not (self.stopping and not self.workers):
            timeout = server.IDLE
            if self.kill_at is not None:
                timeout = max(0.0, self.kill_at - time.monotonic())
            try:
                action = self.actions.get(timeout=timeout)
            except gevent.queue.Empty:
                if self.kill_at is None or time.monotonic() < self.kill_at:
                    continue
                self.kill_at = None
                for pid in self.workers:
                    self.signal_worker(pid, signal.SIGKILL)
                continue
            try:
                getattr(self, 'on_' + action[0])(*action[1:])
            except Exception:   # our bug: the master must survive it
                _log.log(log.ALERT, 'master process error', exc_info=True)
        os.close(self.life_w)
        os.close(self.life_r)
        return self.finish()

    def on_signal(self, signum: int) -> None:
        self.log_signal(signum)
        if signum == signal.SIGHUP:
            if not self.stopping:
                self.reload()
        elif signum == signal.SIGUSR1:
            user = self.config.main.user
            reopen_logs((user.uid, user.gid) if user is not None else None)
            for pid in self.workers:
                self.signal_worker(pid, signal.SIGUSR1)
        elif signum == signal.SIGQUIT:
            if self.stopping is None:
                self.stopping = 'graceful'
                self.close_sockets()
                for pid in self.workers:
                    self.signal_worker(pid, signal.SIGQUIT)
        elif self.stopping != 'fast':       # TERM, INT
            self.stopping = 'fast'
            self.close_sockets()
            self.kill_at = time.monotonic() + FAST_STOP_WAIT
            for pid in self.workers:
                self.signal_worker(pid, signal.SIGTERM)

    def on_watch(self) -> None:
        if not self.stopping:
            _log.log(log.NOTICE, 'configuration file changed, reconfiguring')
            self.reload()

    def on_exit(self, pid: int, status: int) -> None:
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        if metrics is not None:
            metrics.worker_exited(pid)
        code = None
        if os.WIFSIGNALED(status):
            core = ' (core dumped)' if os.WCOREDUMP(status) else ''
            _log.log(log.ALERT, 'worker process %d exited on signal %d%s', pid,
                     os.WTERMSIG(status), core)
        else:
            code = os.WEXITSTATUS(status)
            _log.log(log.NOTICE, 'worker process %d exited with code %d', pid, code)
        if self.stopping or worker.generation != self.generation:
            return
        if code == FATAL:
            _log.log(log.ALERT, 'worker process %d exited with fatal code %d and '
                     'cannot be respawned', pid, code)
            return
        if time.monotonic() - worker.started < RESPAWN_DELAY:
            timer = gevent.spawn_later(RESPAWN_DELAY, self.actions.put,
                                       ('spawn', worker.generation, worker.slot))
            self.timers.append(timer)
        else:
            self.spawn(worker.slot)

    def on_spawn(self, generation: int, slot: int) -> None:
        self.timers = [t for t in self.timers if not t.dead]
        if self.stopping or generation != self.generation:
            return
        if any(w.slot == slot and w.generation == generation
               for w in self.workers.values()):
            return
        self.spawn(slot)

    # Workers.

    def start_workers(self) -> None:
        _log.log(log.NOTICE, 'start worker processes')
        for slot in range(max(1, self.config.main.worker_processes)):
            self.spawn(slot)

    def spawn(self, slot: int) -> None:
        try:
            pid = gevent.os.fork_and_watch(self._child_exited)
        except OSError as e:
            _log.log(log.ALERT, 'fork() failed while spawning "worker process" '
                     '(%d: %s)', e.errno, e.strerror)
            return
        if pid == 0:
            self.become_worker()        # never returns
        self.workers[pid] = Worker(pid, self.generation, slot)
        _log.log(log.NOTICE, 'start worker process %d', pid)

    def _child_exited(self, watcher) -> None:     # in the hub
        self.actions.put_nowait(('exit', watcher.pid, watcher.rstatus))

    @staticmethod
    def signal_worker(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except OSError as e:
            _log.log(log.ALERT, 'kill(%d, %d) failed (%d: %s)', pid, signum, e.errno,
                     e.strerror)

    def reload(self) -> None:
        prepared = self.prepare_reload()
        if prepared is None:
            return
        old_bounds, old_workers = self.bounds, list(self.workers)
        self.config, self.bounds, self.loggers = prepared
        self.generation += 1
        self._closing = old_bounds      # forked workers close those they do not serve
        start_metrics(self.config, workers=True)    # before forking, as at start
        try:
            self.start_workers()
        finally:
            self._closing = ()
        for pid in old_workers:
            self.signal_worker(pid, signal.SIGQUIT)
        close_unused(old_bounds, self.bounds)
        log.prune(self.loggers)

    _closing = ()

    def close_sockets(self) -> None:
        """Stop listening (graceful or fast stop): once the workers close theirs too,
        new connections are refused."""
        for bound in self.bounds:
            bound.sock.close()

    # In the forked child.

    def become_worker(self) -> None:
        """Turn this forked copy of the master into a worker; exits, never returns."""
        code = 0
        try:
            self.forget_master()
            code = worker_process(self.config, self.bounds, self.life_r)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            _log.log(log.ALERT, 'worker process failed', exc_info=True)
            code = FATAL
        finally:
            log.flush()
            os._exit(code)

    def forget_master(self) -> None:
        """Drop what belongs to the master: its signal watchers, timers, the watcher of
        the configuration, the sockets of other configurations, the pipe's write end."""
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.pid:        # the master died before prctl
            os._exit(1)
        os.close(self.life_w)
        self.cancel_signals()
        if metrics is not None:
            metrics.forget()    # the master serves the metrics page
        for timer in self.timers:
            timer.kill(block=False)
        if self.watcher is not None:
            self.watcher.close()
        own = {id(bound.sock) for bound in self.bounds}
        for bound in self._closing:
            if id(bound.sock) not in own:
                bound.sock.close()


def worker_process(config, bounds, life_fd: int) -> int:
    """A worker's life: serve ``config`` until told to stop; the exit code."""
    main = config.main
    if main.worker_rlimit_nofile is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (main.worker_rlimit_nofile,) * 2)
        except (OSError, ValueError) as e:
            _log.log(log.ALERT, 'setrlimit(RLIMIT_NOFILE, %d) failed (%s)',
                     main.worker_rlimit_nofile, e)
    if main.user is not None and os.geteuid() == 0:
        drop_privileges(main.user)
    set_title('gmailproxy: worker process')
    service = Service(config, bounds, dup=False)
    for signum in (signal.SIGHUP, signal.SIGWINCH, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    gevent.signal_handler(signal.SIGTERM, _fast_stop, service)
    gevent.signal_handler(signal.SIGINT, _fast_stop, service)
    gevent.signal_handler(signal.SIGQUIT, _graceful_stop, service)
    gevent.signal_handler(signal.SIGUSR1, _reopen)
    gevent.spawn(_watch_master, life_fd)
    service.start()
    service.stopped.wait()
    _log.log(log.NOTICE, 'exit')
    return 0


def drop_privileges(user) -> None:
    """nginx ngx_worker_process_init: setgid, initgroups, setuid; fatal on failure."""
    try:
        os.setgid(user.gid)
    except OSError as e:
        _log.log(log.EMERG, 'setgid(%d) failed (%d: %s)', user.gid, e.errno, e.strerror)
        raise SystemExit(FATAL)
    try:
        os.initgroups(user.name, user.gid)
    except OSError as e:
        _log.log(log.EMERG, 'initgroups(%s, %d) failed (%d: %s)', user.name, user.gid,
                 e.errno, e.strerror)
        raise SystemExit(FATAL)
    try:
        os.setuid(user.uid)
    except OSError as e:
        _log.log(log.EMERG, 'setuid(%d) failed (%d: %s)', user.uid, e.errno, e.strerror)
        raise SystemExit(FATAL)


def _fast_stop(service) -> None:
    _log.log(log.NOTICE, 'exiting')
    service.stop(graceful=False)


def _graceful_stop(service) -> None:
    if service.stopping:
        return
    service.stopping = True
    for each in service.servers:        # stop accepting before saying so
        each.close()
    _log.log(log.NOTICE, 'gracefully shutting down')
    set_title('gmailproxy: worker process is shutting down')
    service.stop(graceful=True)
    _log.log(log.NOTICE, 'exiting')


def _reopen() -> None:
    _log.log(log.NOTICE, 'reopening logs')
    try:
        reopen_logs()
    except Exception:   # an error raised in a signal handler would end the worker
        _log.log(log.ALERT, 'reopening logs failed', exc_info=True)


def _watch_master(fd: int) -> None:
    """The master holds the only write end: readable means EOF, the master is gone."""
    gsocket.wait_read(fd)
    _log.log(log.ALERT, 'master process exited, worker process %d exits', os.getpid())
    log.flush()
    os._exit(1)
