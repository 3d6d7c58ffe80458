"""The built-in user file (``auth_users``): logins checked without an auth service.

Beyond nginx, which always asks an auth_http service. ``auth_users FILE;`` (mail or
server level) names a file with one user per line (``#`` starts a comment at the start
of a line or after a blank)::

    # LOGIN            PASSWORD       BACKEND   [BACKEND_LOGIN [BACKEND_PASSWORD]]
    alice@example.com  $2b$12$...     127.0.0.1:10143
    bob@example.com    {PLAIN}s3cret  imap=127.0.0.1:10143,pop3=127.0.0.1:10110  bob  pw

PASSWORD is a bcrypt (``$2b$``, ``$2a$``, ``$2y$``), argon2 (``$argon2id$``,
``$argon2i$``, ``$argon2d$``) or SHA-512-crypt (``$6$``) hash, optionally behind
Dovecot's scheme prefix (``{BLF-CRYPT}``, ``{ARGON2ID}``, ``{SHA512-CRYPT}``, ...), or
``{PLAIN}`` and the password itself, for development. BACKEND is ``host:port`` for every
protocol or ``imap=host:port,pop3=host:port,smtp=host:port``; a host name is resolved
when the file is read. BACKEND_LOGIN and BACKEND_PASSWORD (``-`` keeps the client's
login) replace the client's credentials for the backend login, as
``Auth-User``/``Auth-Pass`` would. The file is read with the configuration, so a reload
reads it again; a bad line is a configuration error naming the file and line.

A login is decided as an auth service would answer it, and the answer goes through
``auth_http.interpret``, so replies, logs and the backend login cannot differ:

* right password: ``Auth-Status: OK`` with the user's backend for the protocol (plus
  ``Auth-User``/``Auth-Pass`` overrides; for APOP and CRAM-MD5 the ``{PLAIN}`` password,
  which the backend login needs);
* anything else: ``Invalid login or password`` with ``Auth-Wait: auth_users_wait``
  (default 3s: the reply comes after that delay and the client may try again), until
  the connection's ``auth_users_attempts``-th failure, whose reply comes after the same
  delay and closes the connection;
* APOP and CRAM-MD5 can only be checked against ``{PLAIN}`` passwords: for hashed
  entries they fail (a warning at load time names the servers that offer them), and
  EXTERNAL is always refused (use ``auth_hook`` to map certificates to users);
* SMTP without authentication (``smtp_auth none``): ``Relaying denied`` (550 5.7.1)
  unless ``auth_users_relay host:port`` names the backend for it.

Hashes are checked in gevent's thread pool (bcrypt and argon2 take tens of milliseconds
and release the GIL); an unknown login is checked against another user's hash, so it
takes as long as a wrong password.
"""
import hmac
import logging
import re

import argon2
import bcrypt
import gevent
from passlib.hash import sha512_crypt

from . import auth_http, errors, sasl
from .config import address, values
from .config.directives import D, MAIL_SERVER
from .errors import ConfigError

_log = logging.getLogger(__name__)

INVALID = 'Invalid login or password'
RELAY_DENIED = ('Relaying denied', b'550 5.7.1')
PROTOCOLS = ('imap', 'pop3', 'smtp')
BCRYPT_MAX = 72                 # bcrypt uses the first 72 bytes (bcrypt 5 refuses more)

# Dovecot's scheme names for the same modular-crypt hashes.
DOVECOT_PREFIXES = {b'{BLF-CRYPT}': 'bcrypt', b'{BCRYPT}': 'bcrypt',
                    b'{ARGON2I}': 'argon2', b'{ARGON2ID}': 'argon2',
                    b'{SHA512-CRYPT}': 'sha512-crypt', b'{CRYPT}': None}
_BCRYPT = re.compile(rb'\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z')
_COMMENT = re.compile(rb'(?:^|\s)#.*', re.S)
_argon2 = argon2.PasswordHasher()


class Entry:
    """One user line; ``secret`` is the password for ``{PLAIN}``, else the hash."""
    __slots__ = ('login', 'scheme', 'secret', 'backends', 'backend_login',
                 'backend_passwd', 'line')

    def __init__(self, login, scheme, secret, backends, backend_login, backend_passwd,
                 line):
        self.login, self.scheme, self.secret = login, scheme, secret
        self.backends = backends            # {'imap': (ip, port), ...}
        self.backend_login, self.backend_passwd = backend_login, backend_passwd
        self.line = line

    def __repr__(self) -> str:
        return '<Entry %r %s line %d>' % (self.login, self.scheme, self.line)


class UserTable:
    """A user file as read at configuration load (``conf.auth_users``)."""

    def __init__(self, path: str, users: dict):
        self.path = path
        self.users: dict[bytes, Entry] = users
        hashed = [e for e in users.values() if e.scheme != 'plain']
        self.hashed = len(hashed)
        self.dummy = hashed[0] if hashed else None  # checked for unknown logins
        self.addr_text = 'auth_users "%s"' % path   # auth_http.interpret's messages
        self.warned: set = set()

    def __repr__(self) -> str:
        return '<UserTable %s: %d users>' % (self.path, len(self.users))


# Configuration

def users_file(args, ctx) -> UserTable | None:
    """``auth_users FILE | off``: the file is read and checked now."""
    if args[0] == 'off':
        return None
    path = ctx.path(args[0])
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise ValueError('open() "%s" failed (%d: %s)'
                         % (path, e.errno or 0, e.strerror)) from None
    return UserTable(path, parse(data, path, ctx.cache))


def relay_backend(args, ctx) -> tuple[str, int] | None:
    """``auth_users_relay host:port | off``: the backend for SMTP without AUTH."""
    if args[0] == 'off':
        return None
    return hostport(args[0], ctx.cache)


DIRECTIVES = [
    D('auth_users', MAIL_SERVER, '1', users_file),
    D('auth_users_wait', MAIL_SERVER, '1', values.time_ms, default=3.0),
    D('auth_users_attempts', MAIL_SERVER, '1', values.number, default=10),
    D('auth_users_relay', MAIL_SERVER, '1', relay_backend),
]


def parse(data: bytes, path: str, cache: dict | None = None) -> dict[bytes, Entry]:
    """The users of a file's text; ConfigError naming ``path:line`` for a bad line."""
    users = {}
    for number, raw in enumerate(data.splitlines(), 1):
        fields = _COMMENT.sub(b'', raw).split()
        if not fields:
            continue
        try:
            entry = parse_line(fields, number, cache)
        except ValueError as e:
            raise ConfigError(str(e), path, number) from None
        first = users.get(entry.login)
        if first is not None:
            raise ConfigError('duplicate login "%s" (first on line %d)'
                              % (_shown(entry.login), first.line), path, number)
        users[entry.login] = entry
    return users


def parse_line(fields: list[bytes], number: int, cache: dict | None = None) -> Entry:
    if not 3 <= len(fields) <= 5:
        raise ValueError('invalid user line, expected "LOGIN PASSWORD BACKEND '
                         '[BACKEND_LOGIN [BACKEND_PASSWORD]]"')
    login = fields[0]
    scheme, secret = password_scheme(fields[1], login)
    backends = parse_backends(fields[2].decode('utf-8', 'replace'), cache)
    backend_login = fields[3] if len(fields) > 3 and fields[3] != b'-' else None
    backend_passwd = fields[4] if len(fields) > 4 else None
    return Entry(login, scheme, secret, backends, backend_login, backend_passwd, number)


def password_scheme(text: bytes, login: bytes) -> tuple[str, bytes]:
    """(scheme, secret) of PASSWORD; ValueError (never showing it) if unusable."""
    if text.startswith(b'{PLAIN}'):
        if len(text) == 7:
            raise ValueError('empty {PLAIN} password for "%s"' % _shown(login))
        return 'plain', text[7:]
    named = None
    if text.startswith(b'{'):
        prefix = text[:text.find(b'}') + 1]
        if prefix not in DOVECOT_PREFIXES:
            raise ValueError('unknown password scheme "%s" for "%s"'
                             % (_shown(prefix), _shown(login)))
        named, text = DOVECOT_PREFIXES[prefix], text[len(prefix):]
    scheme = hash_scheme(text)
    if scheme is None or named not in (None, scheme):
        raise ValueError('unknown password scheme for "%s" (bcrypt, argon2, '
                         'SHA-512-crypt or {PLAIN})' % _shown(login))
    if not hash_valid(scheme, text):
        raise ValueError('invalid %s hash for "%s"' % (scheme, _shown(login)))
    return scheme, text


def hash_scheme(text: bytes) -> str | None:
    if text.startswith((b'$2a$', b'$2b$', b'$2y$')):
        return 'bcrypt'
    if text.startswith((b'$argon2id$', b'$argon2i$', b'$argon2d$')):
        return 'argon2'
    if text.startswith(b'$6$'):
        return 'sha512-crypt'
    return None


def hash_valid(scheme: str, text: bytes) -> bool:
    if scheme == 'bcrypt':
        return _BCRYPT.match(text) is not None
    try:
        if scheme == 'argon2':
            argon2.extract_parameters(text.decode('ascii'))
        else:
            sha512_crypt.from_string(text.decode('ascii'))
    except (ValueError, argon2.exceptions.InvalidHashError):
        return False
    return True


def parse_backends(text: str, cache: dict | None = None) -> dict[str, tuple[str, int]]:
    """``host:port`` | ``imap=host:port,pop3=...`` -> {protocol: (ip, port)}."""
    if '=' not in text:
        backend = hostport(text, cache)
        return {proto: backend for proto in PROTOCOLS}
    backends = {}
    for part in text.split(','):
        proto, _, target = part.partition('=')
        if proto not in PROTOCOLS:
            raise ValueError('unknown protocol "%s" in backend "%s"' % (proto, text))
        backends[proto] = hostport(target, cache)
    return backends


def hostport(text: str, cache: dict | None = None) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (ip, port); a name resolves to its first
    address (as nginx does for ``auth_http``)."""
    host, sep, port = text.rpartition(':')
    number = address.atoi(port) if sep else None
    if not host or number is None or not 0 < number < 65536:
        raise ValueError('invalid backend "%s", expected host:port' % text)
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
        if address.inet6_addr(host) is None:
            raise ValueError('invalid backend "%s"' % text)
        return host, number
    if address.inet_addr(host) is not None:
        return host, number
    try:
        return address.resolve(host, cache)[0][1], number
    except address.UrlError as e:
        raise ValueError('%s in backend "%s"' % (e, text)) from None


def finalize(conf) -> None:
    """Load-time warnings for what a server offers but the file cannot check."""
    table = getattr(conf, 'auth_users', None)
    if table is None or getattr(conf, 'auth_hook', None) is not None:
        return
    name = conf.protocol + '_auth'
    offered = getattr(conf, name, ())
    if table.hashed:
        for method in ('cram-md5', 'apop'):
            if method in offered:
                _warn(conf, table, name, '"%s %s" cannot check the %d hashed '
                      'password(s) of %s: those users can log in only with other '
                      'methods' % (name, method, table.hashed, table.path))
    if 'external' in offered:
        _warn(conf, table, name,
              '"%s external" is always refused by "auth_users"' % name)
    if 'none' in offered and conf.auth_users_relay is None:
        _warn(conf, table, name, '"smtp_auth none": mail without authentication is '
              'refused without "auth_users_relay"')


def _warn(conf, table, name, msg) -> None:
    file, line = conf.where(name)
    text = str(ConfigError(msg, file, line))
    if text not in table.warned:        # once per file and position, not per server
        table.warned.add(text)
        logging.getLogger('gmailproxy').warning('%s', text)


# Sessions

def authenticate(s) -> auth_http.AuthResult:
    """Decide the login as an auth service answering from the file would."""
    table = s.conf.auth_users
    if s.auth_method == 'none':
        return relay(s, table)
    entry = table.users.get(s.login or b'')
    if not check(s, table, entry):
        raise failed(s)
    backend = entry.backends.get(s.proto.NAME)
    if backend is None:
        raise errors.AuthServiceError('no %s backend for "%s" in %s:%d'
                                      % (s.proto.NAME, _shown(entry.login), table.path,
                                         entry.line))
    headers = [(b'Auth-Status', b'OK'), (b'Auth-Server', backend[0].encode()),
               (b'Auth-Port', b'%d' % backend[1])]
    if entry.backend_login is not None:
        headers.append((b'Auth-User', entry.backend_login))
    passwd = entry.backend_passwd
    if passwd is None and s.auth_method in ('apop', 'cram-md5'):
        passwd = entry.secret           # {PLAIN}: the backend needs the password itself
    if passwd is not None:
        headers.append((b'Auth-Pass', passwd))
    return auth_http.interpret(s, table, headers)


def check(s, table: UserTable, entry: Entry | None) -> bool:
    """Whether the client's credentials match the entry (constant-time compares)."""
    method = s.auth_method
    given = s.passwd or b''
    if method == 'plain':
        if entry is None:
            if table.dummy is not None:
                verify_in_pool(table.dummy, given)    # as long as a wrong password
            return False
        if entry.scheme == 'plain':
            return hmac.compare_digest(given, entry.secret)
        return verify_in_pool(entry, given)
    if entry is None:
        return False
    if method in ('apop', 'cram-md5'):
        if entry.scheme != 'plain':
            s.info('%s login refused: the user file holds a hashed password'
                   % method.upper())
            return False
        if s.salt is None:
            return False
        digest = sasl.apop_digest if method == 'apop' else sasl.cram_md5_digest
        return hmac.compare_digest(given.lower(), digest(s.salt, entry.secret))
    s.info('%s login refused: the user file cannot check it' % method.upper())
    return False


def failed(s) -> errors.AuthFailed:
    """``Auth-Status: Invalid login or password`` with ``Auth-Wait``; the last allowed
    try waits as long, then its reply closes the connection."""
    conf = s.conf
    wait = conf.auth_users_wait
    if wait and s.login_attempt >= conf.auth_users_attempts:
        gevent.sleep(wait)
        wait = 0
    return errors.AuthFailed(INVALID, wait=wait)


def relay(s, table: UserTable) -> auth_http.AuthResult:
    backend = s.conf.auth_users_relay
    if backend is None:
        raise errors.AuthFailed(RELAY_DENIED[0], error_code=RELAY_DENIED[1])
    headers = [(b'Auth-Status', b'OK'), (b'Auth-Server', backend[0].encode()),
               (b'Auth-Port', b'%d' % backend[1])]
    return auth_http.interpret(s, table, headers)


def verify(entry: Entry, password: bytes) -> bool:
    """Check ``password`` against a hashed entry (blocking: run it in the pool)."""
    try:
        if entry.scheme == 'bcrypt':
            return bcrypt.checkpw(password[:BCRYPT_MAX], entry.secret)
        if entry.scheme == 'argon2':
            return _argon2.verify(entry.secret, password)
        return sha512_crypt.verify(password, entry.secret)
    except (ValueError, argon2.exceptions.VerificationError,
            argon2.exceptions.InvalidHashError):
        return False


def verify_in_pool(entry: Entry, password: bytes) -> bool:
    """``verify`` in gevent's thread pool: the hub keeps serving other sessions."""
    return gevent.get_hub().threadpool.apply(verify, (entry, password))


def _shown(login: bytes) -> str:
    return login.decode('utf-8', 'backslashreplace')
