"""Good configurations: values, defaults, inheritance, includes, listen forms."""
import logging
import os
import resource
import socket
from pathlib import Path

import pytest

from gmailproxy.config.parser import load
from gmailproxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(folder: Path, text: str, name: str = 'mail.conf') -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mail(body: str, head: str = 'events { }\n') -> str:
    return head + 'mail {\n    auth_http 127.0.0.1:9000/auth;\n' + body + '}\n'


def test_nginx_documentation_example_loads():
    config = load(str(ROOT / 'conf' / 'nginx-example.conf'))
    assert [(c.protocol, [l.addr_text for l in c.listen]) for c in config.servers] == [
        ('smtp', ['0.0.0.0:25']), ('pop3', ['0.0.0.0:110']), ('imap', ['0.0.0.0:143']),
        ('smtp', ['0.0.0.0:587'])]
    smtp, pop3, imap, _ = config.servers
    assert smtp.server_name == 'mail.example.com'
    assert smtp.smtp_capabilities == ('SIZE 10485760', 'ENHANCEDSTATUSCODES', '8BITMIME', 'DSN')
    assert smtp.smtp_auth == ('login', 'plain', 'cram-md5')
    assert smtp.xclient is False
    assert pop3.pop3_auth == ('plain', 'apop', 'cram-md5')
    assert pop3.proxy_pass_error_message is True and imap.proxy_pass_error_message is False
    assert imap.imap_capabilities == ('IMAP4rev1', 'UIDPLUS', 'IDLE', 'LITERAL+', 'QUOTA')
    assert imap.auth_http.sockaddr == ('127.0.0.1', 9000)
    assert imap.auth_http.uri == b'/cgi-bin/nginx_auth_http.cgi'
    assert imap.auth_http.host_header == b'localhost'
    assert config.main.worker_processes == (os.cpu_count() or 1)
    assert config.main.worker_connections == 1024
    assert [tuple(e) for e in config.main.error_log] == [('/var/log/nginx/error.log', 'info')]
    assert imap.error_log == config.main.error_log


def test_two_level_inheritance(tmp_path):
    path = write(tmp_path, mail(
        '    timeout 5s;\n'
        '    server { listen 127.0.0.1:8143; protocol imap; timeout 1m; }\n'
        '    server { listen 127.0.0.1:8144; protocol imap; }\n'))
    first, second = load(str(path)).servers
    assert (first.timeout, second.timeout) == (60.0, 5.0)
    assert first.where('timeout') == (str(path), 5)
    assert second.where('timeout') == (str(path), 4)
    assert second.where('max_errors') == (str(path), 6)   # a default: the server's position
    assert (first.file, first.line) == (str(path), 5)


def test_defaults(tmp_path):
    conf = load(str(write(tmp_path, mail('    server { listen 127.0.0.1:8143; }\n'
                                         .replace('8143', '143'))))).servers[0]
    assert conf.protocol == 'imap'
    assert conf.timeout == 60.0
    assert conf.server_name == socket.gethostname().lower()
    assert conf.imap_client_buffer == resource.getpagesize()
    assert conf.proxy_buffer == resource.getpagesize()
    assert conf.imap_capabilities == ('IMAP4', 'IMAP4rev1', 'UIDPLUS')
    assert conf.imap_auth == ('plain',)
    assert conf.pop3_capabilities == ('TOP', 'USER', 'UIDL')
    assert conf.smtp_auth == ('plain', 'login')
    assert conf.smtp_capabilities == ()
    assert conf.max_errors == 5
    assert conf.resolver is None and conf.resolver_timeout == 30.0
    assert conf.auth_http_timeout == 60.0 and conf.proxy_timeout == 86400.0
    assert conf.xclient is True and conf.proxy_protocol == 'off'
    assert conf.starttls == 'off' and conf.ssl_protocols == ('TLSv1.2', 'TLSv1.3')
    assert conf.ssl_session_timeout == 300.0 and conf.ssl_certificate == ()
    assert conf.set_real_ip_from == () and conf.auth_http_header == ()
    assert [tuple(e) for e in conf.error_log] == [('stderr', 'error')]


def test_lists_add_up_at_one_level_and_a_server_list_replaces(tmp_path):
    config = load(str(write(tmp_path, mail(
        '    imap_capabilities A B;\n'
        '    imap_capabilities C;\n'
        '    auth_http_header X-One 1;\n'
        '    auth_http_header X-Two "2 2";\n'
        '    server { listen 127.0.0.1:8143; protocol imap; imap_capabilities D; }\n'
        '    server { listen 127.0.0.1:8144; protocol imap; auth_http_header X-S s; }\n'))))
    first, second = config.servers
    assert first.imap_capabilities == ('D',)
    assert second.imap_capabilities == ('A', 'B', 'C')
    assert first.auth_http_header == (('X-One', '1'), ('X-Two', '2 2'))
    assert second.auth_http_header == (('X-S', 's'),)


def test_methods_are_case_insensitive_canonical_and_warn_on_repeats(tmp_path, caplog):
    path = write(tmp_path, mail(
        '    imap_auth PLAIN Cram-MD5;\n'
        '    imap_auth plain LOGIN;\n'
        '    ssl_protocols tlsv1.3;\n'
        '    server { listen 127.0.0.1:8143; protocol imap; smtp_auth NONE; }\n'))
    with caplog.at_level(logging.WARNING, logger='gmailproxy'):
        config = load(str(path))
    conf = config.servers[0]
    assert conf.imap_auth == ('plain', 'cram-md5', 'login')
    assert conf.ssl_protocols == ('TLSv1.3',)
    assert conf.smtp_auth == ('none',)
    assert config.warnings == ['duplicate value "plain" in %s:5' % path]
    assert [r.getMessage() for r in caplog.records] == config.warnings


@pytest.mark.parametrize('directive, attribute, value', [
    ('timeout 500ms', 'timeout', 0.5),
    ('timeout 60', 'timeout', 60.0),
    ('timeout "1m 30s"', 'timeout', 90.0),
    ('proxy_timeout 1h30m', 'proxy_timeout', 5400.0),
    ('proxy_timeout 2w', 'proxy_timeout', 14 * 86400.0),
    ('smtp_greeting_delay 0', 'smtp_greeting_delay', 0.0),
    ('ssl_session_timeout 1d', 'ssl_session_timeout', 86400.0),
    ('ssl_session_timeout 1y', 'ssl_session_timeout', 365 * 86400.0),
    ('imap_client_buffer 16k', 'imap_client_buffer', 16384),
    ('proxy_buffer 1M', 'proxy_buffer', 1048576),
    ('smtp_client_buffer 1000', 'smtp_client_buffer', 1000),
    ('max_errors 0', 'max_errors', 0),
    ('xclient OFF', 'xclient', False),
    ('ssl_verify_client OPTIONAL', 'ssl_verify_client', 'optional'),
    ('proxy_protocol V2', 'proxy_protocol', 'v2'),
    ('server_name ""', 'server_name', socket.gethostname().lower()),
    ('auth_http_keepalive off', 'auth_http_keepalive', 0),
    ('ssl_session_cache builtin:1000 shared:MAIL:1m', 'ssl_session_cache',
     ('builtin:1000', 'shared:MAIL:1m')),
])
def test_values(tmp_path, directive, attribute, value):
    conf = load(str(write(tmp_path, mail(
        '    server { listen 127.0.0.1:8143; protocol imap; %s; }\n' % directive)))).servers[0]
    assert getattr(conf, attribute) == value


def test_last_one_wins_for_auth_http_and_protocol(tmp_path):
    conf = load(str(write(tmp_path, mail(
        '    auth_http 127.0.0.1:9001/second;\n'
        '    server { listen 127.0.0.1:8110; protocol imap; protocol pop3; }\n')))).servers[0]
    assert conf.auth_http.uri == b'/second' and conf.protocol == 'pop3'


@pytest.mark.parametrize('listens, protocol', [
    ('listen 127.0.0.1:110;', 'pop3'),
    ('listen 127.0.0.1:995;', 'pop3'),
    ('listen 127.0.0.1:993;', 'imap'),
    ('listen 127.0.0.1:465;', 'smtp'),
    ('listen 127.0.0.1:8000; listen 127.0.0.1:25;', 'smtp'),
    ('listen 127.0.0.1:143; protocol smtp;', 'smtp'),
    ('protocol pop3; listen 127.0.0.1:143;', 'pop3'),
])
def test_protocol_detected_from_first_well_known_port(tmp_path, listens, protocol):
    conf = load(str(write(tmp_path, mail('    server { %s }\n' % listens)))).servers[0]
    assert conf.protocol == protocol
    assert not any(l.ssl for l in conf.listen)     # detection never implies TLS


def test_error_log_server_then_mail_then_main(tmp_path):
    config = load(str(write(tmp_path, mail(
        '    error_log mail.log info;\n'
        '    server { listen 127.0.0.1:8143; protocol imap; error_log stderr debug;\n'
        '             error_log server.log; }\n'
        '    server { listen 127.0.0.1:8144; protocol imap; }\n',
        head='error_log main.log warn;\nevents { }\n'))), prefix=str(tmp_path))
    first, second = config.servers
    assert [tuple(e) for e in config.main.error_log] == [(str(tmp_path / 'main.log'), 'warn')]
    assert [tuple(e) for e in first.error_log] == [('stderr', 'debug'),
                                                   (str(tmp_path / 'server.log'), 'error')]
    assert [tuple(e) for e in second.error_log] == [(str(tmp_path / 'mail.log'), 'info')]
    without = load(str(write(tmp_path, mail(
        '    server { listen 127.0.0.1:8143; protocol imap; }\n',
        head='error_log main.log warn;\nevents { }\n'), 'other.conf')),
                   prefix=str(tmp_path)).servers[0]
    assert without.error_log == config.main.error_log


def test_include_is_relative_to_the_main_file_folder(tmp_path):
    write(tmp_path, 'server { listen 127.0.0.1:8143; protocol imap; }\ninclude b.conf;\n',
          'sub/a.conf')
    write(tmp_path, 'server { listen 127.0.0.1:8144; protocol pop3; }\n', 'b.conf')
    path = write(tmp_path, mail('    include sub/a.conf;\n'))
    config = load(str(path), prefix='/')
    assert [c.file for c in config.servers] == [str(tmp_path / 'sub/a.conf'),
                                                str(tmp_path / 'b.conf')]
    assert config.files == [str(path), str(tmp_path / 'sub/a.conf'), str(tmp_path / 'b.conf')]


def test_include_glob_sorted_and_empty_match(tmp_path):
    for name, port in (('20-b.conf', 8120), ('10-a.conf', 8110), ('30-c.conf', 8130)):
        write(tmp_path, 'server { listen 127.0.0.1:%d; protocol imap; }\n' % port,
              'servers/' + name)
    path = write(tmp_path, mail('    include servers/*.conf;\n    include nothing/*.conf;\n'))
    config = load(str(path))
    assert [c.listen[0].port for c in config.servers] == [8110, 8120, 8130]


def test_relative_path_and_prefix(tmp_path):
    write(tmp_path, mail('    server { listen 127.0.0.1:8143; protocol imap;\n'
                         '             ssl_dhparam dh.pem; }\n',
                         head='pid run/gp.pid;\nevents { }\n'), 'conf/mail.conf')
    config = load('conf/mail.conf', prefix=str(tmp_path))
    assert config.path == str(tmp_path / 'conf/mail.conf')
    assert config.prefix == str(tmp_path)
    assert config.main.pid == str(tmp_path / 'run/gp.pid')              # the prefix
    assert config.servers[0].ssl_dhparam == str(tmp_path / 'conf/dh.pem')  # conf folder


def test_global_directives_from_the_command_line(tmp_path):
    path = write(tmp_path, mail('    server { listen 127.0.0.1:8143; protocol imap; }\n'))
    assert load(str(path), extra='worker_processes 3; daemon off;').main.worker_processes == 3
    with pytest.raises(ConfigError) as info:
        load(str(path), extra='worker_processes 3; foo;')
    assert str(info.value) == 'unknown directive "foo" in command line'
    path = write(tmp_path, 'worker_processes 2;\n' + path.read_text(), 'two.conf')
    with pytest.raises(ConfigError) as info:
        load(str(path), extra='worker_processes 3;')
    assert str(info.value) == '"worker_processes" directive is duplicate in %s:1' % path


def test_http_and_stream_blocks_are_skipped_with_a_warning(tmp_path):
    path = write(tmp_path, 'load_module modules/a.so;\nload_module modules/b.so;\n'
                 'events { worker_connections 64; use epoll; }\n'
                 'http {\n    server { listen 80; location / { return 200 "}"; } }\n'
                 '    include /nonexistent/*.conf;\n}\n'
                 'stream { upstream x { server 127.0.0.1:1; } }\n' + mail(
                     '    server { listen 127.0.0.1:8143; protocol imap; }\n', head=''))
    config = load(str(path))
    assert config.warnings == ['the "http" block is ignored in %s:4' % path,
                               'the "stream" block is ignored in %s:8' % path]
    assert len(config.servers) == 1 and config.main.worker_connections == 64


def test_main_and_events_values(tmp_path):
    config = load(str(write(tmp_path, mail(
        '    server { listen 127.0.0.1:8143; protocol imap; }\n',
        head='worker_processes 4;\ndaemon off;\nworker_shutdown_timeout 10s;\n'
             'worker_rlimit_nofile 4096;\nevents { }\n'))))
    main = config.main
    assert (main.worker_processes, main.daemon, main.master_process) == (4, False, True)
    assert main.worker_shutdown_timeout == 10.0
    assert main.worker_rlimit_nofile == 4096
    assert main.worker_connections == 512
    assert main.pid is None and main.user is None


def test_listen_forms(tmp_path):
    conf = load(str(write(tmp_path, mail(
        '    server {\n'
        '        listen 8143;\n'
        '        listen *:8144;\n'
        '        listen 127.0.0.1:8145-8147;\n'
        '        listen [::1]:8143;\n'
        '        listen [::]:8144;\n'
        '        listen localhost:8148;\n'
        '        listen unix:%s/imap.sock;\n'
        '        protocol imap;\n'
        '    }\n' % tmp_path)))).servers[0]
    assert [(l.addr_text, l.wildcard, l.line) for l in conf.listen] == [
        ('0.0.0.0:8143', True, 5), ('0.0.0.0:8144', True, 6),
        ('127.0.0.1:8145', False, 7), ('127.0.0.1:8146', False, 7),
        ('127.0.0.1:8147', False, 7), ('[::1]:8143', False, 8), ('[::]:8144', True, 9),
        ('127.0.0.1:8148', False, 10), ('unix:%s/imap.sock' % tmp_path, False, 11)]
    assert conf.listen[5].sockaddr == ('::1', 8143, 0, 0)
    assert conf.listen[5].family == socket.AF_INET6
    assert conf.listen[-1].sockaddr == '%s/imap.sock' % tmp_path
    assert conf.listen[-1].port is None
    assert all(l.server is conf for l in conf.listen)


@pytest.fixture
def no_tls_files(monkeypatch):
    """The TLS module reads certificate files at load; these tests are about parsing."""
    import gmailproxy.ssl
    monkeypatch.setattr(gmailproxy.ssl, 'finalize', lambda conf: None, raising=False)


def test_listen_parameters(tmp_path, no_tls_files):
    conf = load(str(write(tmp_path, mail(
        '    server {\n'
        '        listen 127.0.0.1:8993 ssl proxy_protocol;\n'
        '        listen 127.0.0.1:8994 backlog=10 rcvbuf=8k sndbuf=16k so_keepalive=30m::10;\n'
        '        listen [::]:8995 ipv6only=off so_keepalive=off;\n'
        '        listen 127.0.0.1:8996 so_keepalive=on bind;\n'
        '        listen 127.0.0.1:8997 multipath;\n'
        '        protocol imap;\n'
        '        ssl_certificate a.pem;\n'
        '        ssl_certificate_key a.key;\n'
        '    }\n')))).servers[0]
    a, b, c, d, e = conf.listen
    assert (a.ssl, a.proxy_protocol, a.bind, a.backlog) == (True, True, False, 511)
    assert (b.backlog, b.rcvbuf, b.sndbuf, b.so_keepalive, b.bind) == \
        (10, 8192, 16384, (1800, None, 10), True)
    assert (b.ssl, b.proxy_protocol) == (False, False)
    assert (c.ipv6only, c.so_keepalive, c.bind) == (False, False, True)
    assert (a.ipv6only, a.so_keepalive, a.rcvbuf) == (True, None, None)
    assert (d.so_keepalive, d.bind) == (True, True)
    assert (e.multipath, e.bind) == (True, True)
    assert conf.ssl_certificate == (str(tmp_path / 'a.pem'),)


def test_wildcard_and_specific_address_are_not_duplicates(tmp_path):
    config = load(str(write(tmp_path, mail(
        '    server { listen 8143; protocol imap; }\n'
        '    server { listen 127.0.0.1:8143; protocol pop3; }\n'
        '    server { listen [::1]:8143; protocol smtp; }\n'))))
    assert [c.protocol for c in config.servers] == ['imap', 'pop3', 'smtp']


def test_starttls_with_certificates_is_accepted(tmp_path, no_tls_files):
    config = load(str(write(tmp_path, mail(
        '    starttls on;\n    ssl_certificate data:abc;\n    ssl_certificate_key k.pem;\n'
        '    ssl_verify_client optional_no_ca;\n'
        '    server { listen 127.0.0.1:8143; protocol imap; }\n'
        '    server { listen 127.0.0.1:8144; protocol imap; starttls off;\n'
        '             ssl_certificate_key a.pem; ssl_certificate_key b.pem; }\n'))))
    first, second = config.servers
    assert first.ssl_certificate == ('data:abc',)
    assert first.ssl_certificate_key == (str(tmp_path / 'k.pem'),)
    assert second.starttls == 'off'


def test_every_protocol_module_finalizes_every_server(tmp_path, monkeypatch):
    import gmailproxy.protocols.imap
    import gmailproxy.protocols.pop3
    import gmailproxy.protocols.smtp
    seen = []
    for module in (gmailproxy.protocols.pop3, gmailproxy.protocols.imap,
                   gmailproxy.protocols.smtp):
        monkeypatch.setattr(module, 'finalize',
                            lambda conf, name=module.NAME: seen.append((name, conf.protocol)))
    load(str(write(tmp_path, mail('    server { listen 127.0.0.1:143; }\n'
                                  '    server { listen 127.0.0.1:25; }\n'))))
    assert seen == [('pop3', 'imap'), ('pop3', 'smtp'), ('imap', 'imap'), ('imap', 'smtp'),
                    ('smtp', 'imap'), ('smtp', 'smtp')]


def test_resolver_and_real_ip_values(tmp_path):
    config = load(str(write(tmp_path, mail(
        '    resolver 127.0.0.1 [::1]:5353 valid=30s ipv6=off;\n'
        '    set_real_ip_from 10.0.0.0/8;\n'
        '    set_real_ip_from 192.168.1.1/24;\n'
        '    set_real_ip_from unix:;\n'
        '    server { listen 127.0.0.1:8143; protocol imap; }\n'))))
    conf = config.servers[0]
    assert conf.resolver.addresses == (('127.0.0.1', 53), ('::1', 5353))
    assert (conf.resolver.valid, conf.resolver.ipv4, conf.resolver.ipv6) == (30.0, True, False)
    assert [[str(n) for n in item] for item in conf.set_real_ip_from] == [
        ['10.0.0.0/8'], ['192.168.1.0/24'], ['unix:']]
    assert config.warnings == ['low address bits of 192.168.1.1/24 are meaningless in %s:6'
                               % (tmp_path / 'mail.conf')]


def test_loading_is_repeatable_and_independent(tmp_path):
    path = write(tmp_path, mail('    server { listen 127.0.0.1:8143; protocol imap; }\n'))
    first, second = load(str(path)), load(str(path))
    assert first.servers[0] is not second.servers[0]
    assert first.servers[0].listen[0].server is first.servers[0]
