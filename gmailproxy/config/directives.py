"""Directives are data: one ``Directive`` row per name, declared in the module that uses it.

The core rows (main, events, mail core) live here; each protocol and feature module
(``protocols/imap.py``, ``auth_http.py``, ``upstream.py``, ``ssl.py``, ...) exports its own
``DIRECTIVES`` list, and ``registry()`` gathers them all, explicitly, in nginx's merge order.
"""
import enum
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from . import values


class Ctx(enum.Flag):
    MAIN = enum.auto()
    EVENTS = enum.auto()
    MAIL = enum.auto()
    SERVER = enum.auto()


MAIN, EVENTS, MAIL, SERVER = Ctx.MAIN, Ctx.EVENTS, Ctx.MAIL, Ctx.SERVER
MAIL_SERVER = MAIL | SERVER
ANY = MAIN | EVENTS | MAIL | SERVER


@dataclass(frozen=True, slots=True)
class Directive:
    """One configuration directive.

    ``nargs``: '0', '1', '2', '12' (one or two), '1+', '2+', or 'block' (no arguments;
    ``events``/``mail``/``server`` open a context, ``http``/``stream`` are skipped).
    ``parse(args, ctx)`` returns the value or raises ``ValueError(full message)``; the
    parser appends `` in file:line``. ``ctx`` is described in ``values``.
    ``multi``: None (a second occurrence at one level is "is duplicate"), 'last' (last one
    wins), 'append' (each occurrence's value is one tuple item), 'extend' (each
    occurrence returns a sequence; they are concatenated: capability words, methods).
    List-like values are tuples; a server's list replaces the inherited one.
    ``merge``: 'inherit' (server, else mail, else default) or 'none' (server level only).
    ``default`` may be a zero-argument callable, evaluated at merge time.
    """
    name: str
    contexts: Ctx
    nargs: str
    parse: Callable[[list[str], Any], Any] | None = None
    default: Any = None
    multi: str | None = None
    merge: str = 'inherit'


D = Directive

# Main and events context: process-level settings (ops, issue 4).
MAIN_DIRECTIVES = [
    D('include', ANY, '1'),
    D('worker_processes', MAIN, '1', values.worker_processes, default=1),
    # nginx's default is logs/error.log in the prefix; we run in the foreground.
    D('error_log', MAIN | MAIL_SERVER, '1+', values.error_log, multi='append',
      default=(values.ErrorLog('stderr', 'error'),)),
    D('pid', MAIN, '1', values.prefix_path, default=None),
    D('daemon', MAIN, '1', values.flag, default=False),
    D('master_process', MAIN, '1', values.flag, default=True),
    D('user', MAIN, '12', values.user, default=None),
    D('worker_rlimit_nofile', MAIN, '1', values.number, default=None),
    D('worker_shutdown_timeout', MAIN, '1', values.time_ms, default=None),
    D('load_module', MAIN, '1', values.ignored, multi='append'),
    D('pcre_jit', MAIN, '1', values.ignored),
    D('thread_pool', MAIN, '2+', values.ignored, multi='append'),
    D('working_directory', MAIN, '1', values.ignored),
    D('env', MAIN, '1', values.ignored, multi='append'),
    D('timer_resolution', MAIN, '1', values.ignored),
    D('lock_file', MAIN, '1', values.ignored),
    D('worker_priority', MAIN, '1', values.ignored),
    D('worker_cpu_affinity', MAIN, '1+', values.ignored),
    D('worker_rlimit_core', MAIN, '1', values.ignored),
    D('debug_points', MAIN, '1', values.ignored),
    D('events', MAIN, 'block'),
    D('mail', MAIN, 'block'),
    D('http', MAIN, 'block'),
    D('stream', MAIN, 'block'),
    D('worker_connections', EVENTS, '1', values.worker_connections, default=512),
    D('use', EVENTS, '1', values.ignored),
    D('multi_accept', EVENTS, '1', values.ignored),
    D('accept_mutex', EVENTS, '1', values.ignored),
    D('accept_mutex_delay', EVENTS, '1', values.ignored),
    D('debug_connection', EVENTS, '1', values.ignored, multi='append'),
]

# ngx_mail_core_module.
CORE_DIRECTIVES = [
    D('server', MAIL, 'block'),
    D('listen', SERVER, '1+', values.listen, multi='extend', merge='none', default=()),
    D('protocol', SERVER, '1', values.protocol, multi='last', merge='none'),
    D('timeout', MAIL_SERVER, '1', values.time_ms, default=60.0),
    D('server_name', MAIL_SERVER, '1', values.server_name, default=values.hostname),
    D('resolver', MAIL_SERVER, '1+', values.resolver, default=None),
    D('resolver_timeout', MAIL_SERVER, '1', values.time_ms, default=30.0),
    D('max_errors', MAIL_SERVER, '1', values.number, default=5),
]

# Modules that export DIRECTIVES, in nginx's merge order (config.md section 3).
FEATURE_MODULES = (
    'gmailproxy.ssl',
    'gmailproxy.protocols.pop3',
    'gmailproxy.protocols.imap',
    'gmailproxy.protocols.smtp',
    'gmailproxy.auth_http',
    'gmailproxy.auth_users',
    'gmailproxy.auth_hook',
    'gmailproxy.upstream',
    'gmailproxy.backend_tls',
    'gmailproxy.failover',
    'gmailproxy.realip',
    'gmailproxy.limits',
    'gmailproxy.metrics',
    'gmailproxy.accesslog',
    'gmailproxy.oauth',
)


def feature_modules() -> list:
    return [importlib.import_module(name) for name in FEATURE_MODULES]


def registry() -> dict[str, Directive]:
    """Every directive by name: core rows first, then each module's rows."""
    table = {}
    rows = MAIN_DIRECTIVES + CORE_DIRECTIVES
    for module in feature_modules():
        rows = rows + list(module.DIRECTIVES)
    for row in rows:
        assert row.name not in table, 'directive %s declared twice' % row.name
        table[row.name] = row
    return table
