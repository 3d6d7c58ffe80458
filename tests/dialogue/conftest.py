"""In-process proxy fixtures for byte-for-byte dialogue tests.

``mailproxy(conf_text)`` loads a whole configuration (placeholders ``{auth}``, ``{port}``,
``{port2}``, ``{port3}``, ``{log}``, ``{backend}``) and serves it in this process, so a
test's blocking client calls (monkey-patched in tests/conftest.py) let the proxy run.
``fake_backend(proto)`` is a small scripted backend that records every line it receives.
"""
import os
import re

import gevent
import pytest

from tests.support import dump_on_failure
from tests.support.fake_backend import FakeBackend
from tests.support.net import Client, free_ports


class Proxy:
    def __init__(self, config, bounds, service, ports, log_path):
        self.config, self.bounds, self.service = config, bounds, service
        self.ports = ports
        self.port = ports[0]
        self.log_path = log_path

    def client(self, port: int | None = None, greeting: bytes = b'') -> Client:
        """A raw client; with ``greeting``, past it (checked as ``Client.expect`` does)."""
        c = Client('127.0.0.1', port or self.port)
        if greeting:
            c.expect(greeting)
        return c

    def log_text(self) -> str:
        for logger in {conf.logger for conf in self.config.servers}:
            for handler in logger.handlers:
                handler.flush()
        with open(self.log_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def wait_log(self, pattern: str, timeout: float = 5.0) -> str:
        """The log once ``pattern`` (a regex) appears in it."""
        with gevent.Timeout(timeout, AssertionError('no log line matching %r in:\n%s'
                                                    % (pattern, self.log_text()))):
            while not re.search(pattern, self.log_text()):
                gevent.sleep(0.02)
        return self.log_text()

    def stop(self) -> None:
        from gmailproxy.listeners import close_listeners
        self.service.stop()
        close_listeners(self.bounds)


@pytest.fixture
def mailproxy(tmp_path, auth, request):
    """``mailproxy(conf_text, **extra_placeholders) -> Proxy`` serving in-process."""
    from gmailproxy import server
    from gmailproxy.config.parser import load
    from gmailproxy.listeners import open_listeners

    started = []

    def start(conf_text: str, **extra) -> Proxy:
        ports = free_ports(3)
        log_path = str(tmp_path / ('error%d.log' % len(started)))
        values = {'auth': auth.url, 'port': ports[0], 'port2': ports[1], 'port3': ports[2],
                  'log': log_path}
        values.update(extra)
        text = conf_text
        for key, value in values.items():
            text = text.replace('{%s}' % key, str(value))
        if 'events' not in text:
            text = 'events { }\n' + text
        path = tmp_path / ('mail%d.conf' % len(started))
        path.write_text(text)
        config = load(str(path))
        bounds = open_listeners(config)
        server.attach_loggers(config)
        service = server.Service(config, bounds)
        service.start()
        proxy = Proxy(config, bounds, service, ports, log_path)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        dump_on_failure(request, 'proxy log', proxy.log_text()[-4000:]
                        if os.path.exists(proxy.log_path) else '')
        proxy.stop()


@pytest.fixture
def fake_backend(request):
    made = []

    def make(proto: str, replies: dict | None = None) -> FakeBackend:
        backend = FakeBackend(proto, replies)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        dump_on_failure(request, 'backend %s received' % backend.proto, repr(backend.received))
        backend.stop()


@pytest.fixture
def backends(fake_backend, auth):
    """A fake backend per protocol (imap, pop3, smtp), where auth sends alice/secret."""
    made = {p: fake_backend(p) for p in ('imap', 'pop3', 'smtp')}
    auth.users = {'alice': {'password': 'secret'}}
    auth.ports = {p: b.port for p, b in made.items()}
    return made


@pytest.fixture
def clean_limits():
    """Empty limit tables (sessions, rates, auth cache) before and after the test."""
    from gmailproxy import limits
    limits.reset()
    yield
    limits.reset()
