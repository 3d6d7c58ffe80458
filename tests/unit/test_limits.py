"""Issue 12 items 4-5, the pure parts: limit tables, the auth cache key, outcomes, the
access-log line formats and the directives of limits.py, metrics.py and accesslog.py."""
import json
import time
from pathlib import Path

import pytest

from gmailproxy import accesslog, errors, limits
from gmailproxy.config.parser import load
from gmailproxy.errors import ConfigError


def write(folder: Path, text: str) -> str:
    path = folder / 'mail.conf'
    path.write_text(text)
    return str(path)


def mail(body: str, server: str = '') -> str:
    return ('events { }\nmail {\n    auth_http 127.0.0.1:9000/auth;\n' + body +
            '    server { listen 127.0.0.1:8143; protocol imap; ' + server + '}\n}\n')


class FakeProto:
    NAME = 'imap'


class FakeListen:
    addr_text = '127.0.0.1:8143'


class FakeSession:
    """What cache_key, outcome and the access log read from a session."""

    def __init__(self, **kw):
        self.proto = FakeProto()
        self.listen = FakeListen()
        self.auth_method = 'plain'
        self.login = b'alice'
        self.passwd = b'secret'
        self.client_ip = '192.0.2.7'
        self.tls = False
        self.conn_id = 42
        self.upstream_name = '127.0.0.1:1143'
        self.track = limits.Track()
        self.sock = None
        self.__dict__.update(kw)


# --- directives -----------------------------------------------------------------------

def test_everything_is_off_by_default(tmp_path):
    conf, = load(write(tmp_path, mail(''))).servers
    assert conf.limits is None
    assert conf.access_logger is None
    assert conf.metrics is False
    assert conf.tracked is False


def test_directives_parse_and_inherit(tmp_path):
    log_path = tmp_path / 'access.log'
    conf, = load(write(tmp_path, mail(
        '    max_sessions_per_address 3;\n    max_login_failures 5 10m;\n'
        '    auth_cache 1000;\n    auth_cache_ttl 2m;\n    auth_cache_negative_ttl 0;\n'
        '    limit_table_size 500;\n'
        '    metrics_listen 127.0.0.1:9145;\n'
        '    access_log %s format=json;\n' % log_path,
        server='max_sessions_per_login 2; max_sessions_per_address off; '))).servers
    lim = conf.limits
    assert (lim.per_address, lim.per_login) == (0, 2)
    assert (lim.failures, lim.window) == (5, 600.0)
    assert (lim.cache.size, lim.cache.ttl, lim.cache.negative_ttl) == (1000, 120.0, 0.0)
    assert limits._failures.size == 500
    assert conf.metrics_listen.addr_text == '127.0.0.1:9145' and conf.metrics is True
    assert conf.access_logger.json is True and log_path.exists()
    assert conf.tracked is True
    limits._failures.size = limits.DEFAULT_TABLE_SIZE


def test_access_log_off_in_a_server(tmp_path):
    conf, = load(write(tmp_path, mail('    access_log %s;\n' % (tmp_path / 'a.log'),
                                      server='access_log off; '))).servers
    assert conf.access_logger is None and conf.tracked is False


def test_failure_window_default(tmp_path):
    conf, = load(write(tmp_path, mail('    max_login_failures 4;\n'))).servers
    assert (conf.limits.failures, conf.limits.window) == (4, limits.DEFAULT_WINDOW)


@pytest.mark.parametrize('body, message', [
    ('max_sessions_per_login x;', '"max_sessions_per_login" directive invalid number'),
    ('max_login_failures 5 0;', '"max_login_failures" directive invalid value'),
    ('max_login_failures 5 1x;', '"max_login_failures" directive invalid value'),
    ('auth_cache -1;', '"auth_cache" directive invalid number'),
    ('access_log /tmp/x.log format=xml;', 'invalid parameter "format=xml"'),
    ('access_log off json;', 'invalid parameter "json"'),
    ("access_log_format '$client $password';", 'unknown "password" variable'),
    ('metrics_listen 127.0.0.1;', 'invalid port in "127.0.0.1" of the "metrics_listen" '
                                  'directive'),
    ('metrics_listen 127.0.0.1:0;',
     'invalid port in "127.0.0.1:0" of the "metrics_listen" directive'),
])
def test_directive_errors(tmp_path, body, message):
    path = write(tmp_path, mail('    %s\n' % body))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == '%s in %s:4' % (message, path)


@pytest.mark.parametrize('text, shown', [
    ('9145', '0.0.0.0:9145'), ('[::1]:9145', '[::1]:9145'),
    ('unix:/run/gmailproxy-metrics.sock', 'unix:/run/gmailproxy-metrics.sock'),
])
def test_metrics_listen_forms(tmp_path, text, shown):
    conf, = load(write(tmp_path, mail('    metrics_listen %s;\n' % text))).servers
    assert conf.metrics_listen.addr_text == shown


def test_metrics_listen_off(tmp_path):
    conf, = load(write(tmp_path, mail('    metrics_listen off;\n'))).servers
    assert conf.metrics_listen is None and conf.metrics is False


def test_metrics_listen_only_in_mail(tmp_path):
    path = write(tmp_path, mail('', server='metrics_listen 9145; '))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith('"metrics_listen" directive is not allowed here in ')


def test_access_log_unwritable_file(tmp_path):
    path = write(tmp_path, mail('    access_log %s;\n' % (tmp_path / 'no' / 'a.log')))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == ('open() "%s" failed (2: No such file or directory) in %s:4'
                            % (tmp_path / 'no' / 'a.log', path))


# --- tables ---------------------------------------------------------------------------

def test_failure_window_blocks_then_recovers():
    table = limits.FailureTable(size=10)
    for t in (0.0, 1.0, 2.0):
        assert not table.blocked('a', 3, 10.0, t)
        table.record('a', 3, t)
    assert table.blocked('a', 3, 10.0, 5.0)
    assert not table.blocked('b', 3, 10.0, 5.0)
    assert table.blocked('a', 3, 10.0, 9.9)
    assert not table.blocked('a', 3, 10.0, 10.0)     # the oldest of the 3 left it
    table.record('a', 3, 10.5)                       # 1.0, 2.0, 10.5 within 10s of 10.5
    assert table.blocked('a', 3, 10.0, 10.5)
    assert table.entries['a'] == [1.0, 2.0, 10.5]    # never more than N kept


def test_failure_table_is_lru_bounded():
    table = limits.FailureTable(size=3)
    for i in range(5):
        table.record('10.0.0.%d' % i, 2, float(i))
    assert list(table.entries) == ['10.0.0.2', '10.0.0.3', '10.0.0.4']
    table.record('10.0.0.2', 2, 6.0)                 # refreshed: now the most recent
    table.record('10.0.0.9', 2, 7.0)
    assert list(table.entries) == ['10.0.0.4', '10.0.0.2', '10.0.0.9']


def test_concurrency_table_keeps_only_live_keys():
    table = {}
    assert limits._acquire(table, 'k', 2) and limits._acquire(table, 'k', 2)
    assert not limits._acquire(table, 'k', 2)
    limits._release(table, 'k')
    assert limits._acquire(table, 'k', 2)
    limits._release(table, 'k')
    limits._release(table, 'k')
    assert table == {}
    limits._release(table, None)


def test_auth_cache_ttls_and_bound():
    cache = limits.AuthCache(2, ttl=10.0, negative_ttl=1.0)
    cache.put(b'ok', 'result', 0.0)
    cache.put(b'no', ('Invalid', 0, None), 0.0)
    assert cache.get(b'ok', 9.9) == 'result'
    assert cache.get(b'no', 0.5) == ('Invalid', 0, None)
    assert cache.get(b'no', 1.0) is None and b'no' not in cache.entries
    cache.put(b'x', 'x', 2.0)
    cache.put(b'y', 'y', 2.0)
    assert list(cache.entries) == [b'x', b'y']       # b'ok' was the oldest
    off = limits.AuthCache(2, ttl=10.0, negative_ttl=0.0)
    off.put(b'no', ('Invalid', 0, None), 0.0)
    assert off.entries == {}


def test_cache_key_honours_a_password_change():
    key = limits.cache_key(FakeSession())
    assert key == limits.cache_key(FakeSession()) and len(key) == 32
    assert limits.cache_key(FakeSession(passwd=b'secret2')) != key
    assert limits.cache_key(FakeSession(login=b'bob')) != key
    assert limits.cache_key(FakeSession(client_ip='192.0.2.8')) != key
    assert limits.cache_key(FakeSession(tls=True)) != key
    assert limits.cache_key(FakeSession(auth_method='login')) != key
    # the parts are length-prefixed: moving bytes between login and password differs
    assert limits.cache_key(FakeSession(login=b'alic', passwd=b'esecret')) != key
    assert b'secret' not in key


@pytest.mark.parametrize('method', ['cram-md5', 'apop', 'external', 'none'])
def test_salted_and_passwordless_methods_are_not_cached(method):
    assert limits.cache_key(FakeSession(auth_method=method)) is None


def test_no_key_without_login_or_password():
    assert limits.cache_key(FakeSession(login=None)) is None
    assert limits.cache_key(FakeSession(passwd=None)) is None


# --- outcomes -------------------------------------------------------------------------

class ShutdownTimeout(errors.ProxyError):
    pass


class GreenletExit(BaseException):
    pass


@pytest.mark.parametrize('exc, auth, bytes_, expected', [
    (None, 'ok', (1, 2), 'ok'),
    (None, None, None, 'internal'),
    (errors.SessionDone(), None, None, 'quit'),
    (errors.SessionDone(), 'failed', None, 'auth_failed'),
    (errors.ClientClosed(), 'failed', None, 'auth_failed'),
    (errors.ClientTimeout(), None, None, 'timeout'),
    (errors.ClientError('x'), None, None, 'closed'),
    (errors.AuthServiceError('x'), 'error', None, 'auth_error'),
    (errors.UpstreamTimeout(), 'ok', None, 'upstream_error'),
    (errors.UpstreamRejected('x', b''), 'ok', None, 'upstream_error'),
    (errors.TLSError('x'), None, None, 'tls_error'),
    (errors.TooLong('x'), None, None, 'invalid'),
    (errors.TooManyErrors(), None, None, 'invalid'),
    (limits.Refused('x', reply='limit_login'), 'refused', None, 'refused'),
    (ShutdownTimeout(), 'ok', (1, 2), 'shutdown'),
    (GreenletExit(), 'ok', (1, 2), 'killed'),
    (errors.ProxyError('x'), None, None, 'internal'),
])
def test_outcomes(exc, auth, bytes_, expected):
    t = limits.Track()
    t.auth, t.bytes = auth, bytes_
    if isinstance(exc, errors.ProxyError):
        t.exc = exc
        assert limits.outcome(t, None) == expected
    else:
        assert limits.outcome(t, exc) == expected


# --- access-log lines -----------------------------------------------------------------

def test_text_line_default_format():
    s = FakeSession(login=b'we"ird\\\x01\xc3\xa9')
    s.track.bytes = (10, 2000)
    values = accesslog.fields(s, 'ok', 1777636800.25)
    values['duration'] = 1.5
    template = accesslog.log_format([accesslog.DEFAULT_FORMAT], None)
    line = accesslog.text_line(template, values)
    assert line.endswith(b' imap 127.0.0.1:8143 "we\\x22ird\\x5C\\x01\\xC3\\xA9" '
                         b'127.0.0.1:1143 ok 1.500 10 2000\n')
    assert line.startswith(b'192.0.2.7 [' + values['time_local'].encode() + b'] ')
    assert time.strptime(values['time_local'], '%d/%b/%Y:%H:%M:%S %z')


def test_text_line_custom_format_and_missing_values():
    s = FakeSession(login=None, upstream_name=None)
    template = accesslog.log_format(['*$connection ${protocol}x $login $backend $tls '
                                     '$bytes_to_client $outcome $msec'], None)
    line = accesslog.text_line(template, accesslog.fields(s, 'auth_failed', 100.0))
    assert line == b'*42 imapx - - - 0 auth_failed 100.000\n'


def test_json_line():
    s = FakeSession(login=b'b\xffob"')
    s.track.bytes = (7, 9)
    record = json.loads(accesslog.json_line(accesslog.fields(s, 'ok', 1777636800.0)))
    assert list(record) == ['time', 'connection', 'client', 'server', 'protocol',
                            'login', 'backend', 'outcome', 'duration',
                            'bytes_from_client', 'bytes_to_client', 'tls']
    assert record['login'] == 'b\\xffob"'
    names = ('connection', 'client', 'server', 'protocol', 'backend', 'outcome',
             'bytes_from_client', 'bytes_to_client', 'tls')
    assert tuple(record[n] for n in names) == (
        42, '192.0.2.7', '127.0.0.1:8143', 'imap', '127.0.0.1:1143', 'ok', 7, 9, None)
    assert record['time'][:4] == '2026' and record['time'][-3] == ':'
    assert isinstance(record['duration'], float)
    values = accesslog.fields(FakeSession(login=None), 'x', 0.0)
    nobody = json.loads(accesslog.json_line(values))
    assert nobody['login'] is None
