"""Value parsers (gmailproxy.config.values and .address), one syntax at a time."""
import ipaddress
import os
import socket

import pytest
from hypothesis import given, strategies as st

from gmailproxy.config import address, values
from gmailproxy.config.address import parse_size, parse_time


class Ctx:
    """The parser's context, as value parsers see it."""

    def __init__(self, name='test', previous=None):
        self.name, self.file, self.line = name, '/etc/mail.conf', 7
        self.previous = previous
        self.cache, self.listens, self.warnings = {}, {}, []

    def warn(self, msg, level='warn'):
        self.warnings.append(msg)

    def path(self, name):
        return os.path.join('/etc', name)

    def prefix_path(self, name):
        return os.path.join('/usr/local/gmailproxy', name)


def error(parse, args, name='test', **kw) -> str:
    with pytest.raises(ValueError) as info:
        parse(args, Ctx(name, **kw))
    return str(info.value)


@pytest.mark.parametrize('text, ms', [
    ('0', 0), ('60', 60000), ('60s', 60000), ('1m', 60000), ('500ms', 500),
    ('1h30m', 5400000), ('1h 30m', 5400000), ('5d', 432000000), ('1w1d', 691200000),
    ('1m1s1ms', 61001), ('1 2', 3000), ('h5', 5000),
])
def test_milliseconds(text, ms):
    assert parse_time(text, False) == ms


@pytest.mark.parametrize('text, s', [
    ('30', 30), ('5m', 300), ('1y', 31536000), ('1M', 2592000), ('1y1M1w1d1h1m1s',
                                                                  31536000 + 2592000 + 694861),
])
def test_seconds(text, s):
    assert parse_time(text, True) == s


@pytest.mark.parametrize('text', ['', 's', '1s1m', '1m1m', '1x', '-1', '1.5s', '1y', '1M',
                                  '1ms1s', '9' * 30, '1 2s'])
def test_invalid_milliseconds(text):
    assert parse_time(text, False) is None


@pytest.mark.parametrize('text', ['1ms', '', 'm', '2d1w'])
def test_invalid_seconds(text):
    assert parse_time(text, True) is None


@given(st.integers(min_value=0, max_value=10 ** 9))
def test_plain_number_is_seconds(n):
    assert parse_time(str(n), True) == n
    assert parse_time(str(n), False) == n * 1000


@pytest.mark.parametrize('text, size', [
    ('0', 0), ('4096', 4096), ('16k', 16384), ('16K', 16384), ('1m', 1048576), ('2M', 2097152),
])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize('text', ['', 'k', '1g', '1.5k', '-1', ' 1', '1kb', '1 k'])
def test_invalid_sizes(text):
    assert parse_size(text) is None


def test_size_directive_refuses_zero():
    assert values.size(['8k'], Ctx()) == 8192
    assert error(values.size, ['0'], 'proxy_buffer') == '"proxy_buffer" directive invalid value'


def test_time_directives():
    assert values.time_ms(['250ms'], Ctx()) == 0.25
    assert values.time_s(['2m'], Ctx()) == 120.0
    assert error(values.time_ms, ['1y'], 'timeout') == '"timeout" directive invalid value'
    assert error(values.time_s, ['1ms'], 'ssl_session_timeout') == \
        '"ssl_session_timeout" directive invalid value'


def test_flag():
    assert values.flag(['On'], Ctx()) is True
    assert values.flag(['OFF'], Ctx()) is False
    assert error(values.flag, ['1'], 'xclient') == \
        'invalid value "1" in "xclient" directive, it must be "on" or "off"'


def test_numbers():
    assert values.number(['42'], Ctx()) == 42
    assert error(values.number, ['4 2'], 'max_errors') == '"max_errors" directive invalid number'
    assert error(values.number, ['+1'], 'max_errors') == '"max_errors" directive invalid number'
    assert values.number_or_off(['Off'], Ctx()) == 0
    assert values.worker_connections(['1024'], Ctx()) == 1024
    assert error(values.worker_connections, ['1k']) == 'invalid number "1k"'
    assert values.worker_processes(['auto'], Ctx()) >= 1
    assert error(values.worker_processes, ['Auto'], 'worker_processes') == \
        '"worker_processes" directive invalid value'


def test_choice_is_case_insensitive_and_canonical():
    parse = values.choice('on', 'off', 'optional_no_ca')
    assert parse(['OPTIONAL_NO_CA'], Ctx()) == 'optional_no_ca'
    assert error(parse, ['maybe']) == 'invalid value "maybe"'


def test_methods():
    parse = values.methods('plain', 'login', 'cram-md5')
    ctx = Ctx()
    assert parse(['LOGIN', 'Plain', 'login'], ctx) == ('login', 'plain')
    assert ctx.warnings == ['duplicate value "login"']
    ctx = Ctx(previous=('plain',))
    assert parse(['cram-MD5', 'PLAIN'], ctx) == ('cram-md5',)
    assert ctx.warnings == ['duplicate value "PLAIN"']
    assert error(parse, ['apop']) == 'invalid value "apop"'
    assert values.methods('TLSv1.2', 'TLSv1.3')(['tlsv1.2'], Ctx()) == ('TLSv1.2',)


def test_protocol_is_case_sensitive():
    assert values.protocol(['smtp'], Ctx()) == 'smtp'
    assert error(values.protocol, ['IMAP']) == 'unknown protocol "IMAP"'


def test_paths_words_pairs():
    assert values.path(['certs/a.pem'], Ctx()) == '/etc/certs/a.pem'
    assert values.prefix_path(['logs/gp.pid'], Ctx()) == '/usr/local/gmailproxy/logs/gp.pid'
    assert values.path_or_data(['data:-----BEGIN'], Ctx()) == 'data:-----BEGIN'
    assert values.path_or_data(['engine:pkcs11:id'], Ctx()) == 'engine:pkcs11:id'
    assert values.words(['IMAP4rev1', 'ID'], Ctx()) == ('IMAP4rev1', 'ID')
    assert values.pair(['X-A', 'b c'], Ctx()) == ('X-A', 'b c')
    assert values.string(['HIGH:!aNULL'], Ctx()) == 'HIGH:!aNULL'
    assert values.ignored(['x'], Ctx()) is None


def test_server_name_empty_means_host_name():
    assert values.server_name(['mx.example.com'], Ctx()) == 'mx.example.com'
    assert values.server_name([''], Ctx()) == socket.gethostname().lower()


@pytest.mark.parametrize('args, expected', [
    (['stderr'], ('stderr', 'error')),
    (['logs/error.log', 'info'], ('/usr/local/gmailproxy/logs/error.log', 'info')),
    (['/var/log/gp.log', 'debug_mail'], ('/var/log/gp.log', 'debug')),
    (['stderr', 'debug_mail', 'debug_core'], ('stderr', 'debug')),
    (['syslog:server=127.0.0.1,tag=gp', 'warn'], ('syslog:server=127.0.0.1,tag=gp', 'warn')),
])
def test_error_log(args, expected):
    assert tuple(values.error_log(args, Ctx())) == expected


@pytest.mark.parametrize('args, message', [
    (['stderr', 'Info'], 'invalid log level "Info"'),
    (['stderr', 'info', 'info'], 'duplicate log level "info"'),
    (['stderr', 'info', 'debug_mail'], 'invalid log level "debug_mail"'),
    (['stderr', 'debug_mail', 'info'], 'duplicate log level "info"'),
    (['syslog:tag=x'], 'no syslog server specified'),
    (['syslog:server=x,colour=red'], 'unknown syslog parameter "colour=red"'),
    (['memory:1m'], 'the "memory:" error log is not supported'),
])
def test_error_log_errors(args, message):
    assert error(values.error_log, args) == message


def test_resolver():
    r = values.resolver(['127.0.0.1:5353', '[::1]', 'valid=1m', 'ipv4=off'], Ctx())
    assert r.addresses == (('127.0.0.1', 5353), ('::1', 53))
    assert (r.valid, r.ipv4, r.ipv6) == (60.0, False, True)
    assert values.resolver(['off'], Ctx()) is None
    assert error(values.resolver, ['127.0.0.1', 'ipv6=no']) == 'invalid parameter: ipv6=no'
    assert error(values.resolver, ['127.0.0.1:0']) == 'invalid port in resolver "127.0.0.1:0"'
    assert error(values.resolver, ['valid=5s']) == 'no name servers defined'


@pytest.mark.parametrize('url, family, sockaddr, host, uri', [
    ('127.0.0.1:9000/auth?x=1', socket.AF_INET, ('127.0.0.1', 9000), b'127.0.0.1',
     b'/auth?x=1'),
    ('http://127.0.0.1', socket.AF_INET, ('127.0.0.1', 80), b'127.0.0.1', b'/'),
    ('127.0.0.1:8080?a', socket.AF_INET, ('127.0.0.1', 8080), b'127.0.0.1', b'?a'),
    ('localhost:9000', socket.AF_INET, ('127.0.0.1', 9000), b'localhost', b'/'),
    ('[::1]:9000/a', socket.AF_INET6, ('::1', 9000, 0, 0), b'[::1]', b'/a'),
    ('unix:/run/auth.sock', socket.AF_UNIX, '/run/auth.sock', b'localhost', b'/'),
    ('http://unix:/run/auth.sock:/auth', socket.AF_UNIX, '/run/auth.sock', b'localhost',
     b'/auth'),
])
def test_auth_http_url(url, family, sockaddr, host, uri):
    u = values.auth_http_url([url], Ctx())
    assert (u.family, u.sockaddr, u.host_header, u.uri, u.tls) == \
        (family, sockaddr, host, uri, None)


def test_auth_http_url_https_beyond_nginx():
    u = values.auth_http_url(['https://localhost/auth'], Ctx())
    assert (u.sockaddr, u.server_hostname, u.uri) == (('127.0.0.1', 443), 'localhost', b'/auth')
    assert u.tls is not None


@pytest.mark.parametrize('url, message', [
    ('127.0.0.1:0', 'invalid port in auth_http "127.0.0.1:0"'),
    ('http://:80/x', 'no host in auth_http ":80/x"'),
    ('[::1', 'invalid host in auth_http "[::1"'),
    ('[::x]:80', 'invalid IPv6 address in auth_http "[::x]:80"'),
    ('unix:', 'no path in the unix domain socket in auth_http "unix:"'),
    ('unix:/' + 'p' * 120, 'too long path in the unix domain socket in auth_http "unix:/%s"'
     % ('p' * 120)),
])
def test_auth_http_url_errors(url, message):
    assert error(values.auth_http_url, [url]) == message


def test_ssl_session_cache():
    assert values.ssl_session_cache(['off'], Ctx()) == ('off',)
    assert values.ssl_session_cache(['builtin', 'shared:SSL:10m'], Ctx()) == \
        ('builtin', 'shared:SSL:10m')
    assert error(values.ssl_session_cache, ['builtin:x']) == 'invalid session cache "builtin:x"'
    assert error(values.ssl_session_cache, ['shared::1m']) == 'invalid session cache "shared::1m"'
    assert error(values.ssl_session_cache, ['tiny']) == 'invalid session cache "tiny"'
    assert error(values.ssl_session_cache, ['shared:a:4k']) == \
        'session cache "shared:a:4k" is too small'


def test_real_ip_from():
    ctx = Ctx()
    assert values.real_ip_from(['192.168.0.0/16'], ctx) == \
        (ipaddress.ip_network('192.168.0.0/16'),)
    assert values.real_ip_from(['::1'], ctx) == (ipaddress.ip_network('::1/128'),)
    assert values.real_ip_from(['10.1.2.3/8'], ctx) == (ipaddress.ip_network('10.0.0.0/8'),)
    assert ctx.warnings == ['low address bits of 10.1.2.3/8 are meaningless']
    assert values.real_ip_from(['localhost'], ctx) == (ipaddress.ip_network('127.0.0.1/32'),)
    assert values.real_ip_from(['unix:'], ctx) == ('unix:',)


# Addresses (ngx_parse_url) and listen.

@pytest.mark.parametrize('text, ip', [
    ('127.0.0.1', '127.0.0.1'), ('10.000.0.1', '10.0.0.1'), ('1..2.3', '1.0.2.3'),
    ('1.2.3', None), ('1.2.3.256', None), ('1.2.3.4.5', None), ('a.b.c.d', None),
])
def test_inet_addr(text, ip):
    assert address.inet_addr(text) == ip


def listen(text, *params, ctx=None):
    return values.listen([text, *params], ctx or Ctx('listen'))


def test_listen_addresses():
    assert [l.addr_text for l in listen('8143')] == ['0.0.0.0:8143']
    assert [l.addr_text for l in listen('*:8143')] == ['0.0.0.0:8143']
    assert [l.addr_text for l in listen('0.0.0.0:8143')] == ['0.0.0.0:8143']
    assert [l.addr_text for l in listen('[0::0]:8143')] == ['[::]:8143']
    assert [l.addr_text for l in listen('[::1]:8143')] == ['[::1]:8143']
    assert [l.addr_text for l in listen('8143-8144')] == ['0.0.0.0:8143', '0.0.0.0:8144']
    assert [l.addr_text for l in listen('UNIX:/run/a.sock')] == ['unix:/run/a.sock']
    first = listen('127.0.0.1:8143')[0]
    assert (first.family, first.sockaddr, first.port, first.wildcard) == \
        (socket.AF_INET, ('127.0.0.1', 8143), 8143, False)
    assert (first.file, first.line) == ('/etc/mail.conf', 7)


@pytest.mark.parametrize('text, message', [
    ('0', 'invalid port in "0" of the "listen" directive'),
    ('65536', 'invalid port in "65536" of the "listen" directive'),
    ('127.0.0.1:x', 'invalid port in "127.0.0.1:x" of the "listen" directive'),
    ('127.0.0.1:1-x', 'invalid port in "127.0.0.1:1-x" of the "listen" directive'),
    ('127.0.0.1:9-1', 'invalid port range in "127.0.0.1:9-1" of the "listen" directive'),
    (':25', 'no host in ":25" of the "listen" directive'),
    ('[::1]x', 'invalid host in "[::1]x" of the "listen" directive'),
    ('[]:25', 'no host in "[]:25" of the "listen" directive'),
    ('[::1%lo]:25', 'invalid IPv6 address in "[::1%lo]:25" of the "listen" directive'),
    ('[::1]', 'no port in "[::1]" of the "listen" directive'),
    ('*', 'no port in "*" of the "listen" directive'),
    ('unix:/' + 'u' * 110, 'too long path in the unix domain socket in "unix:/%s" of the '
     '"listen" directive' % ('u' * 110)),
])
def test_listen_address_errors(text, message):
    assert error(values.listen, [text], 'listen') == message


def test_listen_duplicates_across_directives_but_not_within_one():
    ctx = Ctx('listen')
    assert len(listen('localhost:8143', ctx=ctx)) == 1
    with pytest.raises(ValueError) as info:
        listen('127.0.0.1:8142-8143', ctx=ctx)
    assert str(info.value) == 'duplicate "127.0.0.1:8143" address and port pair'
    assert len(listen('[::1]:8143', ctx=ctx)) == 1


@pytest.mark.parametrize('param, message', [
    ('backlog=-1', 'invalid backlog "backlog=-1"'),
    ('backlog=', 'invalid backlog "backlog="'),
    ('rcvbuf=1g', 'invalid rcvbuf "rcvbuf=1g"'),
    ('sndbuf=', 'invalid sndbuf "sndbuf="'),
    ('ipv6only=oN', 'invalid ipv6only flags "oN"'),
    ('so_keepalive=0:0:0', 'invalid so_keepalive value: "0:0:0"'),
    ('so_keepalive=1x', 'invalid so_keepalive value: "1x"'),
    ('so_keepalive=::x', 'invalid so_keepalive value: "::x"'),
    ('so_keepalive=1:2:3:4', 'invalid so_keepalive value: "1:2:3:4"'),
    ('so_keepalive=ON', 'invalid so_keepalive value: "ON"'),
    ('SSL', 'invalid parameter "SSL"'),
    ('default_server', 'invalid parameter "default_server"'),
])
def test_listen_parameter_errors(param, message):
    assert error(values.listen, ['127.0.0.1:8143', param], 'listen') == message


@pytest.mark.parametrize('param, keepalive', [
    ('so_keepalive=on', True), ('so_keepalive=off', False),
    ('so_keepalive=1h', (3600, None, None)), ('so_keepalive=:30s', (None, 30, None)),
    ('so_keepalive=::5', (None, None, 5)), ('so_keepalive=10:20:3', (10, 20, 3)),
])
def test_listen_keepalive(param, keepalive):
    lst = listen('127.0.0.1:8143', param)[0]
    assert (lst.so_keepalive, lst.bind) == (keepalive, True)
