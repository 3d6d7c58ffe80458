"""One exception hierarchy for the whole proxy.

Each session-level error names the reply key it maps to (looked up in the protocol's
``REPLIES``; ``None`` means close without a reply) and the level it is logged at.
"""
import logging


class ConfigError(Exception):
    """A configuration error; ``str()`` reads like nginx: ``msg in file:line``."""

    def __init__(self, msg: str, file: str | None = None, line: int | None = None,
                 level: str = 'emerg'):
        super().__init__(msg)
        self.msg, self.file, self.line, self.level = msg, file, line, level

    def __str__(self) -> str:
        if self.file is None:
            return self.msg
        return '%s in %s:%s' % (self.msg, self.file, self.line)


class ProxyError(Exception):
    """Base of everything that ends (or interrupts) a session."""
    reply: str | None = 'internal'
    level = logging.ERROR

    def __init__(self, message: str = '', reply: str | None = None, level: int | None = None):
        super().__init__(message)
        self.message = message
        if reply is not None:
            self.reply = reply
        if level is not None:
            self.level = level


class ClientClosed(ProxyError):
    """The client went away; nginx does not log this in the pre-auth phase."""
    reply = None
    level = logging.DEBUG


class ClientTimeout(ProxyError):
    reply = None
    level = logging.INFO

    def __init__(self, message: str = 'client timed out (110: Connection timed out)', **kw):
        super().__init__(message, **kw)


class ClientError(ProxyError):
    """A socket error on the client connection (logged at info, as nginx does)."""
    reply = None
    level = logging.INFO


class BadCommand(ProxyError):
    """An invalid command: counts toward ``max_errors``; the dialogue continues."""
    reply = 'invalid'
    level = logging.INFO

    def __init__(self, message: str = '', close: bool = False):
        super().__init__(message)
        self.close = close     # reply, then end the session (e.g. an unusable {n+} literal)


class TooLong(ProxyError):
    """A command longer than the client buffer: invalid reply, then close."""
    reply = 'invalid'
    level = logging.INFO


class TooManyErrors(ProxyError):
    reply = None
    level = logging.INFO


class AuthFailed(ProxyError):
    """The auth service rejected the login (``Auth-Status`` text in ``message``)."""
    reply = 'auth_failed'
    level = logging.INFO

    def __init__(self, message: str, wait: float = 0.0, error_code: bytes | None = None):
        super().__init__(message)
        self.wait = wait
        self.error_code = error_code


class AuthServiceError(ProxyError):
    """The auth service failed: unreachable, timed out, or sent a bad answer."""


class UpstreamError(ProxyError):
    """The backend refused, failed or answered the login dialogue badly."""


class UpstreamTimeout(UpstreamError):
    level = logging.INFO

    def __init__(self, message: str = 'upstream timed out (110: Connection timed out)', **kw):
        super().__init__(message, **kw)


class UpstreamRejected(UpstreamError):
    """The backend rejected our login; with ``proxy_pass_error_message`` its text is relayed."""

    def __init__(self, message: str, response: bytes, **kw):
        super().__init__(message, **kw)
        self.response = response


class TLSError(ProxyError):
    reply = None
    level = logging.INFO


class SessionDone(ProxyError):
    """Normal end after LOGOUT/QUIT, or a reply that closes the session."""
    reply = None
    level = logging.DEBUG
