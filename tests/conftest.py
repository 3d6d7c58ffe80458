"""Root test configuration.

gevent's monkey-patching happens here, before anything imports socket/ssl/threading, so
the whole test process is patched the same way whatever order test folders are collected
in (tests/dialogue/ runs the proxy in-process; its own ``patch_all()`` is then a no-op).
The helpers in tests/support/ work patched or not.
"""
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402

import pytest  # noqa: E402

from tests.support import dump_on_failure  # noqa: E402
from tests.support.auth import RecordingAuthServer  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``item.rep_call``) for fixtures that print
    server logs when a test failed (tests.support.failed)."""
    rep = yield
    setattr(item, 'rep_' + rep.when, rep)
    return rep


def _drop_lineless_entries(exc: BaseException | None, seen: set) -> None:
    """Unlink traceback entries whose ``tb_lineno`` is None (CPython 3.11 can leave them,
    e.g. for frames of compiled code) from ``exc`` and its chained exceptions: pytest
    crashes on them with an INTERNALERROR that ends the whole run."""
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None and tb.tb_lineno is None:
            tb = tb.tb_next
        node = tb
        while node is not None:
            nxt = node.tb_next
            while nxt is not None and nxt.tb_lineno is None:
                nxt = nxt.tb_next
            node.tb_next = nxt
            node = nxt
        exc.__traceback__ = tb
        if exc.__cause__ is not None:
            _drop_lineless_entries(exc.__cause__, seen)
        exc = exc.__context__


def _sanitized():
    try:
        return (yield)
    except BaseException as e:
        _drop_lineless_entries(e, set())
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _sanitized())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _sanitized())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _sanitized())


@pytest.fixture(autouse=True)
def _gmailproxy_logger_restored():
    """An in-process proxy points the ``gmailproxy`` logger at its own handlers and stops
    propagation; put it back so later tests (caplog) see its records again."""
    logger = logging.getLogger('gmailproxy')
    saved = logger.propagate, list(logger.handlers), logger.level
    yield
    logger.propagate, logger.handlers[:] = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture
def auth(request):
    """A started RecordingAuthServer with no users; the test sets .users and .ports."""
    server = RecordingAuthServer().start()
    yield server
    server.stop()
    dump_on_failure(request, 'auth requests',
                    '\n'.join(repr(r) for r in server.requests[:50]))
