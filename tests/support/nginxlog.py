"""Patterns (regexes) of nginx error-log lines that the tests look for, one per message,
so that every protocol's test checks the same whole line."""
import re


def _client(port: int | None) -> str:
    return r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:%s' % (port or r'\d+')


def login_failed(login: str = 'alice', reason: str = 'Invalid login or password',
                 port: int | None = None) -> str:
    """The [info] line of a login that the auth service refused."""
    return (r'(?m)\[info\] \d+#\d+: \*\d+ client login failed: "%s" while in http auth '
            r'state, %s, login: "%s"$' % (re.escape(reason), _client(port), re.escape(login)))


def too_many_invalid_commands() -> str:
    """The [info] line of a session closed after max_errors invalid commands."""
    return (r'(?m)\[info\] \d+#\d+: \*\d+ client sent too many invalid commands while in '
            r'auth state, %s$' % _client(None))


def logged_in(login: str, upstream_port: int, port: int | None = None) -> str:
    """The [info] line of a login passed on to the backend at ``upstream_port``."""
    return (r'(?m)\[info\] \d+#\d+: \*\d+ client logged in, %s, login: "%s", '
            r'upstream: 127\.0\.0\.1:%d$' % (_client(port), re.escape(login), upstream_port))
