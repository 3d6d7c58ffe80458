"""Shared test helpers: raw clients, real backends, a recording auth server, the proxy.

Nothing here imports gmailproxy, and nothing here monkey-patches: the helpers work in
plain pytest processes and in gevent-patched ones (tests/dialogue/).
"""


def failed(request) -> bool:
    """In a fixture's teardown: did the test fail (or never get to run)?

    Relies on the ``pytest_runtest_makereport`` hook in tests/conftest.py.
    """
    rep = getattr(request.node, 'rep_call', None)
    return rep is None or rep.failed


def dump_on_failure(request, title: str, text: str, tail: int = 4000) -> None:
    """In teardown: print the tail of a server log if the test failed."""
    if failed(request):
        print('--- %s (last %d chars):\n%s' % (title, tail, text[-tail:]))
