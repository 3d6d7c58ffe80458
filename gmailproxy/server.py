"""Service: one gevent StreamServer per listening socket, signals, stop.

TODO(issue 4): master + workers, reload on HUP, graceful QUIT bounded by
worker_shutdown_timeout, worker_connections.
"""
import logging
import signal

import gevent
import gevent.event
from gevent.server import StreamServer

from . import log, session

_log = logging.getLogger(__name__)


def attach_loggers(config) -> None:
    """Give every server its logger: its own error_log, else mail's, else the main one."""
    main_specs = config.main.error_log or [('stderr', 'error')]
    log.setup_main(main_specs)
    for conf in config.servers:
        conf.logger = log.get_logger(conf.error_log or main_specs)


def make_handler(bound):
    route = bound.route

    def handle(sock, peer):
        try:
            listen = route(sock.getsockname())
        except OSError:
            return
        session.handle(sock, peer, listen)
    return handle


class Service:
    def __init__(self, config, bounds):
        self.config = config
        self.servers = [StreamServer(bound.sock, make_handler(bound)) for bound in bounds]
        self.stopped = gevent.event.Event()

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self, graceful: bool = False) -> None:
        for server in self.servers:
            server.close()
        timeout = self.config.main.worker_shutdown_timeout if graceful else 1
        for server in self.servers:
            server.stop(timeout=timeout)
        self.stopped.set()


def run(config, bounds, options=None) -> int:
    attach_loggers(config)
    service = Service(config, bounds)
    service.start()
    gevent.signal_handler(signal.SIGTERM, service.stop)
    gevent.signal_handler(signal.SIGINT, service.stop)
    gevent.signal_handler(signal.SIGQUIT, lambda: gevent.spawn(service.stop, True))
    gevent.signal_handler(signal.SIGUSR1, log.reopen)
    service.stopped.wait()
    return 0
