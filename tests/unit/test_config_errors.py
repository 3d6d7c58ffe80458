"""Broken configurations: nginx's exact message and position for each.

Every case is ``tests/configs/<case>/mail.conf`` (some include other files). The table is
(case, message, position): the position is the file (relative to the case folder) and line
that nginx appends as `` in /abs/path:line``, or None for messages without one.
Most cases go through ``load``; a few through ``python -m gmailproxy`` to check the
command line's output and exit code.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmailproxy.config.parser import load
from gmailproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / 'tests' / 'configs'

CASES = [
    ('auth_http_invalid_port',
     'invalid port in auth_http "127.0.0.1:0/auth"',
     'mail.conf:3'),
    ('auth_http_unix_no_path',
     'no path in the unix domain socket in auth_http "unix:"',
     'mail.conf:3'),
    ('block_with_arguments',
     'invalid number of arguments in "server" directive',
     'mail.conf:4'),
    ('duplicate_events_block', '"events" directive is duplicate', 'mail.conf:2'),
    ('duplicate_mail_block', '"mail" directive is duplicate', 'mail.conf:6'),
    ('duplicate_scalar', '"timeout" directive is duplicate', 'mail.conf:5'),
    ('enum_invalid', 'invalid value "maybe"', 'mail.conf:4'),
    ('eof_in_block', 'unexpected end of file, expecting "}"', 'mail.conf:5'),
    ('eof_in_directive', 'unexpected end of file, expecting ";" or "}"', 'mail.conf:2'),
    ('error_log_duplicate_level', 'duplicate log level "warn"', 'mail.conf:2'),
    ('error_log_invalid_level', 'invalid log level "loud"', 'mail.conf:2'),
    ('flag_invalid',
     'invalid value "yes" in "xclient" directive, it must be "on" or "off"',
     'mail.conf:4'),
    ('http_block_unclosed', 'unexpected end of file, expecting "}"', 'mail.conf:6'),
    ('include_error_inside', 'invalid value "bogus"', 'servers/b.conf:5'),
    ('include_extra_close_brace', 'unexpected "}"', 'servers.conf:2'),
    ('include_missing',
     'open() "{d}/missing.conf" failed (2: No such file or directory)',
     'mail.conf:2'),
    ('include_not_allowed_here',
     '"worker_processes" directive is not allowed here',
     'main.conf:2'),
    ('include_unclosed_block', 'unexpected end of file, expecting "}"', 'servers.conf:4'),
    ('listen_at_mail_level', '"listen" directive is not allowed here', 'mail.conf:4'),
    ('listen_backlog_zero', 'invalid backlog "backlog=0"', 'mail.conf:4'),
    ('listen_duplicate', 'duplicate "127.0.0.1:8143" address and port pair', 'mail.conf:6'),
    ('listen_invalid_ipv6',
     'invalid IPv6 address in "[::g]:143" of the "listen" directive',
     'mail.conf:4'),
    ('listen_invalid_parameter', 'invalid parameter "foo"', 'mail.conf:4'),
    ('listen_invalid_port',
     'invalid port in "127.0.0.1:70000" of the "listen" directive',
     'mail.conf:4'),
    ('listen_ipv6only_invalid', 'invalid ipv6only flags "of"', 'mail.conf:4'),
    ('listen_ipv6only_yes', 'invalid parameter "ipv6only=yes"', 'mail.conf:4'),
    ('listen_keepalive_empty', 'invalid so_keepalive value: "::"', 'mail.conf:4'),
    ('listen_no_host', 'no host in ":143" of the "listen" directive', 'mail.conf:4'),
    ('listen_no_port', 'no port in "127.0.0.1" of the "listen" directive', 'mail.conf:4'),
    ('listen_port_range_reversed',
     'invalid port range in "127.0.0.1:8145-8143" of the "listen" directive',
     'mail.conf:4'),
    ('listen_rcvbuf_invalid', 'invalid rcvbuf "rcvbuf=big"', 'mail.conf:4'),
    ('listen_unix_no_path',
     'no path in the unix domain socket in "unix:" of the "listen" directive',
     'mail.conf:4'),
    ('listen_uri',
     'invalid host in "127.0.0.1:143/x" of the "listen" directive',
     'mail.conf:4'),
    ('method_invalid', 'invalid value "login"', 'mail.conf:4'),
    ('no_auth_http', 'no "auth_http" is defined for server', 'mail.conf:3'),
    ('no_events', 'no "events" section in configuration', None),
    ('no_listen', 'no "listen" is defined for server', 'mail.conf:4'),
    ('no_opening_brace', 'directive "events" has no opening "{"', 'mail.conf:1'),
    ('not_terminated',
     'directive "worker_processes" is not terminated by ";"',
     'mail.conf:2'),
    ('number_invalid', '"max_errors" directive invalid number', 'mail.conf:4'),
    ('protocol_before_ssl_order', 'unknown mail protocol for server', 'mail.conf:8'),
    ('protocol_unknown', 'unknown protocol "lmtp"', 'mail.conf:6'),
    ('resolver_both_families_off', '"ipv4" and "ipv6" cannot both be "off"', 'mail.conf:4'),
    ('resolver_duplicate', '"resolver" directive is duplicate', 'mail.conf:5'),
    ('resolver_invalid_valid', 'invalid parameter: valid=soon', 'mail.conf:4'),
    ('server_outside_mail', '"server" directive is not allowed here', 'mail.conf:2'),
    ('size_invalid', '"proxy_buffer" directive invalid value', 'mail.conf:4'),
    ('size_zero', '"imap_client_buffer" directive invalid value', 'mail.conf:4'),
    ('ssl_directive_removed', 'unknown directive "ssl"', 'mail.conf:4'),
    ('ssl_fewer_keys',
     'no "ssl_certificate_key" is defined for certificate "b.pem" and the "listen ... ssl" '
     'directive',
     'mail.conf:8'),
    ('ssl_listen_no_certificate',
     'no "ssl_certificate" is defined for the "listen ... ssl" directive',
     'mail.conf:5'),
    ('ssl_session_cache_invalid', 'invalid session cache "shared:x"', 'mail.conf:4'),
    ('ssl_session_cache_too_small',
     'session cache "shared:x:1k" is too small',
     'mail.conf:4'),
    ('ssl_verify_client_no_ca',
     'no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client',
     None),
    ('starttls_no_key',
     'no "ssl_certificate_key" is defined for the "starttls" directive',
     'mail.conf:4'),
    ('text_after_quote', 'unexpected "e"', 'mail.conf:4'),
    ('time_ms_in_seconds', '"ssl_session_timeout" directive invalid value', 'mail.conf:4'),
    ('time_multiline_directive', '"timeout" directive invalid value', 'mail.conf:6'),
    ('time_units_out_of_order', '"timeout" directive invalid value', 'mail.conf:4'),
    ('too_few_arguments',
     'invalid number of arguments in "timeout" directive',
     'mail.conf:4'),
    ('too_long_quoted',
     'too long parameter, probably missing terminating """ character',
     'mail.conf:2'),
    ('too_long_token', 'too long parameter "xxxxxxxxxx..." started', 'mail.conf:2'),
    ('too_many_arguments',
     'invalid number of arguments in "server_name" directive',
     'mail.conf:4'),
    ('unexpected_close_brace_directive', 'unexpected "}"', 'mail.conf:4'),
    ('unexpected_close_brace_top', 'unexpected "}"', 'mail.conf:2'),
    ('unexpected_open_brace', 'unexpected "{"', 'mail.conf:3'),
    ('unexpected_semicolon', 'unexpected ";"', 'mail.conf:2'),
    ('unknown_directive', 'unknown directive "foo"', 'mail.conf:2'),
    ('unknown_mail_protocol', 'unknown mail protocol for server', 'mail.conf:4'),
    ('worker_connections_invalid', 'invalid number "many"', 'mail.conf:2'),
    ('worker_connections_not_enough',
     '2 worker_connections are not enough for 2 listening sockets',
     None),
    ('worker_processes_invalid',
     '"worker_processes" directive invalid value',
     'mail.conf:1'),
]


def expected(case: str, message: str, position: str | None) -> str:
    folder = CONFIGS / case
    message = message.replace('{d}', str(folder))
    return message if position is None else '%s in %s/%s' % (message, folder, position)


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize('case, message, position', CASES, ids=[c[0] for c in CASES])
def test_broken_configuration(case, message, position):
    with pytest.raises(ConfigError) as info:
        load(str(CONFIGS / case / 'mail.conf'))
    assert str(info.value) == expected(case, message, position)


def test_user_lookup_errors():
    """nginx ngx_set_user: only as root; the group defaults to the user's own name."""
    path = CONFIGS / 'user_unknown' / 'mail.conf'
    if os.geteuid() != 0:
        config = load(str(path))
        assert config.warnings == [
            'the "user" directive makes sense only if the master process runs with '
            'super-user privileges, ignored in %s:1' % path]
        return
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == 'getpwnam("nosuchuser") failed in %s:1' % path


def test_user_group_defaults_to_user_name():
    import grp
    import pwd
    path = CONFIGS / 'user_group_defaults_to_name' / 'mail.conf'
    pwd.getpwnam('nobody')
    try:
        grp.getgrnam('nobody')
        has_group = True
    except KeyError:
        has_group = False
    if os.geteuid() != 0 or has_group:
        assert load(str(path)).main.user is None or has_group
        return
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == 'getgrnam("nobody") failed in %s:1' % path


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'gmailproxy', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


CLI_CASES = ['unknown_directive', 'include_error_inside', 'no_auth_http', 'no_events',
             'too_long_quoted', 'listen_duplicate']


@pytest.mark.parametrize('case', CLI_CASES)
def test_cli_test_mode_reports_and_fails(case):
    row = next(r for r in CASES if r[0] == case)
    path = CONFIGS / case / 'mail.conf'
    result = run_cli('-t', str(path))
    assert result.returncode == 1
    assert result.stdout == ''
    assert result.stderr.splitlines()[-2:] == [
        'gmailproxy: [emerg] %s' % expected(*row),
        'gmailproxy: configuration file %s test failed' % path]


def test_cli_start_with_broken_configuration_stops_before_listening():
    """Without -t, a broken file ends the start with the one [emerg] line and exit 1;
    listeners are only opened once the whole configuration has loaded."""
    folder = CONFIGS / 'protocol_before_ssl_order'
    result = run_cli(str(folder / 'mail.conf'))
    assert result.returncode == 1
    assert result.stderr == ('gmailproxy: [emerg] unknown mail protocol for server in '
                             '%s/mail.conf:8\n' % folder)
