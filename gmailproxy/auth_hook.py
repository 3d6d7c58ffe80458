"""A Python function deciding logins in the proxy itself (``auth_hook``).

Beyond nginx. ``auth_hook package.module:function;`` (or
``auth_hook file.py:function;``, relative to the configuration folder; mail or server
level) names a callable that does the auth_http service's work in-process::

    def authenticate(request: dict) -> dict | list:
        # request: the auth_http request headers by name, values as str:
        #   {'Auth-Method': 'plain', 'Auth-User': 'alice', 'Auth-Pass': 'secret',
        #    'Auth-Protocol': 'imap', 'Auth-Login-Attempt': '1',
        #    'Client-IP': '127.0.0.1', ...} (also Auth-Salt, Client-Host, Auth-SSL-*,
        #    Auth-SMTP-*, Proxy-Protocol-* and auth_http_header lines when nginx would
        #    send them; Auth-User and Auth-Pass unescaped)
        return {'Auth-Status': 'OK', 'Auth-Server': '127.0.0.1', 'Auth-Port': 143}

The answer holds the auth_http response headers (a dict, or a list of (name, value)
pairs; values str, bytes or int) and is read by ``auth_http.interpret``:
``Auth-Status``, ``Auth-Server``, ``Auth-Port``, ``Auth-Wait``, ``Auth-User``,
``Auth-Pass``, ``Auth-Error-Code`` mean exactly what they mean from an auth service, and
so do the errors (messages read ``auth http server auth_hook MODULE:FUNCTION ...``).

The function is imported when the configuration is loaded (an import error is a
configuration error at the directive's file:line; a file hook is executed again on each
reload, a package module is imported once per process). It runs in the session's
greenlet, so it may do gevent-friendly I/O (sockets, HTTP with monkey-patched
libraries), under ``auth_http_timeout``; CPU-heavy work belongs in
``gevent.get_hub().threadpool``. An exception in it is logged at ``error`` with its
traceback (the password replaced by ``...``) and answered as an auth service failure:
the protocol's internal-error reply.
"""
import importlib
import importlib.util
import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote_to_bytes

import gevent

from . import auth_http, errors, log
from .config.directives import D, MAIL_SERVER

_log = logging.getLogger(__name__)

_HEADER_NAME = re.compile(rb'[A-Za-z0-9][A-Za-z0-9-]*\Z')
_BAD_VALUE = re.compile(rb'[\x00\r\n]')
HIDDEN = '...'


@dataclass(frozen=True, slots=True)
class Hook:
    text: str                   # as written: "package.module:function"
    func: Callable
    addr_text: str              # how auth_http.interpret's messages name the "server"


def load(args, ctx) -> Hook | None:
    """``auth_hook MODULE:FUNCTION | FILE.py:FUNCTION | off``: imported now."""
    text = args[0]
    if text == 'off':
        return None
    target, sep, name = text.rpartition(':')
    if not sep or not target or not name.isidentifier():
        raise ValueError('invalid value "%s" in "auth_hook" directive, it must be '
                         '"package.module:function"' % text)
    try:
        if target.endswith('.py') or '/' in target:
            module = _load_file(ctx.path(target))
        else:
            module = importlib.import_module(target)
    except Exception as e:       # noqa: BLE001 - any import failure is a config error
        raise ValueError('auth_hook "%s" cannot be imported (%s: %s)'
                         % (text, type(e).__name__, e)) from None
    func = getattr(module, name, None)
    if not callable(func):
        raise ValueError('auth_hook "%s": "%s" has no function "%s"'
                         % (text, target, name))
    return Hook(text, func, 'auth_hook ' + text)


def _load_file(path: str):
    """Execute a hook file afresh (a reload picks up its changes)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = '_gmailproxy_auth_hook_' + re.sub(r'\W', '_', stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError('not a Python file: "%s"' % path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # for dataclasses, pickle, ... inside the hook
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


DIRECTIVES = [
    D('auth_hook', MAIL_SERVER, '1', load),
]


class _Url:
    """What ``auth_http.build_request`` needs to know about a URL."""
    uri = b'/'
    host_header = b'localhost'


def request(s) -> dict[str, str]:
    """The fields of the auth_http request nginx would send, by header name."""
    raw = auth_http.build_request(s, _Url)
    fields = {}
    for line in raw.split(b'\r\n')[2:]:         # after the request line and Host
        if line:
            name, _, value = line.partition(b': ')
            fields[name.decode('latin-1')] = value
    fields['Auth-User'] = s.login or b''
    fields['Auth-Pass'] = s.passwd or b''
    if 'Auth-SSL-Cert' in fields:
        fields['Auth-SSL-Cert'] = unquote_to_bytes(fields['Auth-SSL-Cert'])
    return {name: value.decode('utf-8', 'surrogateescape')
            for name, value in fields.items()}


def authenticate(s) -> auth_http.AuthResult:
    """Ask the hook (again after a WAIT answer), as ``auth_http.authenticate`` asks."""
    hook = s.conf.auth_hook
    while True:
        headers = call(s, hook)
        result = auth_http.interpret(s, hook, headers)
        if result is not None:
            return result


def call(s, hook: Hook) -> list[tuple[bytes, bytes]]:
    timed_out = errors.AuthServiceError('auth hook %s timed out' % hook.text)
    fields = request(s)
    try:
        with gevent.Timeout(s.conf.auth_http_timeout, timed_out):
            answer = hook.func(fields)
    except errors.AuthServiceError as exc:
        if exc is timed_out:
            raise
        _failed(s, hook, exc)
    except Exception as exc:      # noqa: BLE001 - a bug in the hook: internal error
        _failed(s, hook, exc)
    return headers(hook, answer)


def _failed(s, hook: Hook, exc: Exception):
    """Log the traceback without the password; the session then sends ``internal``."""
    text = ''.join(traceback.format_exception(exc))
    summary = traceback.format_exception_only(exc)[-1].strip()
    secret = s.passwd
    log.session_line(s, log.ERROR, 'auth hook %s failed: %s'
                     % (hook.text, scrub(summary, secret)),
                     tail='\n' + scrub(text, secret).rstrip('\n'))
    raise errors.AuthServiceError() from None     # no message: logged here already


def scrub(text: str, secret: bytes | None) -> str:
    """``text`` with every spelling of ``secret`` a traceback may show replaced."""
    if not secret:
        return text
    forms = {secret.decode('utf-8', 'surrogateescape'), secret.decode('latin-1'),
             repr(secret)[2:-1], auth_http.escape(secret).decode('latin-1')}
    forms.add(repr(secret.decode('utf-8', 'surrogateescape'))[1:-1])
    for form in sorted(forms, key=len, reverse=True):
        if form:
            text = text.replace(form, HIDDEN)
    return text


def headers(hook: Hook, answer) -> list[tuple[bytes, bytes]]:
    """The answer as auth_http response headers; AuthServiceError if unusable."""
    def invalid(why: str):
        return errors.AuthServiceError('auth hook %s returned an invalid answer (%s)'
                                       % (hook.text, why))
    if isinstance(answer, Mapping):
        items = list(answer.items())
    elif isinstance(answer, (list, tuple)):
        items = list(answer)
    else:
        raise invalid('%s, not a dict or a list of pairs' % type(answer).__name__)
    result = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise invalid('an item is not a (name, value) pair')
        name, value = _bytes(item[0]), _bytes(item[1])
        if name is None or not _HEADER_NAME.match(name):
            raise invalid('a header name is not a word')
        if value is None or _BAD_VALUE.search(value):
            raise invalid('the value of "%s" is not one line of text'
                          % name.decode('ascii'))
        result.append((name, value))
    return result


def _bytes(value) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode('utf-8', 'surrogateescape')
    if isinstance(value, int) and not isinstance(value, bool):
        return b'%d' % value
    return None
