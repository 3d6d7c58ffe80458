"""How a server checks logins: the session calls ``authenticate(s)`` here.

nginx always asks the ``auth_http`` service. Beyond nginx a server may instead use the
built-in user file (``auth_users``, ``auth_users.py``) or a Python function
(``auth_hook``, ``auth_hook.py``). Each returns an ``auth_http.AuthResult`` or raises
``AuthFailed`` / ``AuthServiceError`` exactly as ``auth_http`` does (both build an
auth_http answer and pass it through ``auth_http.interpret``), so the session cannot
tell them apart.

Per server, the one in force is ``auth_hook`` if set, else ``auth_users``, else
``auth_http`` (each inherited from ``mail {}`` like any directive; ``auth_hook off;`` or
``auth_users off;`` in a server stops an inherited one).
"""
from . import auth_hook, auth_http, auth_users

METHODS = {'hook': auth_hook.authenticate, 'users': auth_users.authenticate,
           'http': auth_http.authenticate}


def method(conf) -> str | None:
    """'hook', 'users', 'http', or None when the server has no way to check logins."""
    if getattr(conf, 'auth_hook', None) is not None:
        return 'hook'
    if getattr(conf, 'auth_users', None) is not None:
        return 'users'
    if getattr(conf, 'auth_http', None) is not None:
        return 'http'
    return None


def authenticate(s) -> auth_http.AuthResult:
    """The backend for the credentials in ``s``, or AuthFailed / AuthServiceError."""
    return METHODS[method(s.conf)](s)
