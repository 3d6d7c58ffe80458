"""Listening sockets: address forms, socket options read back, wildcard sharing, errors."""
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gmailproxy.config.parser import load
from gmailproxy.errors import ConfigError
from gmailproxy.listeners import close_listeners, open_listeners, plan

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 5


def free_port(host: str = '127.0.0.1') -> int:
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def config_for(tmp_path: Path, servers: str, head: str = 'events { }\n'):
    path = tmp_path / 'mail.conf'
    path.write_text(head + 'mail {\n    auth_http 127.0.0.1:9000/auth;\n' + servers + '}\n')
    return load(str(path))


@pytest.fixture
def bounds():
    opened = []
    yield opened
    close_listeners(opened)


def opened(bounds, config):
    bounds += open_listeners(config)
    return bounds


def option(sock, level, name) -> int:
    return sock.getsockopt(level, name)


def ss_backlog(port: int) -> int | None:
    """A listening socket's backlog is not readable with getsockopt; ``ss`` shows it as
    Send-Q. None when ss is missing."""
    if shutil.which('ss') is None:
        return None
    out = subprocess.run(['ss', '-Hltn', 'sport = :%d' % port], capture_output=True,
                         text=True, timeout=TIMEOUT).stdout.split()
    return int(out[2])


def test_ipv4_with_every_parameter(tmp_path, bounds):
    port = free_port()
    config = config_for(tmp_path, '    server { listen 127.0.0.1:%d backlog=7 rcvbuf=64k '
                        'sndbuf=32k so_keepalive=2m:30s:4; protocol imap; }\n' % port)
    [bound] = opened(bounds, config)
    sock = bound.sock
    assert sock.family == socket.AF_INET and sock.getsockname() == ('127.0.0.1', port)
    assert sock.getblocking() is False
    assert option(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert option(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert option(sock, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536   # Linux doubles
    assert option(sock, socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 32768
    assert option(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert option(sock, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 120
    assert option(sock, socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 30
    assert option(sock, socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    assert ss_backlog(port) in (7, None)
    assert bound.listens == list(config.servers[0].listen)


def test_defaults_and_keepalive_off(tmp_path, bounds):
    p1, p2 = free_port(), free_port()
    config = config_for(tmp_path, '    server { listen 127.0.0.1:%d; listen 127.0.0.1:%d '
                        'so_keepalive=on; protocol imap; }\n' % (p1, p2))
    first, second = opened(bounds, config)
    assert option(first.sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    assert option(second.sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert ss_backlog(p1) in (511, None)
    with socket.create_connection(('127.0.0.1', p2), timeout=TIMEOUT):
        first.sock.settimeout(0)
        second.sock.settimeout(TIMEOUT)
        conn, _ = second.sock.accept()
        with conn:      # accepted sockets inherit SO_KEEPALIVE
            assert option(conn, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_ipv6_loopback_and_v6only(tmp_path, bounds):
    port = free_port('::1')
    config = config_for(tmp_path, '    server { listen [::1]:%d so_keepalive=off; '
                        'protocol smtp; }\n' % port)
    [bound] = opened(bounds, config)
    assert bound.sock.family == socket.AF_INET6
    assert bound.sock.getsockname()[:2] == ('::1', port)
    assert option(bound.sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert option(bound.sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    with socket.create_connection(('::1', port), timeout=TIMEOUT):
        pass


def test_ipv6_wildcard_without_v6only_accepts_ipv4(tmp_path, bounds):
    port = free_port()
    config = config_for(tmp_path, '    server { listen [::]:%d ipv6only=off; protocol imap; }\n'
                        % port)
    [bound] = opened(bounds, config)
    assert option(bound.sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    bound.sock.settimeout(TIMEOUT)
    with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT):
        conn, peer = bound.sock.accept()
        with conn:
            local = conn.getsockname()
    assert peer[0] == '::ffff:127.0.0.1'
    assert bound.route(local) is bound.listens[0]


def test_unix_socket_file_mode_and_removal(tmp_path, bounds):
    path = tmp_path / 'imap.sock'
    config = config_for(tmp_path, '    server { listen unix:%s; protocol imap; }\n' % path)
    [bound] = open_listeners(config)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(path))
        assert bound.route('') is bound.listens[0]
    finally:
        close_listeners([bound])
    assert not path.exists()


def test_stale_unix_socket_is_replaced(tmp_path, bounds):
    path = tmp_path / 'stale.sock'
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(path))
    left.close()                        # the file stays, nobody listens
    config = config_for(tmp_path, '    server { listen unix:%s; protocol pop3; }\n' % path)
    [bound] = opened(bounds, config)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)
        client.connect(str(path))


def test_live_unix_socket_and_regular_file_are_kept(tmp_path):
    live = tmp_path / 'live.sock'
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(live))
    other.listen()
    plain = tmp_path / 'plain.sock'
    plain.write_text('data')
    try:
        for path in (live, plain):
            config = config_for(tmp_path, '    server { listen unix:%s; protocol pop3; }\n'
                                % path)
            with pytest.raises(ConfigError) as info:
                open_listeners(config)
            assert str(info.value) == \
                'bind() to unix:%s failed (98: Address already in use)' % path
        assert plain.read_text() == 'data'
    finally:
        other.close()


def test_wildcard_shares_its_socket_and_routes_by_local_address(tmp_path, bounds):
    port = free_port()
    config = config_for(tmp_path,
                        '    server { listen %d; protocol imap; }\n'
                        '    server { listen 127.0.0.1:%d; protocol pop3; }\n' % (port, port))
    imap, pop3 = config.servers
    [bound] = opened(bounds, config)
    assert bound.sock.getsockname() == ('0.0.0.0', port)
    assert bound.listens == [imap.listen[0], pop3.listen[0]]
    bound.sock.settimeout(TIMEOUT)
    routed = {}
    for host in ('127.0.0.1', '127.0.0.2'):
        with socket.create_connection((host, port), timeout=TIMEOUT):
            conn, _ = bound.sock.accept()
            with conn:
                routed[host] = bound.route(conn.getsockname()).server.protocol
    assert routed == {'127.0.0.1': 'pop3', '127.0.0.2': 'imap'}


def test_plan_groups_by_family_and_port():
    from gmailproxy.config.values import listen

    class Ctx:
        cache, listens, file, line = {}, {}, 'f', 1

        def warn(self, msg, level='warn'):
            raise AssertionError(msg)
    ctx = Ctx()
    ls = [listen([a, *p], ctx)[0] for a, *p in (
        ('143',), ('127.0.0.1:143',), ('127.0.0.2:143', 'bind'), ('127.0.0.3:143', 'backlog=5'),
        ('[::]:143',), ('[::1]:143',), ('127.0.0.1:110',), ('127.0.0.2:110',),
        ('unix:/tmp/x.sock',))]
    groups = [[l.addr_text for l in g] for g in plan(ls)]
    assert groups == [
        ['127.0.0.2:143'], ['127.0.0.3:143'], ['0.0.0.0:143', '127.0.0.1:143'],
        ['[::]:143', '[::1]:143'], ['127.0.0.1:110'], ['127.0.0.2:110'],
        ['unix:/tmp/x.sock']]


def test_bind_with_a_wildcard_on_the_same_port_fails_on_linux_as_in_nginx(tmp_path):
    """Linux refuses a wildcard listener next to a listening specific address; nginx binds
    the specific ``bind`` addresses first and reports the wildcard."""
    port = free_port()
    config = config_for(tmp_path,
                        '    server { listen %d; protocol imap; }\n'
                        '    server { listen 127.0.0.1:%d bind; protocol pop3; }\n'
                        % (port, port))
    with pytest.raises(ConfigError) as info:
        open_listeners(config)
    assert str(info.value) == 'bind() to 0.0.0.0:%d failed (98: Address already in use)' % port
    with socket.create_server(('127.0.0.1', port)):     # everything was closed again
        pass


def test_port_in_use(tmp_path):
    with socket.create_server(('127.0.0.1', 0)) as taken:
        port = taken.getsockname()[1]
        config = config_for(tmp_path, '    server { listen 127.0.0.1:%d; protocol imap; }\n'
                            % port)
        with pytest.raises(ConfigError) as info:
            open_listeners(config)
        assert str(info.value) == \
            'bind() to 127.0.0.1:%d failed (98: Address already in use)' % port


def test_port_in_use_from_the_command_line(tmp_path):
    with socket.create_server(('127.0.0.1', 0)) as taken:
        port = taken.getsockname()[1]
        config_for(tmp_path, '    server { listen 127.0.0.1:%d; protocol imap; }\n' % port)
        result = subprocess.run([sys.executable, '-m', 'gmailproxy', str(tmp_path / 'mail.conf')],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == \
        'gmailproxy: [emerg] bind() to 127.0.0.1:%d failed (98: Address already in use)\n' % port


def test_multipath(tmp_path, bounds):
    port = free_port()
    config = config_for(tmp_path, '    server { listen 127.0.0.1:%d multipath; protocol imap; }\n'
                        % port)
    try:
        [bound] = opened(bounds, config)
    except ConfigError as e:        # a kernel without MPTCP: nginx's socket() error
        assert str(e).startswith('socket() 127.0.0.1:%d failed (' % port)
        return
    assert bound.sock.proto == socket.IPPROTO_MPTCP
    with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT):
        pass

