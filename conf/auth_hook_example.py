"""A sample ``auth_hook`` for gmailproxy: logins decided by a Python function.

In mail.conf (instead of ``auth_http`` or ``auth_users``)::

    auth_hook auth_hook_example.py:authenticate;      # a file, relative to mail.conf
    auth_hook mycompany.mailauth:authenticate;         # or an importable module

``authenticate`` gets the fields of the auth_http request as a dict (header name ->
str; Auth-User and Auth-Pass unescaped) and returns the fields of the answer, exactly
what an auth_http service would send (a dict, or a list of (name, value) pairs). It runs
in the proxy's gevent hub: gevent-friendly I/O (sockets, monkey-patched HTTP clients,
a database driver that yields) is fine; never block for long, and put CPU-heavy work
(password hashing) in ``gevent.get_hub().threadpool``. An exception is logged with its
traceback (without the password) and the client gets the internal-error reply.
"""
import hashlib
import hmac

# login -> (plaintext password, {protocol: (backend ip, port)}); a real hook would ask a
# directory or a database here.
USERS = {
    'alice@example.com': ('secret', {'imap': ('127.0.0.1', 10143),
                                     'pop3': ('127.0.0.1', 10110),
                                     'smtp': ('127.0.0.1', 10025)}),
}
WAIT = 3            # seconds before a failed login's reply (Auth-Wait)
MAX_ATTEMPTS = 10   # after that many failures on a connection, no retry


def authenticate(request: dict) -> dict:
    method = request['Auth-Method']
    protocol = request['Auth-Protocol']
    if method == 'none':                        # SMTP without AUTH: no relaying here
        return {'Auth-Status': 'Relaying denied', 'Auth-Error-Code': '550 5.7.1'}
    user = USERS.get(request['Auth-User'])
    if user is None or not _password_ok(request, user[0]):
        answer = {'Auth-Status': 'Invalid login or password'}
        if int(request['Auth-Login-Attempt']) < MAX_ATTEMPTS:
            answer['Auth-Wait'] = WAIT
        return answer
    host, port = user[1][protocol]
    answer = {'Auth-Status': 'OK', 'Auth-Server': host, 'Auth-Port': port}
    if method in ('apop', 'cram-md5'):
        answer['Auth-Pass'] = user[0]           # the backend needs the password itself
    return answer


def _password_ok(request: dict, password: str) -> bool:
    method, given = request['Auth-Method'], request['Auth-Pass']
    salt = request.get('Auth-Salt', '').encode()
    if method == 'plain':
        expected = password
    elif method == 'apop':
        expected = hashlib.md5(salt + password.encode()).hexdigest()
        given = given.lower()
    elif method == 'cram-md5':
        expected = hmac.new(password.encode(), salt, hashlib.md5).hexdigest()
        given = given.lower()
    else:
        return False                            # external: map certificates here
    return hmac.compare_digest(given.encode('utf-8', 'surrogateescape'),
                               expected.encode())
