#!/usr/bin/env python3
"""A sample auth_http service for gmailproxy (and nginx's mail proxy).

    python3 tools/auth_service.py --listen 127.0.0.1:9000 --users tools/users.example

and in mail.conf: ``auth_http http://127.0.0.1:9000/auth;``

The users file has one user per line (``#`` starts a comment)::

    LOGIN PASSWORD BACKEND [BACKEND_LOGIN [BACKEND_PASSWORD]]

BACKEND is ``host:port`` for every protocol, or
``imap=host:port,pop3=host:port,smtp=...`` per protocol, or ``-`` for the defaults given
with ``--imap``/``--pop3``/``--smtp``. Passwords are plaintext (no spaces); they also
verify CRAM-MD5 and APOP, for which the plaintext is returned in ``Auth-Pass`` as nginx
requires. BACKEND_LOGIN/BACKEND_PASSWORD, if given, replace the client's credentials for
the backend login (``Auth-User``/``Auth-Pass``). Host names are resolved here (nginx
wants an IP address in ``Auth-Server``).

A failed login gets ``Auth-Status: Invalid login or password`` and, with ``--wait N``,
``Auth-Wait: N`` while ``Auth-Login-Attempt`` is below ``--wait-attempts`` (the client
may try again after N seconds; after that the connection is closed). SMTP without
authentication (``smtp_auth none``, ``Auth-Method: none``) is accepted only with
``--relay``.

The file is read again when it changes. One log line per request, without the password.
"""
if __name__ == '__main__':
    from gevent import monkey
    monkey.patch_all()

import argparse
import hashlib
import hmac
import logging
import os
import socket
import sys
from urllib.parse import unquote

from gevent import pywsgi

log = logging.getLogger('auth_service')

PROTOCOLS = ('imap', 'pop3', 'smtp')
INVALID = 'Invalid login or password'
TEMPORARY = 'Temporary server problem, try again later'


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(':')
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('invalid backend "%s" (want host:port)' % text)
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    return host, int(port)


def parse_backends(text: str) -> dict[str, tuple[str, int]]:
    """``host:port`` | ``imap=h:p,pop3=h:p,...`` | ``-`` -> {protocol: (host, port)}."""
    if text == '-':
        return {}
    if '=' not in text:
        hp = parse_hostport(text)
        return {proto: hp for proto in PROTOCOLS}
    backends = {}
    for part in text.split(','):
        proto, _, hp = part.partition('=')
        if proto not in PROTOCOLS:
            raise ValueError('unknown protocol "%s" in "%s"' % (proto, text))
        backends[proto] = parse_hostport(hp)
    return backends


class User:
    __slots__ = ('login', 'password', 'backends', 'backend_login', 'backend_password')

    def __init__(self, login, password, backends, backend_login=None,
                 backend_password=None):
        self.login, self.password, self.backends = login, password, backends
        self.backend_login, self.backend_password = backend_login, backend_password

    def __repr__(self) -> str:
        return 'User(%r, password=..., backends=%r)' % (self.login, self.backends)


def parse_users(text: str, filename: str = 'users') -> dict[str, User]:
    users = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split('#', 1)[0].split()
        if not fields:
            continue
        if not 3 <= len(fields) <= 5:
            raise ValueError('%s:%d: want LOGIN PASSWORD BACKEND [LOGIN [PASSWORD]]'
                             % (filename, lineno))
        try:
            backends = parse_backends(fields[2])
        except ValueError as e:
            raise ValueError('%s:%d: %s' % (filename, lineno, e)) from None
        users[fields[0]] = User(fields[0], fields[1], backends, *fields[3:])
    return users


class UsersFile:
    """The users table, read again whenever the file's mtime, size or inode changes."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = None
        self.users: dict[str, User] = {}
        self.get('')  # first load; raises if the file is unreadable or malformed

    def get(self, login: str) -> User | None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self.stamp:
            try:
                with open(self.path, encoding='utf-8') as f:
                    users = parse_users(f.read(), self.path)
            except (OSError, ValueError) as e:
                if self.stamp is None:
                    raise
                log.error('keeping the previous users: %s', e)
            else:
                if self.stamp is not None:
                    log.info('reloaded %s: %d user(s)', self.path, len(users))
                self.users = users
            self.stamp = stamp
        return self.users.get(login)


def verify(method: str, given: str, password: str, salt: str) -> bool:
    """Check the client's credential for nginx's Auth-Method against the plaintext."""
    if method == 'cram-md5':
        expected = hmac.new(password.encode(), salt.encode(), hashlib.md5).hexdigest()
        return hmac.compare_digest(given.lower(), expected)
    if method == 'apop':
        expected = hashlib.md5(salt.encode() + password.encode()).hexdigest()
        return hmac.compare_digest(given.lower(), expected)
    if method == 'plain':
        return hmac.compare_digest(given.encode('utf-8', 'surrogateescape'),
                                   password.encode())
    return False    # external: needs a certificate check this sample does not do


def resolve(host: str) -> str:
    """An IP address for ``host`` (Auth-Server must be an address, not a name)."""
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]


class AuthService:
    """The WSGI application answering nginx's auth_http requests."""

    def __init__(self, users: UsersFile, defaults: dict[str, tuple[str, int]],
                 wait: int = 0, wait_attempts: int = 10,
                 relay: tuple[str, int] | None = None):
        self.users, self.defaults = users, defaults
        self.wait, self.wait_attempts, self.relay = wait, wait_attempts, relay

    def __call__(self, environ, start_response):
        headers = self.decide(environ)
        start_response('200 OK', headers)
        return [b'']

    def decide(self, environ) -> list[tuple[str, str]]:
        def header(name):
            return environ.get('HTTP_' + name.upper().replace('-', '_'), '')

        method = header('Auth-Method').lower()
        protocol = header('Auth-Protocol').lower()
        login = unquote(header('Auth-User'), errors='surrogateescape')
        attempt = header('Auth-Login-Attempt')
        where = '%s %s login="%s" client=%s attempt=%s' % (
            protocol or '-', method or '-', login.encode('unicode_escape').decode(),
            header('Client-IP') or '-', attempt or '-')

        if method == 'none':
            if self.relay is None:
                log.info('%s: relay denied', where)
                return [('Auth-Status', 'Relaying denied'),
                        ('Auth-Error-Code', '550 5.7.1')]
            return self.ok(where, self.relay, None, None)

        user = self.users.get(login)
        given = unquote(header('Auth-Pass'), errors='surrogateescape')
        salt = header('Auth-Salt')
        if user is None or not verify(method, given, user.password, salt):
            log.info('%s: %s', where,
                     'unknown user' if user is None else 'bad password')
            reply = [('Auth-Status', INVALID)]
            tries = int(attempt) if attempt.isdigit() else 0
            if self.wait and tries < self.wait_attempts:
                reply.append(('Auth-Wait', str(self.wait)))
            return reply

        backend = user.backends.get(protocol) or self.defaults.get(protocol)
        if backend is None:
            log.error('%s: no %s backend for this user', where, protocol or '?')
            return [('Auth-Status', TEMPORARY), ('Auth-Error-Code', '451 4.3.0')]
        # nginx forgets a CRAM-MD5/APOP digest: the backend needs the plaintext
        password = user.backend_password
        if password is None and method in ('cram-md5', 'apop'):
            password = user.password
        return self.ok(where, backend, user.backend_login, password)

    def ok(self, where, backend, login, password) -> list[tuple[str, str]]:
        host, port = backend
        try:
            address = resolve(host)
        except OSError as e:
            log.error('%s: cannot resolve backend %s: %s', where, host, e)
            return [('Auth-Status', TEMPORARY), ('Auth-Error-Code', '451 4.3.0')]
        log.info('%s: OK %s:%d', where, address, port)
        reply = [('Auth-Status', 'OK'), ('Auth-Server', address),
                 ('Auth-Port', str(port))]
        if login is not None:
            reply.append(('Auth-User', login))
        if password is not None:
            reply.append(('Auth-Pass', password))
        return reply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='Sample auth_http service for gmailproxy.')
    p.add_argument('--listen', default='127.0.0.1:9000', type=parse_hostport,
                   help='address to listen on (default 127.0.0.1:9000)')
    p.add_argument('--users', required=True, help='users file')
    for proto in PROTOCOLS:
        p.add_argument('--' + proto, type=parse_hostport, metavar='HOST:PORT',
                       help='default %s backend for users whose line says -' % proto)
    p.add_argument('--relay', type=parse_hostport, metavar='HOST:PORT',
                   help='accept SMTP without authentication (Auth-Method none) '
                        'and send it to this backend')
    p.add_argument('--wait', type=int, default=0, metavar='N',
                   help='send Auth-Wait: N after a failed login (default: close)')
    p.add_argument('--wait-attempts', type=int, default=10, metavar='N',
                   help='send Auth-Wait only while Auth-Login-Attempt < N (default 10)')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(message)s')
    try:
        users = UsersFile(args.users)
    except (OSError, ValueError) as e:
        log.error('%s', e)
        return 1
    defaults = {proto: getattr(args, proto) for proto in PROTOCOLS
                if getattr(args, proto)}
    app = AuthService(users, defaults, args.wait, args.wait_attempts, args.relay)
    server = pywsgi.WSGIServer(args.listen, app, log=None)
    log.info('listening on %s:%d, %d user(s) from %s',
             args.listen[0], args.listen[1], len(users.users), args.users)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
