"""Fixtures for end-to-end tests: real Dovecot/Postfix/nginx, gmailproxy as a process.

Every server is stopped (and its folder removed) at teardown, also when the test fails;
the tail of its log is printed then, so a failing test shows what the server said.
"""
import functools
import itertools

import pytest

from tests.support import dump_on_failure
from tests.support.backends import Dovecot, Haproxy, Nginx, Postfix, make_cert
from tests.support.net import free_port
from tests.support.proxyproc import GmailProxy

USERS = {'alice': 'secret', 'bob': 'hunter2'}
MAILBOXES = ('alice@test.example', 'bob@test.example')


def _server_factory(request, start, logs, stop=lambda server: server.stop(remove=False),
                    remove=True):
    """Fixture body of a server factory: yields ``start`` with ``register`` bound as its
    first argument (``register(server)`` -> server, called before the server starts).

    At teardown every registered server is stopped, the tail of each ``logs`` entry
    (title -> method name) printed if the test failed, then its folder removed.
    """
    started = []

    def register(server):
        started.append(server)
        return server

    yield functools.partial(start, register)
    for server in started:
        stop(server)
        for title, method in logs.items():
            dump_on_failure(request, title, getattr(server, method)())
        if remove:
            server.remove()


@pytest.fixture
def make_dovecot(request):
    """``make_dovecot(users=..., ssl_cert=..., haproxy=True)`` -> started Dovecot."""
    def start(register, **kw):
        kw.setdefault('users', USERS)
        return register(Dovecot(**kw)).start()

    yield from _server_factory(request, start, {'dovecot log': 'log_text'})


@pytest.fixture
def dovecot(make_dovecot):
    """Dovecot with users alice/secret and bob/hunter2 (imap_port, pop3_port)."""
    return make_dovecot()


@pytest.fixture
def make_postfix(request):
    """``make_postfix(mailboxes=..., extra_main_cf=..., ...)`` -> started Postfix."""
    def start(register, **kw):
        kw.setdefault('mailboxes', MAILBOXES)
        return register(Postfix(**kw)).start()

    yield from _server_factory(request, start, {'postfix log': 'log_text'})


@pytest.fixture
def postfix(make_postfix):
    """Postfix on ``port`` with mailboxes alice@ and bob@test.example, XCLIENT from
    127.0.0.1."""
    return make_postfix()


@pytest.fixture
def nginx(request):
    """``nginx(mail_conf_text, ports)`` -> started Debian nginx with the mail module."""
    def start(register, mail_conf, ports=(), **kw):
        return register(Nginx(mail_conf, **kw)).start(ports)

    yield from _server_factory(request, start, {'nginx error.log': 'error_log_text'})


@pytest.fixture
def haproxy(request):
    """``haproxy(config_text, ports)`` -> started haproxy (TCP mode)."""
    def start(register, config, ports=(), **kw):
        return register(Haproxy(config, **kw)).start(ports)

    yield from _server_factory(request, start, {'haproxy log': 'log_text'})


@pytest.fixture
def gmailproxy(request, tmp_path):
    """``gmailproxy(conf_text, ports=[...], args=[...])`` -> started GmailProxy in
    tmp_path (error_log at info level is added; ``log_text()`` reads it)."""
    count = itertools.count()

    def start(register, conf_text, ports=(), **kw):
        folder = tmp_path / ('proxy%d' % next(count))
        return register(GmailProxy(conf_text, folder, **kw)).start(ports)

    yield from _server_factory(
        request, start,
        {'gmailproxy stderr': 'stderr_text', 'gmailproxy error log': 'log_text'},
        stop=GmailProxy.stop, remove=False)


@pytest.fixture
def proxy_to(gmailproxy, auth):
    """``proxy_to(conf, proto, backend_port, **values)`` -> a started GmailProxy on a free
    ``.port``, auth sending ``proto`` logins to ``backend_port``; ``conf`` is filled with
    ``%(auth)s``, ``%(port)d`` and ``values``. The users alice/secret and bob/hunter2 are
    set at once, so a test can change them before it starts the proxy."""
    auth.users = {user: {'password': password} for user, password in USERS.items()}

    def start(conf, proto, backend_port, **values):
        auth.ports = {proto: backend_port}
        port = free_port()
        proxy = gmailproxy(conf % dict(values, auth=auth.url, port=port), ports=[port])
        proxy.port = port
        return proxy
    return start


@pytest.fixture(scope='session')
def cert(tmp_path_factory):
    """A self-signed certificate for ``localhost``: (cert_path, key_path)."""
    return make_cert(tmp_path_factory.mktemp('cert'), cn='localhost')
