"""The user file (auth_users), the hook loader (auth_hook) and tools/gmailproxy-passwd:
hash schemes, bad lines, load-time warnings, decisions, the thread pool."""
import hashlib
import hmac
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import argon2
import bcrypt
import gevent
import pytest
from passlib.hash import sha512_crypt

from gmailproxy import auth, auth_users, errors
from gmailproxy.config.parser import load
from gmailproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PASSWD_TOOL = ROOT / 'tools' / 'gmailproxy-passwd'


def fast_argon2(kind=argon2.Type.ID) -> argon2.PasswordHasher:
    return argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=kind)


def scheme_hashes(password: bytes) -> dict[str, str]:
    """One freshly made hash per scheme (cheap parameters), as the libraries make them."""
    return {
        'bcrypt': bcrypt.hashpw(password, bcrypt.gensalt(4)).decode(),
        'bcrypt-2a': bcrypt.hashpw(password, bcrypt.gensalt(4, prefix=b'2a')).decode(),
        'argon2id': fast_argon2().hash(password),
        'argon2i': fast_argon2(argon2.Type.I).hash(password),
        'argon2d': fast_argon2(argon2.Type.D).hash(password),
        'sha512-crypt': sha512_crypt.using(rounds=1000).hash(password),
        'sha512-crypt-default-rounds': sha512_crypt.using(rounds=5000).hash(password)
        .replace('rounds=5000$', ''),
        'dovecot-blf': '{BLF-CRYPT}' + bcrypt.hashpw(password, bcrypt.gensalt(4)).decode(),
        'dovecot-argon2id': '{ARGON2ID}' + fast_argon2().hash(password),
        'dovecot-sha512': '{SHA512-CRYPT}' + sha512_crypt.using(rounds=1000).hash(password),
        'plain': '{PLAIN}' + password.decode(),
    }


def table(text: str, tmp_path: Path, name: str = 'users') -> auth_users.UserTable:
    path = tmp_path / name
    path.write_text(text)
    return auth_users.UserTable(str(path), auth_users.parse(text.encode(), str(path)))


def entry_for(secret: str) -> auth_users.Entry:
    scheme, value = auth_users.password_scheme(secret.encode(), b'x')
    return auth_users.Entry(b'x', scheme, value, {}, None, None, 1)


# Hash schemes

@pytest.mark.parametrize('kind', list(scheme_hashes(b'x')))
def test_every_scheme_verifies_right_and_refuses_wrong(kind):
    secret = scheme_hashes('pässword'.encode())[kind]
    entry = entry_for(secret)
    check = (lambda p: hmac.compare_digest(p, entry.secret)) if entry.scheme == 'plain' \
        else (lambda p: auth_users.verify(entry, p))
    assert check('pässword'.encode())
    assert not check(b'password')
    assert not check(b'')


@pytest.mark.parametrize('secret, password', [
    # Known answers: OpenBSD's bcrypt test vector, Drepper's SHA-crypt specification.
    ('$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW', b'U*U'),
    ('$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEd'
     'FCoEOfaS35inz1', b'Hello world!'),
    ('$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0D'
     'p8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.', b'Hello world!'),
])
def test_known_answer_hashes(secret, password):
    entry = entry_for(secret)
    assert auth_users.verify(entry, password)
    assert not auth_users.verify(entry, password + b'!')


def test_sha512_crypt_from_the_system_crypt_library():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        crypt = pytest.importorskip('crypt')
        made = crypt.crypt('secret', crypt.mksalt(crypt.METHOD_SHA512))
    assert auth_users.verify(entry_for(made), b'secret')


def test_bcrypt_uses_the_first_72_bytes_like_every_bcrypt():
    long = b'a' * 72
    entry = entry_for(bcrypt.hashpw(long, bcrypt.gensalt(4)).decode())
    assert auth_users.verify(entry, long + b'tail')     # bcrypt 5 alone would refuse


def test_verification_does_not_block_the_hub():
    slow = argon2.PasswordHasher(time_cost=4, memory_cost=32768, parallelism=1)
    entry = entry_for(slow.hash(b'secret'))
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.005)
    g = gevent.spawn(ticker)
    try:
        began = time.monotonic()
        assert auth_users.verify_in_pool(entry, b'secret')
        took = time.monotonic() - began
    finally:
        g.kill()
    assert took > 0.05, 'the hash was too cheap to show anything (%.3fs)' % took
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > took / 0.05 and max(gaps) < took / 2, (took, max(gaps))


# The file: good and bad lines

def test_file_format(tmp_path):
    users = table(
        '# a comment\n'
        '\n'
        'alice@example.com  {PLAIN}se#cret  127.0.0.1:10143   # trailing comment\n'
        '  bob\t{PLAIN}x  imap=127.0.0.1:1,pop3=[::1]:2,smtp=localhost:3  bobby  pw\n'
        'carol {PLAIN}y 10.0.0.1:143 - backend-pw\n', tmp_path).users
    alice, bob, carol = users[b'alice@example.com'], users[b'bob'], users[b'carol']
    assert alice.secret == b'se#cret' and alice.line == 3
    assert alice.backends == {p: ('127.0.0.1', 10143) for p in ('imap', 'pop3', 'smtp')}
    assert alice.backend_login is None and alice.backend_passwd is None
    assert bob.backends == {'imap': ('127.0.0.1', 1), 'pop3': ('::1', 2),
                            'smtp': ('127.0.0.1', 3)}
    assert (bob.backend_login, bob.backend_passwd) == (b'bobby', b'pw')
    assert (carol.backend_login, carol.backend_passwd) == (None, b'backend-pw')


@pytest.mark.parametrize('line, message', [
    ('alice {PLAIN}x', 'invalid user line, expected "LOGIN PASSWORD BACKEND '
                       '[BACKEND_LOGIN [BACKEND_PASSWORD]]"'),
    ('alice {PLAIN}x 127.0.0.1:1 a b c', 'invalid user line, expected "LOGIN PASSWORD '
                                        'BACKEND [BACKEND_LOGIN [BACKEND_PASSWORD]]"'),
    ('alice secret 127.0.0.1:1', 'unknown password scheme for "alice" (bcrypt, argon2, '
                                 'SHA-512-crypt or {PLAIN})'),
    ('alice {MD5}abc 127.0.0.1:1', 'unknown password scheme "{MD5}" for "alice"'),
    ('alice $1$abc$def 127.0.0.1:1', 'unknown password scheme for "alice" (bcrypt, argon2, '
                                     'SHA-512-crypt or {PLAIN})'),
    ('alice {BLF-CRYPT}$6$abc$def 127.0.0.1:1', 'unknown password scheme for "alice" '
                                                '(bcrypt, argon2, SHA-512-crypt or {PLAIN})'),
    ('alice $2b$12$tooshort 127.0.0.1:1', 'invalid bcrypt hash for "alice"'),
    ('alice $argon2id$v=19$m=8,t=1,p=1$bad 127.0.0.1:1', 'invalid argon2 hash for "alice"'),
    ('alice $6$salt$short 127.0.0.1:1', 'invalid sha512-crypt hash for "alice"'),
    ('alice {PLAIN} 127.0.0.1:1', 'empty {PLAIN} password for "alice"'),
    ('alice {PLAIN}x 127.0.0.1', 'invalid backend "127.0.0.1", expected host:port'),
    ('alice {PLAIN}x 127.0.0.1:0', 'invalid backend "127.0.0.1:0", expected host:port'),
    ('alice {PLAIN}x 127.0.0.1:65536', 'invalid backend "127.0.0.1:65536", expected '
                                       'host:port'),
    ('alice {PLAIN}x [zz]:1', 'invalid backend "[zz]:1"'),
    ('alice {PLAIN}x no.such.host.invalid:1', 'host not found in backend '
                                              '"no.such.host.invalid:1"'),
    ('alice {PLAIN}x imap=127.0.0.1:1,ftp=127.0.0.1:2',
     'unknown protocol "ftp" in backend "imap=127.0.0.1:1,ftp=127.0.0.1:2"'),
    ('bob {PLAIN}y 127.0.0.1:1', 'duplicate login "bob" (first on line 2)'),
])
def test_bad_line_is_a_configuration_error_at_file_and_line(tmp_path, line, message):
    path = tmp_path / 'users'
    text = '# users\nbob {PLAIN}x 127.0.0.1:1\n\n' + line + '\n'
    with pytest.raises(ConfigError) as e:
        auth_users.parse(text.encode(), str(path))
    assert str(e.value) == '%s in %s:4' % (message, path)
    assert 'secret' not in str(e.value)


def conf_text(body: str, users: str | None = None) -> str:
    return ('events { }\nmail {\n' + ('    auth_users %s;\n' % users if users else '')
            + body + '}\n')


def test_bad_line_fails_the_whole_configuration(tmp_path):
    (tmp_path / 'users').write_text('alice {PLAIN}x 127.0.0.1:1\nbob {SSHA}x 127.0.0.1:1\n')
    (tmp_path / 'mail.conf').write_text(conf_text(
        '    server { listen 127.0.0.1:1143; protocol imap; }\n', 'users'))
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / 'mail.conf'))
    assert str(e.value) == 'unknown password scheme "{SSHA}" for "bob" in %s:2' % (
        tmp_path / 'users')


def test_missing_file_names_the_directive(tmp_path):
    (tmp_path / 'mail.conf').write_text(conf_text(
        '    server { listen 127.0.0.1:1143; protocol imap; }\n', 'nothere'))
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / 'mail.conf'))
    assert str(e.value) == 'open() "%s" failed (2: No such file or directory) in %s:3' % (
        tmp_path / 'nothere', tmp_path / 'mail.conf')


def test_file_is_read_again_at_each_load(tmp_path):
    users = tmp_path / 'users'
    users.write_text('alice {PLAIN}one 127.0.0.1:1\n')
    (tmp_path / 'mail.conf').write_text(conf_text(
        '    server { listen 127.0.0.1:1143; protocol imap; }\n', 'users'))
    first = load(str(tmp_path / 'mail.conf')).servers[0].auth_users
    users.write_text('alice {PLAIN}two 127.0.0.1:1\nbob {PLAIN}x 127.0.0.1:2\n')
    second = load(str(tmp_path / 'mail.conf')).servers[0].auth_users
    assert first.users[b'alice'].secret == b'one'
    assert second.users[b'alice'].secret == b'two' and b'bob' in second.users


def test_users_file_or_hook_makes_a_server_valid_without_auth_http(tmp_path):
    (tmp_path / 'users').write_text('alice {PLAIN}x 127.0.0.1:1\n')
    (tmp_path / 'mail.conf').write_text(
        'events { }\nmail {\n'
        '    server { listen 127.0.0.1:1143; protocol imap; auth_users users; }\n'
        '    server { listen 127.0.0.1:1144; protocol imap;\n'
        '             auth_hook %s:authenticate; }\n'
        '    server { listen 127.0.0.1:1145; protocol imap;\n'
        '             auth_http 127.0.0.1:9000; }\n'
        '}\n' % (ROOT / 'conf' / 'auth_hook_example.py'))
    confs = load(str(tmp_path / 'mail.conf')).servers
    assert [auth.method(c) for c in confs] == ['users', 'hook', 'http']


def test_precedence_and_off(tmp_path):
    (tmp_path / 'users').write_text('alice {PLAIN}x 127.0.0.1:1\n')
    (tmp_path / 'mail.conf').write_text(
        'events { }\nmail {\n    auth_http 127.0.0.1:9000;\n    auth_users users;\n'
        '    server { listen 127.0.0.1:1143; protocol imap; }\n'
        '    server { listen 127.0.0.1:1144; protocol imap; auth_users off; }\n'
        '    server { listen 127.0.0.1:1145; protocol imap;\n'
        '             auth_hook %s:authenticate; }\n'
        '}\n' % (ROOT / 'conf' / 'auth_hook_example.py'))
    confs = load(str(tmp_path / 'mail.conf')).servers
    assert [auth.method(c) for c in confs] == ['users', 'http', 'hook']


def test_without_any_auth_the_server_is_refused(tmp_path):
    (tmp_path / 'users').write_text('alice {PLAIN}x 127.0.0.1:1\n')
    (tmp_path / 'mail.conf').write_text(
        'events { }\nmail {\n    auth_users users;\n'
        '    server { listen 127.0.0.1:1143; protocol imap; auth_users off; }\n}\n')
    with pytest.raises(ConfigError) as e:
        load(str(tmp_path / 'mail.conf'))
    assert str(e.value) == 'no "auth_http" is defined for server in %s:4' % (
        tmp_path / 'mail.conf')


def warnings_of(tmp_path, users_text, servers, caplog):
    (tmp_path / 'users').write_text(users_text)
    (tmp_path / 'mail.conf').write_text(conf_text(servers, 'users'))
    with caplog.at_level(logging.WARNING, logger='gmailproxy'):
        load(str(tmp_path / 'mail.conf'))
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


SALTED_SERVERS = (
    '    server { listen 127.0.0.1:1143; protocol imap; imap_auth plain cram-md5; }\n'
    '    server { listen 127.0.0.1:1110; protocol pop3; pop3_auth plain apop; }\n'
    '    server { listen 127.0.0.1:1025; protocol smtp; smtp_auth login cram-md5; }\n')


def test_cram_md5_and_apop_with_hashed_entries_warn_at_load(tmp_path, caplog):
    hashed = bcrypt.hashpw(b'x', bcrypt.gensalt(4)).decode()
    got = warnings_of(tmp_path, 'alice %s 127.0.0.1:1\nbob {PLAIN}x 127.0.0.1:1\n' % hashed,
                      SALTED_SERVERS, caplog)
    conf, users = tmp_path / 'mail.conf', tmp_path / 'users'
    assert got == [
        '"imap_auth cram-md5" cannot check the 1 hashed password(s) of %s: those users '
        'can log in only with other methods in %s:4' % (users, conf),
        '"pop3_auth apop" cannot check the 1 hashed password(s) of %s: those users '
        'can log in only with other methods in %s:5' % (users, conf),
        '"smtp_auth cram-md5" cannot check the 1 hashed password(s) of %s: those users '
        'can log in only with other methods in %s:6' % (users, conf)]


def test_no_warning_when_every_entry_is_plain(tmp_path, caplog):
    assert warnings_of(tmp_path, 'bob {PLAIN}x 127.0.0.1:1\n', SALTED_SERVERS, caplog) == []


def test_external_and_unauthenticated_smtp_warn(tmp_path, caplog):
    got = warnings_of(tmp_path, 'bob {PLAIN}x 127.0.0.1:1\n',
                      '    server { listen 127.0.0.1:1143; protocol imap;\n'
                      '             imap_auth plain external; }\n'
                      '    server { listen 127.0.0.1:1025; protocol smtp; smtp_auth none; }\n'
                      '    server { listen 127.0.0.1:1026; protocol smtp; smtp_auth none;\n'
                      '             auth_users_relay 127.0.0.1:25; }\n', caplog)
    conf = tmp_path / 'mail.conf'
    assert got == ['"imap_auth external" is always refused by "auth_users" in %s:5' % conf,
                   '"smtp_auth none": mail without authentication is refused without '
                   '"auth_users_relay" in %s:6' % conf]


# Decisions (as an auth service would answer)

class FakeSession:
    def __init__(self, users, proto='imap', method='plain', login=b'alice',
                 passwd=b'secret', salt=None, attempt=1, **conf):
        settings = {'auth_users': users, 'auth_users_wait': 0.0,
                    'auth_users_attempts': 10, 'auth_users_relay': None}
        settings.update(conf)
        self.conf = SimpleNamespace(**settings)
        self.proto = SimpleNamespace(NAME=proto)
        self.auth_method, self.login, self.passwd, self.salt = method, login, passwd, salt
        self.login_attempt = attempt
        self.infos = []

    def info(self, msg):
        self.infos.append(msg)


HASHED = bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()
USERS = ('alice %s imap=127.0.0.1:10143,pop3=127.0.0.1:10110\n'
         'bob {PLAIN}hunter2 127.0.0.1:10025 bobby\n'
         'carol {PLAIN}pw [::1]:143 - backend-pw\n' % HASHED)
SALT = b'<1896.697170952@mx.example>'


def test_right_password_answers_the_backend(tmp_path):
    s = FakeSession(table(USERS, tmp_path))
    result = auth_users.authenticate(s)
    assert result.servers == [(('127.0.0.1', 10143), 2, '127.0.0.1:10143')]
    assert (result.login, result.passwd) == (b'alice', b'secret')


def test_overrides_replace_the_backend_credentials(tmp_path):
    users = table(USERS, tmp_path)
    result = auth_users.authenticate(FakeSession(users, login=b'bob', passwd=b'hunter2'))
    assert (result.login, result.passwd) == (b'bobby', b'hunter2')
    result = auth_users.authenticate(FakeSession(users, login=b'carol', passwd=b'pw'))
    assert (result.login, result.passwd) == (b'carol', b'backend-pw')
    assert result.servers[0][2] == '::1:143'          # as nginx names it: not bracketed


@pytest.mark.parametrize('login, passwd', [(b'alice', b'wrong'), (b'nobody', b'secret'),
                                           (b'bob', b'Hunter2'), (b'', b'')])
def test_wrong_credentials_are_the_auth_service_rejection(tmp_path, login, passwd):
    s = FakeSession(table(USERS, tmp_path), login=login, passwd=passwd)
    with pytest.raises(errors.AuthFailed) as e:
        auth_users.authenticate(s)
    assert (e.value.message, e.value.wait, e.value.error_code) == (
        'Invalid login or password', 0.0, None)


def test_failure_waits_then_the_last_attempt_closes(tmp_path):
    users = table(USERS, tmp_path)
    s = FakeSession(users, passwd=b'wrong', auth_users_wait=0.2, auth_users_attempts=3)
    for attempt in (1, 2):
        s.login_attempt = attempt
        began = time.monotonic()
        with pytest.raises(errors.AuthFailed) as e:
            auth_users.authenticate(s)
        assert e.value.wait == 0.2                  # the session waits, then lets it retry
        assert time.monotonic() - began < 0.15
    s.login_attempt = 3
    began = time.monotonic()
    with pytest.raises(errors.AuthFailed) as e:
        auth_users.authenticate(s)
    assert e.value.wait == 0                        # reply, then close ...
    assert time.monotonic() - began >= 0.19         # ... after the same delay


def test_cram_md5_and_apop_against_plain_entries(tmp_path):
    users = table(USERS, tmp_path)
    cram = hmac.new(b'hunter2', SALT, hashlib.md5).hexdigest().encode()
    apop = hashlib.md5(SALT + b'hunter2').hexdigest().encode()
    for method, digest in (('cram-md5', cram), ('apop', apop), ('apop', apop.upper())):
        s = FakeSession(users, 'pop3', method, b'bob', digest, SALT)
        result = auth_users.authenticate(s)
        assert (result.login, result.passwd) == (b'bobby', b'hunter2')   # the plaintext
        s = FakeSession(users, 'pop3', method, b'bob', digest, b'<other@salt>')
        with pytest.raises(errors.AuthFailed):
            auth_users.authenticate(s)


def test_cram_md5_and_apop_refused_for_hashed_entries(tmp_path):
    users = table(USERS, tmp_path)
    for method, digest in (('cram-md5', hmac.new(b'secret', SALT, 'md5').hexdigest()),
                           ('apop', hashlib.md5(SALT + b'secret').hexdigest())):
        s = FakeSession(users, 'pop3', method, b'alice', digest.encode(), SALT)
        with pytest.raises(errors.AuthFailed) as e:
            auth_users.authenticate(s)
        assert e.value.message == 'Invalid login or password'
        assert s.infos == ['%s login refused: the user file holds a hashed password'
                           % method.upper()]


def test_external_is_refused(tmp_path):
    s = FakeSession(table(USERS, tmp_path), method='external', login=b'bob', passwd=None)
    with pytest.raises(errors.AuthFailed):
        auth_users.authenticate(s)
    assert s.infos == ['EXTERNAL login refused: the user file cannot check it']


def test_protocol_without_backend_is_a_service_error(tmp_path):
    users = table(USERS, tmp_path)
    with pytest.raises(errors.AuthServiceError) as e:
        auth_users.authenticate(FakeSession(users, 'smtp'))
    assert e.value.message == 'no smtp backend for "alice" in %s:1' % (tmp_path / 'users')


def test_smtp_without_auth_is_refused_unless_relay(tmp_path):
    users = table(USERS, tmp_path)
    s = FakeSession(users, 'smtp', 'none', None, None)
    with pytest.raises(errors.AuthFailed) as e:
        auth_users.authenticate(s)
    assert (e.value.message, e.value.wait, e.value.error_code) == (
        'Relaying denied', 0.0, b'550 5.7.1')
    s = FakeSession(users, 'smtp', 'none', None, None, auth_users_relay=('127.0.0.1', 2525))
    result = auth_users.authenticate(s)
    assert result.servers[0][2] == '127.0.0.1:2525' and result.login is None


def test_unknown_login_costs_a_hash_check(tmp_path, monkeypatch):
    users = table(USERS, tmp_path)
    checked = []
    monkeypatch.setattr(auth_users, 'verify_in_pool',
                        lambda entry, pw: checked.append((entry.login, pw)) or False)
    with pytest.raises(errors.AuthFailed):
        auth_users.authenticate(FakeSession(users, login=b'mallory', passwd=b'guess'))
    assert checked == [(b'alice', b'guess')]


# auth_hook loading

def hook_conf(tmp_path, target: str) -> Path:
    path = tmp_path / 'mail.conf'
    path.write_text('events { }\nmail {\n    server {\n        listen 127.0.0.1:1143; protocol imap;\n'
                    '        auth_hook %s;\n    }\n}\n' % target)
    return path


def test_hook_from_a_module_and_from_a_file(tmp_path, monkeypatch):
    (tmp_path / 'pkg_hook_mod.py').write_text('def check(request):\n    return {}\n')
    (tmp_path / 'hooks').mkdir()
    (tmp_path / 'hooks' / 'local.py').write_text('def check(request):\n    return []\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = load(str(hook_conf(tmp_path, 'pkg_hook_mod:check'))).servers[0].auth_hook
    assert hook.func.__module__ == 'pkg_hook_mod' and hook.func({}) == {}
    hook = load(str(hook_conf(tmp_path, 'hooks/local.py:check'))).servers[0].auth_hook
    assert hook.func({}) == [] and hook.text == 'hooks/local.py:check'


def test_file_hook_is_executed_again_on_reload(tmp_path):
    code = tmp_path / 'h.py'
    code.write_text('def check(request):\n    return 1\n')
    path = hook_conf(tmp_path, 'h.py:check')
    assert load(str(path)).servers[0].auth_hook.func({}) == 1
    code.write_text('def check(request):\n    return 2\n')
    assert load(str(path)).servers[0].auth_hook.func({}) == 2


@pytest.mark.parametrize('target, message', [
    ('no_such_module_here:check', 'auth_hook "no_such_module_here:check" cannot be imported '
                                  "(ModuleNotFoundError: No module named 'no_such_module_here')"),
    ('missing.py:check', 'auth_hook "missing.py:check" cannot be imported (FileNotFoundError: '
                         "[Errno 2] No such file or directory: '{dir}/missing.py')"),
    ('broken.py:check', 'auth_hook "broken.py:check" cannot be imported (ZeroDivisionError: '
                        'division by zero)'),
    ('ok.py:nothing', 'auth_hook "ok.py:nothing": "ok.py" has no function "nothing"'),
    ('ok.py:VALUE', 'auth_hook "ok.py:VALUE": "ok.py" has no function "VALUE"'),
    ('ok.py', 'invalid value "ok.py" in "auth_hook" directive, it must be '
              '"package.module:function"'),
    ('ok.py:not-a-name', 'invalid value "ok.py:not-a-name" in "auth_hook" directive, it must '
                         'be "package.module:function"'),
])
def test_hook_that_cannot_be_loaded_is_a_configuration_error(tmp_path, target, message):
    (tmp_path / 'broken.py').write_text('1 / 0\n')
    (tmp_path / 'ok.py').write_text('VALUE = 1\n')
    path = hook_conf(tmp_path, target)
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert str(e.value) == '%s in %s:5' % (message.replace('{dir}', str(tmp_path)), path)


# tools/gmailproxy-passwd

def passwd_tool(*args, stdin: str = '') -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PASSWD_TOOL), *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_passwd_tool_adds_updates_and_deletes(tmp_path):
    users = tmp_path / 'users'
    users.write_text('# my users\nbob {PLAIN}x 127.0.0.1:1 bobby bpw  # keep me\n')
    out = passwd_tool('-b', 'imap=127.0.0.1:10143', '-r', '4', users, 'alice@example.com',
                      stdin='s3cret\n')
    assert out.returncode == 0, out.stderr
    assert out.stderr == ('gmailproxy-passwd: %s: added "alice@example.com" (bcrypt); '
                          'reload gmailproxy to use it\n' % users)
    table = auth_users.parse(users.read_bytes(), str(users))
    alice = table[b'alice@example.com']
    assert alice.scheme == 'bcrypt' and alice.backends == {'imap': ('127.0.0.1', 10143)}
    assert auth_users.verify(alice, b's3cret')
    assert 's3cret' not in users.read_text()

    out = passwd_tool('--stdin', '-s', 'argon2', users, 'bob', stdin='new pass\n')
    assert out.returncode == 0, out.stderr
    lines = users.read_text().splitlines()
    assert lines[0] == '# my users' and lines[1].endswith('127.0.0.1:1  bobby  bpw  # keep me')
    bob = auth_users.parse(users.read_bytes(), str(users))[b'bob']
    assert bob.scheme == 'argon2' and auth_users.verify(bob, b'new pass')

    for scheme in ('sha512-crypt', 'plain'):
        out = passwd_tool('-s', scheme, '--backend-login', 'b2', '--backend-password',
                          users, 'bob', stdin='pw%s\nbackend\n' % len(scheme))
        assert out.returncode == 0, out.stderr
        bob = auth_users.parse(users.read_bytes(), str(users))[b'bob']
        assert (bob.backend_login, bob.backend_passwd) == (b'b2', b'backend')
        if scheme == 'plain':
            assert bob.secret == b'pw5'
        else:
            assert bob.scheme == scheme and auth_users.verify(bob, b'pw12')

    out = passwd_tool('--delete', users, 'bob')
    assert out.returncode == 0, out.stderr
    assert set(auth_users.parse(users.read_bytes(), str(users))) == {b'alice@example.com'}


def test_passwd_tool_new_file_is_private(tmp_path):
    users = tmp_path / 'new-users'
    out = passwd_tool('-b', '127.0.0.1:143', '-r', '4', users, 'alice', stdin='pw\n')
    assert out.returncode == 0, out.stderr
    assert os.stat(users).st_mode & 0o777 == 0o600


@pytest.mark.parametrize('args, stdin, message', [
    (('{f}', 'carol'), 'pw\n', '"carol" is a new user: give its backend with --backend'),
    (('-b', 'nowhere', '{f}', 'carol'), 'pw\n',
     'invalid backend "nowhere", expected host:port in {f}:3'),
    (('{f}', 'alice'), '', 'no password on standard input'),
    (('{f}', 'alice'), '\n', 'empty password'),
    (('-s', 'plain', '{f}', 'alice'), 'a b\n', 'a {PLAIN} password cannot contain blanks'),
    (('{f}', 'alice'), 'x' * 73 + '\n',
     'bcrypt uses only the first 72 bytes of a password: use -s argon2 for a longer one'),
    (('--delete', '{f}', 'carol'), '', 'no user "carol"'),
])
def test_passwd_tool_errors_leave_the_file_alone(tmp_path, args, stdin, message):
    users = tmp_path / 'users'
    users.write_text('# users\nalice {PLAIN}x 127.0.0.1:1\n')
    before = users.read_text()
    out = passwd_tool(*[a.replace('{f}', str(users)) for a in args], stdin=stdin)
    assert out.returncode == 1
    assert out.stderr == 'gmailproxy-passwd: %s\n' % message.replace('{f}', str(users))
    assert users.read_text() == before


# The shipped configuration and sample hook

def test_conf_mail_conf_is_valid_and_uses_the_user_file():
    out = subprocess.run([sys.executable, '-m', 'gmailproxy', '-t', 'conf/mail.conf'],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert '[warn]' not in out.stderr and '[emerg]' not in out.stderr
    config = load(str(ROOT / 'conf' / 'mail.conf'), prefix=str(ROOT))
    assert [(c.protocol, c.listen[0].addr_text, auth.method(c)) for c in config.servers] == [
        ('imap', '127.0.0.1:1143', 'users'), ('pop3', '127.0.0.1:1110', 'users'),
        ('smtp', '127.0.0.1:1587', 'users')]
    alice = config.servers[0].auth_users.users[b'alice@example.com']
    assert alice.backends == {'imap': ('127.0.0.1', 10143), 'pop3': ('127.0.0.1', 10110),
                              'smtp': ('127.0.0.1', 10025)}
    assert auth_users.verify(alice, b'secret')          # the README's first login


def test_sample_hook_answers():
    import importlib.util
    spec = importlib.util.spec_from_file_location('sample_hook',
                                                  ROOT / 'conf' / 'auth_hook_example.py')
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    base = {'Auth-User': 'alice@example.com', 'Auth-Protocol': 'pop3',
            'Auth-Login-Attempt': '1', 'Client-IP': '127.0.0.1'}
    salt = '<1.2@mx>'
    assert hook.authenticate({**base, 'Auth-Method': 'plain', 'Auth-Pass': 'secret'}) == {
        'Auth-Status': 'OK', 'Auth-Server': '127.0.0.1', 'Auth-Port': 10110}
    apop = hashlib.md5(salt.encode() + b'secret').hexdigest()
    assert hook.authenticate({**base, 'Auth-Method': 'apop', 'Auth-Pass': apop,
                              'Auth-Salt': salt})['Auth-Pass'] == 'secret'
    cram = hmac.new(b'secret', salt.encode(), hashlib.md5).hexdigest()
    assert hook.authenticate({**base, 'Auth-Method': 'cram-md5', 'Auth-Pass': cram,
                              'Auth-Salt': salt})['Auth-Status'] == 'OK'
    assert hook.authenticate({**base, 'Auth-Method': 'plain', 'Auth-Pass': 'x'}) == {
        'Auth-Status': 'Invalid login or password', 'Auth-Wait': 3}
    assert hook.authenticate({**base, 'Auth-Method': 'plain', 'Auth-Pass': 'x',
                              'Auth-Login-Attempt': '10'}) == {
        'Auth-Status': 'Invalid login or password'}
    assert hook.authenticate({**base, 'Auth-Method': 'none', 'Auth-Protocol': 'smtp'}) == {
        'Auth-Status': 'Relaying denied', 'Auth-Error-Code': '550 5.7.1'}
