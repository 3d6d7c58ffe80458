"""Fixtures for end-to-end tests: real Dovecot/Postfix/nginx, gmailproxy as a process.

Every server is stopped (and its folder removed) at teardown, also when the test fails;
the tail of its log is printed then, so a failing test shows what the server said.
"""
import pytest

from tests.support import dump_on_failure
from tests.support.backends import Dovecot, Haproxy, Nginx, Postfix, make_cert
from tests.support.proxyproc import GmailProxy

USERS = {'alice': 'secret', 'bob': 'hunter2'}
MAILBOXES = ('alice@test.example', 'bob@test.example')


@pytest.fixture
def make_dovecot(request):
    """``make_dovecot(users=..., ssl_cert=..., haproxy=True)`` -> started Dovecot."""
    started = []

    def make(**kw):
        kw.setdefault('users', USERS)
        d = Dovecot(**kw)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop(remove=False)
        dump_on_failure(request, 'dovecot log', d.log_text())
        d.remove()


@pytest.fixture
def dovecot(make_dovecot):
    """Dovecot with users alice/secret and bob/hunter2 (imap_port, pop3_port)."""
    return make_dovecot()


@pytest.fixture
def make_postfix(request):
    """``make_postfix(mailboxes=..., extra_main_cf=..., ...)`` -> started Postfix."""
    started = []

    def make(**kw):
        kw.setdefault('mailboxes', MAILBOXES)
        p = Postfix(**kw)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        p.stop(remove=False)
        dump_on_failure(request, 'postfix log', p.log_text())
        p.remove()


@pytest.fixture
def postfix(make_postfix):
    """Postfix on ``port`` with mailboxes alice@ and bob@test.example, XCLIENT from
    127.0.0.1."""
    return make_postfix()


@pytest.fixture
def nginx(request):
    """``nginx(mail_conf_text, ports)`` -> started Debian nginx with the mail module."""
    started = []

    def make(mail_conf, ports=(), **kw):
        n = Nginx(mail_conf, **kw)
        started.append(n)
        return n.start(ports)

    yield make
    for n in started:
        n.stop(remove=False)
        dump_on_failure(request, 'nginx error.log', n.error_log_text())
        n.remove()


@pytest.fixture
def haproxy(request):
    """``haproxy(config_text, ports)`` -> started haproxy (TCP mode)."""
    started = []

    def make(config, ports=(), **kw):
        h = Haproxy(config, **kw)
        started.append(h)
        return h.start(ports)

    yield make
    for h in started:
        h.stop(remove=False)
        dump_on_failure(request, 'haproxy log', h.log_text())
        h.remove()


@pytest.fixture
def gmailproxy(request, tmp_path):
    """``gmailproxy(conf_text, ports=[...], args=[...])`` -> started GmailProxy in
    tmp_path (error_log at info level is added; ``log_text()`` reads it)."""
    started = []

    def make(conf_text, ports=(), **kw):
        g = GmailProxy(conf_text, tmp_path / ('proxy%d' % len(started)), **kw)
        started.append(g)
        return g.start(ports)

    yield make
    for g in started:
        g.stop()
        dump_on_failure(request, 'gmailproxy stderr', g.stderr_text())
        dump_on_failure(request, 'gmailproxy error log', g.log_text())


@pytest.fixture(scope='session')
def cert(tmp_path_factory):
    """A self-signed certificate for ``localhost``: (cert_path, key_path)."""
    return make_cert(tmp_path_factory.mktemp('cert'), cn='localhost')
