"""Operating gmailproxy as nginx is operated: master and workers, signals, logs (issue 4).

gmailproxy runs as a subprocess (``python -m gmailproxy``); the auth service
(RecordingAuthServer) and the IMAP backend (FakeBackend) run in this process.
"""
import base64
import functools
import imaplib
import os
import re
import signal
import socket
import time
from pathlib import Path

import gevent
import pytest

from tests.support import procs
from tests.support.clients import imap_capabilities, imap_login
from tests.support.fake_backend import FakeBackend
from tests.support.net import Client, free_port, free_ports, port_open
from tests.support.procs import alive, children
from tests.support.proxyproc import run_cli

PASSWORD = 'Pw-5ecret-Zq9'        # grepped for in every log at the end of each test
WRONG = 'Wr0ng-Pa55-Xk7'
CONF = '''
worker_processes %(workers)d;
%(main)s
events { worker_connections %(connections)d; }
mail {
    auth_http %(auth)s;
    timeout %(timeout)s;
    %(mail)s
    server {
        listen 127.0.0.1:%(port)d;
        protocol imap;
        %(server)s
    }
}
'''
WAIT = 5.0                        # seconds a wait or an IMAP login here may take
STAMP = r'\d{4}/\d\d/\d\d \d\d:\d\d:\d\d'


def conf(auth, port, workers=2, connections=64, timeout='5s', main='', mail='',
         server=''):
    return CONF % dict(workers=workers, connections=connections, auth=auth.url,
                       timeout=timeout, port=port, main=main, mail=mail, server=server)


@pytest.fixture
def backend(request):
    b = FakeBackend('imap')
    yield b
    b.stop()


@pytest.fixture
def users(auth, backend):
    auth.users = {'alice': {'password': PASSWORD}}
    auth.ports = {'imap': backend.port}
    return auth


@pytest.fixture
def no_password_in_logs(tmp_path):
    """After the test: no log, console output or rotated log under tmp_path holds a
    password used, in clear or in base64 (AUTHENTICATE PLAIN data)."""
    yield
    secrets = [PASSWORD, WRONG]
    secrets += [base64.b64encode(b'\0alice\0' + p.encode()).decode() for p in secrets]
    for path in tmp_path.rglob('*'):
        if path.is_file() and path.suffix != '.conf':
            text = path.read_text(errors='replace')
            for secret in secrets:
                assert secret not in text, 'password in %s' % path


login = functools.partial(imap_login, user='alice', password=PASSWORD, timeout=WAIT)
wait_for = functools.partial(procs.wait_for, timeout=WAIT)


def title(pid: int) -> str:
    return Path('/proc/%d/cmdline' % pid).read_bytes().replace(b'\0', b' ').decode().strip()


def count(text: str, needle: str) -> int:
    return text.count(needle)


# Process model


def test_master_and_workers_titles_and_pid_file(gmailproxy, users, tmp_path,
                                                no_password_in_logs):
    port = free_port()
    pid_file = tmp_path / 'run' / 'gp.pid'
    pid_file.parent.mkdir()
    proxy = gmailproxy(conf(users, port, main='pid %s;' % pid_file), ports=[port])
    # the sockets are open (and accept) a moment before the pid file is written
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), what='the pid file')
    assert pid_file.read_text() == '%d\n' % proxy.pid
    workers = procs.two_workers(proxy.pid, WAIT)
    assert title(proxy.pid).startswith('gmailproxy: master process ')
    assert str(proxy.conf) in title(proxy.pid)
    assert [title(w) for w in workers] == ['gmailproxy: worker process'] * 2
    log = proxy.wait_log('start worker process %d' % workers[1])
    assert re.search(r'^%s \[notice\] %d#%d: start worker processes$'
                     % (STAMP, proxy.pid, proxy.pid), log, re.M)
    with login(port) as imap:
        assert imap.noop()[0] == 'OK'
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait(5) == 0
    assert not pid_file.exists()
    assert not any(alive(w) for w in workers)
    assert re.search(r'\[notice\] %d#%d: exit$' % (proxy.pid, proxy.pid),
                     proxy.log_text(), re.M)


def test_worker_killed_is_replaced_and_logged(gmailproxy, users, no_password_in_logs):
    port = free_port()
    proxy = gmailproxy(conf(users, port), ports=[port])
    workers = procs.two_workers(proxy.pid, WAIT)
    os.kill(workers[0], signal.SIGKILL)
    log = proxy.wait_log('worker process %d exited on signal 9' % workers[0])
    assert re.search(r'^%s \[alert\] %d#%d: worker process %d exited on signal 9$'
                     % (STAMP, proxy.pid, proxy.pid, workers[0]), log, re.M)
    now = wait_for(lambda: (len(children(proxy.pid)) == 2 and workers[0] not in
                            children(proxy.pid) and children(proxy.pid)),
                   what='a new worker')
    new = (set(now) - set(workers)).pop()
    proxy.wait_log('start worker process %d' % new)
    for _ in range(4):
        with login(port) as imap:
            assert imap.noop()[0] == 'OK'


def test_master_killed_leaves_no_worker(gmailproxy, users):
    port = free_port()
    proxy = gmailproxy(conf(users, port), ports=[port])
    workers = procs.two_workers(proxy.pid, WAIT)
    imap = login(port)      # a worker busy with a session dies too
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.wait(5)
    wait_for(lambda: not any(alive(w) for w in workers), what='the workers to die')
    assert not port_open('127.0.0.1', port)
    imap.shutdown()


def test_worker_connections_excess_closed_and_logged(gmailproxy, users,
                                                     no_password_in_logs):
    # one listening socket counts as one of the worker's 3 connections: 2 sessions fit
    port = free_port()
    proxy = gmailproxy(conf(users, port, workers=1, connections=3), ports=[port])
    held = [login(port), login(port)]
    with Client('127.0.0.1', port) as extra:
        assert extra.closed(timeout=3)
    log = proxy.wait_log('worker_connections are not enough')
    assert re.search(r'^%s \[alert\] \d+#\d+: 3 worker_connections are not enough while '
                     r'accepting new connection on 127\.0\.0\.1:%d$' % (STAMP, port), log,
                     re.M)
    for imap in held:
        assert imap.noop()[0] == 'OK'
        imap.logout()
    with login(port) as imap:       # room again
        assert imap.noop()[0] == 'OK'


def test_master_process_off_serves_and_reloads(gmailproxy, users, no_password_in_logs):
    port = free_port()
    proxy = gmailproxy(conf(users, port, main='master_process off;'), ports=[port])
    assert children(proxy.pid) == []
    held = login(port)
    proxy.write_conf(conf(users, port, main='master_process off;',
                          mail='imap_capabilities IMAP4rev1 XSINGLE;'))
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('signal 1 (SIGHUP) received, reconfiguring')
    wait_for(lambda: 'XSINGLE' in imap_capabilities(port), what='the new configuration')
    with login(port) as imap:
        assert imap.noop()[0] == 'OK'
    assert held.noop()[0] == 'OK'       # the old session goes on
    proxy.signal(signal.SIGQUIT)
    gevent.sleep(0.3)
    assert held.noop()[0] == 'OK'
    held.logout()
    assert proxy.wait(5) == 0


# Signals


def test_quit_graceful_stop_with_open_sessions(gmailproxy, users, no_password_in_logs):
    port = free_port()
    proxy = gmailproxy(conf(users, port), ports=[port])
    workers = procs.two_workers(proxy.pid, WAIT)
    sessions = [login(port) for _ in range(6)]
    proxy.signal(signal.SIGQUIT)
    log = proxy.wait_log('signal 3 (SIGQUIT) received, shutting down')
    wait_for(lambda: count(proxy.log_text(), 'gracefully shutting down') == 2,
             what='both workers to stop accepting')
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(('127.0.0.1', port), timeout=2)
    gevent.sleep(0.3)
    # a worker without sessions is gone already, one with sessions waits for them
    assert proxy.running and any(alive(w) for w in workers)
    for imap in sessions:
        assert imap.noop()[0] == 'OK'
        assert imap.logout()[0] == 'BYE'
    assert proxy.wait(5) == 0
    log = proxy.log_text()
    assert count(log, 'proxied session done') == 6
    assert 'shutdown timeout' not in log
    for w in workers:
        assert 'worker process %d exited with code 0' % w in log


def test_quit_closes_sessions_after_worker_shutdown_timeout(gmailproxy, users,
                                                            no_password_in_logs):
    port = free_port()
    proxy = gmailproxy(conf(users, port, workers=1, main='worker_shutdown_timeout 500ms;'),
                       ports=[port])
    imap = login(port)
    started = time.monotonic()
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait(5) == 0
    assert 0.4 < time.monotonic() - started < 4
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        imap.noop()
    assert re.search(r'^%s \[info\] \d+#\d+: \*\d+ shutdown timeout while proxying, '
                     r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, login: "alice", '
                     r'upstream: 127\.0\.0\.1:\d+$' % (STAMP, port), proxy.log_text(), re.M)


def test_term_stops_at_once(gmailproxy, users):
    port = free_port()
    proxy = gmailproxy(conf(users, port), ports=[port])
    workers = procs.two_workers(proxy.pid, WAIT)
    imap = login(port)
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(5) == 0
    assert time.monotonic() - started < 3
    assert not any(alive(w) for w in workers)
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        imap.noop()
    assert 'signal 15 (SIGTERM) received, exiting' in proxy.log_text()


def test_usr1_reopens_moved_log(gmailproxy, users, no_password_in_logs):
    port = free_port()
    proxy = gmailproxy(conf(users, port), ports=[port])
    proxy.wait_log('start worker processes')
    with login(port) as imap:
        imap.noop()
    proxy.wait_log('proxied session done')
    rotated = proxy.error_log.with_name('error.log.1')
    proxy.error_log.rename(rotated)
    proxy.signal(signal.SIGUSR1)
    # each process logs "reopening logs" (to the old file), then reopens
    wait_for(lambda: count(rotated.read_text(), 'reopening logs') == 3,
             what='the master and both workers to reopen')
    with login(port) as imap:
        imap.noop()
    new = proxy.wait_log('proxied session done')
    assert 'client logged in' in new
    old = rotated.read_text()
    assert 'signal 10 (SIGUSR1) received, reopening logs' in old
    assert count(old, 'proxied session done') == 1
    assert count(new, 'proxied session done') == 1


def test_cli_signals_through_pid_file(gmailproxy, users, tmp_path, no_password_in_logs):
    port = free_port()
    pid_file = tmp_path / 'gp.pid'
    text = conf(users, port, main='pid %s;' % pid_file)
    proxy = gmailproxy(text, ports=[port])
    proxy.wait_log('start worker processes')
    result = run_cli(['-s', 'reload', proxy.conf], cwd=proxy.dir)
    assert result.returncode == 0, result.stderr
    proxy.wait_log('signal 1 (SIGHUP) received, reconfiguring')
    result = run_cli(['-s', 'reopen', proxy.conf], cwd=proxy.dir)
    assert result.returncode == 0, result.stderr
    proxy.wait_log('signal 10 (SIGUSR1) received, reopening logs')
    result = run_cli(['-s', 'quit', proxy.conf], cwd=proxy.dir)
    assert result.returncode == 0, result.stderr
    assert proxy.wait(5) == 0
    assert not pid_file.exists()
    result = run_cli(['-s', 'stop', proxy.conf], cwd=proxy.dir)
    assert result.returncode == 1
    assert 'gp.pid" failed (2: No such file or directory)' in result.stderr


def test_watch_reloads_when_an_included_file_changes(gmailproxy, users, tmp_path,
                                                     no_password_in_logs):
    port = free_port()
    included = tmp_path / 'proxy0' / 'caps.conf'
    included.parent.mkdir()
    included.write_text('imap_capabilities IMAP4rev1 XFIRST;\n')
    proxy = gmailproxy(conf(users, port, mail='include caps.conf;'), ports=[port],
                       args=['--watch'])
    proxy.wait_log('start worker processes')
    assert 'XFIRST' in imap_capabilities(port)
    gevent.sleep(0.3)       # the watcher is running (it starts with the master)
    tmp = included.with_suffix('.tmp')
    tmp.write_text('imap_capabilities IMAP4rev1 XSECOND;\n')
    tmp.rename(included)    # as editors save
    proxy.wait_log('configuration file changed, reconfiguring', timeout=10)
    wait_for(lambda: 'XSECOND' in imap_capabilities(port), what='the new capabilities')
    proxy.error_log.write_text(proxy.log_text() + 'x\n')   # not a configuration file
    gevent.sleep(0.8)
    assert count(proxy.log_text(), 'reconfiguring') == 1


# Logging


def test_config_error_at_start_exits_1(tmp_path):
    path = tmp_path / 'mail.conf'
    path.write_text('events { }\nbogus on;\n')
    result = run_cli([path], timeout=20, cwd=tmp_path)
    assert result.returncode == 1
    assert ('gmailproxy: [emerg] unknown directive "bogus" in %s:2' % path
            in result.stderr)


def test_default_logs_go_to_stderr(gmailproxy, users):
    port = free_port()
    proxy = gmailproxy(conf(users, port, workers=1), ports=[port], error_log=None)
    with pytest.raises(imaplib.IMAP4.error):
        login(port, password=WRONG)
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait(5) == 0
    # the default level is error: a refused login (info) is not shown, nothing is
    assert proxy.stderr_text() == ''
    assert not proxy.error_log.exists()


def test_log_lines_match_nginx(gmailproxy, users, auth, backend, tmp_path,
                               no_password_in_logs):
    """The lines of logging.md section 4 for connect, login failure, login, session
    end, client timeout and upstream errors."""
    port, refused = free_ports(2)
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(8)        # accepts, never greets: the backend login times out
    auth.users['carol'] = {'password': PASSWORD, 'port': refused}
    auth.users['dave'] = {'password': PASSWORD, 'port': silent.getsockname()[1]}
    proxy = gmailproxy(conf(users, port, workers=2, timeout='700ms'), ports=[port])
    with pytest.raises(imaplib.IMAP4.error):
        login(port, password=WRONG)
    with login(port) as imap:
        imap.noop()
    with Client('127.0.0.1', port) as idle:
        idle.expect(b'* OK')
        assert idle.closed(timeout=3)
    for user in ('carol', 'dave'):
        with pytest.raises((imaplib.IMAP4.error, imaplib.IMAP4.abort)):
            login(port, user=user)
    log = proxy.wait_log('upstream timed out')
    silent.close()
    head = r'^%s \[(?P<level>\w+)\] (?P<pid>\d+)#(?P=pid): \*(?P<conn>\d+) ' % STAMP
    suffix = r', client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d' % port
    up = r', upstream: 127\.0\.0\.1:%d' % backend.port
    expected = {
        'connect': r'info\] .*client 127\.0\.0\.1:\d+ connected to 127\.0\.0\.1:%d$' % port,
        'failure': r'info\] .*client login failed: "Invalid login or password" while in '
                   r'http auth state%s, login: "alice"$' % suffix,
        'login': r'info\] .*client logged in%s, login: "alice"%s$' % (suffix, up),
        # bytes each way are appended (beyond nginx, asked for by issue 3)
        'done': r'info\] .*proxied session done%s, login: "alice"%s, bytes from client: '
                r'\d+, bytes to client: \d+$' % (suffix, up),
        'timeout': r'info\] .*client timed out \(110: Connection timed out\) while in auth '
                   r'state%s$' % suffix,
        'refused': r'error\] .*connect\(\) to 127\.0\.0\.1:%d failed \(111: Connection '
                   r'refused\) while connecting to upstream%s, login: "carol", upstream: '
                   r'127\.0\.0\.1:%d$' % (refused, suffix, refused),
        'upstream timeout': r'info\] .*upstream timed out \(110: Connection timed out\) '
                            r'while reading response from upstream%s, login: "dave", '
                            r'upstream: 127\.0\.0\.1:\d+$' % suffix,
    }
    lines = log.splitlines()
    for name, pattern in expected.items():
        matching = [line for line in lines if re.search(pattern, line)]
        assert matching, '%s: no line matches %r in\n%s' % (name, pattern, log)
        assert re.match(head, matching[0]), matching[0]
    # every line of a session carries the client connection's number; numbers are not
    # shared between sessions, also across the two workers
    sessions = {}
    for line in lines:
        m = re.match(head + r'client 127\.0\.0\.1:(\d+) connected', line)
        if m:
            assert m.group('conn') not in sessions, 'number %s used twice' % m.group('conn')
            sessions[m.group('conn')] = m.group('pid')
    assert len(sessions) == 6       # with the start-up probe of the port
    for line in lines:
        m = re.match(head, line)
        if m and m.group('conn'):
            assert sessions[m.group('conn')] == m.group('pid')
    # logging.md section 4's own examples match the same patterns
    spec = (Path(__file__).resolve().parents[3] / 'shared' / 'spec' / 'logging.md')
    if spec.exists():
        examples = [line for line in spec.read_text().splitlines()
                    if re.match(r'^\d{4}/', line)]
        assert len(examples) == 6
        generic = head + r'.*(, client: [\d.]+( using starttls)?, server: \S+)?'
        for line in examples:
            assert re.match(generic, line)


def test_main_mail_and_server_level_error_logs(gmailproxy, users, tmp_path,
                                               no_password_in_logs):
    """A server's lines go to its error_log, else to the mail {} one, else to the main
    one; the processes' own lines (start, signals) to the main one."""
    port, other = free_ports(2)
    server_log, mail_log = tmp_path / 'server.log', tmp_path / 'mail.log'
    text = conf(users, port, server='error_log %s info;' % server_log,
                mail='error_log %s info;' % mail_log)
    text = text.replace('    server {', '''    server {
        listen 127.0.0.1:%d;
        protocol imap;
    }
    server {''' % other, 1)
    proxy = gmailproxy(text, ports=[port, other])
    with login(port) as imap:
        imap.noop()
    with login(other) as imap:
        imap.noop()
    for path in (server_log, mail_log):
        wait_for(lambda: path.exists() and 'proxied session done' in path.read_text(),
                 what=path.name)
    server, mail, main = server_log.read_text(), mail_log.read_text(), proxy.log_text()
    assert 'connected to 127.0.0.1:%d' % port in server
    assert ':%d' % other not in server
    assert 'connected to 127.0.0.1:%d' % other in mail
    assert ':%d' % port not in mail
    assert 'start worker processes' in main
    assert 'connected to' not in main


def test_syslog_target(gmailproxy, users, no_password_in_logs):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(('127.0.0.1', 0))
    receiver.settimeout(5)
    port = free_port()
    target = 'syslog:server=127.0.0.1:%d,facility=mail,tag=gmp' % receiver.getsockname()[1]
    proxy = gmailproxy(conf(users, port, workers=1, main='error_log %s info;' % target),
                       ports=[port], error_log=None)
    with login(port) as imap:
        imap.noop()
    got = []
    deadline = time.monotonic() + 5
    while not any(b'proxied session done' in g for g in got):
        assert time.monotonic() < deadline, got
        got.append(receiver.recv(4096))
    receiver.close()
    host = socket.gethostname().lower().encode()
    line = next(g for g in got if b'client logged in' in g)
    # <mail(2) * 8 + info(6)>, RFC 3164 time, host, tag, then the error-log line
    assert re.match(rb'<22>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d %s gmp: %s \[info\] '
                    rb'\d+#\d+: \*\d+ client logged in, client: 127\.0\.0\.1, server: '
                    rb'127\.0\.0\.1:%d, login: "alice", upstream: 127\.0\.0\.1:\d+$'
                    % (re.escape(host), STAMP.encode(), port), line), line
    assert proxy.stderr_text() == ''


def test_authenticate_and_debug_level_log_no_password(gmailproxy, users,
                                                      no_password_in_logs):
    port = free_port()
    proxy = gmailproxy(conf(users, port, workers=1), ports=[port], error_log='debug')
    with imaplib.IMAP4('127.0.0.1', port, timeout=5) as imap:
        imap.authenticate('PLAIN', lambda _: b'\0alice\0' + PASSWORD.encode())
        imap.noop()
    imap = imaplib.IMAP4('127.0.0.1', port, timeout=5)
    with pytest.raises(imaplib.IMAP4.error):
        imap.authenticate('PLAIN', lambda _: b'\0alice\0' + WRONG.encode())
    imap.shutdown()     # the proxy closes after a refused login (no Auth-Wait)
    with pytest.raises(imaplib.IMAP4.error):
        login(port, password=WRONG)
    with login(port) as imap:
        imap.noop()
    wait_for(lambda: count(proxy.log_text(), 'proxied session done') == 2)
    assert count(proxy.log_text(), 'client login failed') == 2


def uid_of(pid: int) -> int:
    for line in Path('/proc/%d/status' % pid).read_text().splitlines():
        if line.startswith('Uid:'):
            return int(line.split()[1])
    raise AssertionError('no Uid')


@pytest.fixture
def open_folder():
    """A folder the ``user`` of the workers can reach (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix='gmailproxy-user-', dir='/tmp'))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason='"user" needs root')
def test_user_drops_worker_privileges_after_binding(gmailproxy, users, open_folder,
                                                    no_password_in_logs):
    import pwd
    nobody = pwd.getpwnam('nobody').pw_uid
    port = free_port()
    log_file = open_folder / 'error.log'
    proxy = gmailproxy(conf(users, port, main='user nobody nogroup;\nerror_log %s info;'
                            % log_file), ports=[port], error_log=None)
    workers = procs.two_workers(proxy.pid, WAIT)
    assert uid_of(proxy.pid) == 0
    assert [uid_of(w) for w in workers] == [nobody, nobody]
    with login(port) as imap:       # the log file the master opened is inherited
        imap.noop()
    wait_for(lambda: 'proxied session done' in log_file.read_text())
    rotated = log_file.with_name('error.log.1')
    log_file.rename(rotated)
    proxy.signal(signal.SIGUSR1)    # the master reopens and gives the file to nobody,
    wait_for(lambda: rotated.read_text().count('reopening logs') == 3)
    assert log_file.stat().st_uid == nobody
    with login(port) as imap:       # then the workers reopen it themselves
        imap.noop()
    wait_for(lambda: 'proxied session done' in log_file.read_text())
    assert '[emerg]' not in rotated.read_text() + log_file.read_text()


def test_daemon_on_detaches_and_stops_by_pid_file(users, tmp_path, no_password_in_logs):
    port = free_port()
    pid_file = tmp_path / 'gp.pid'
    log_file = tmp_path / 'error.log'
    path = tmp_path / 'mail.conf'
    path.write_text('daemon on;\npid %s;\nerror_log %s info;\n' % (pid_file, log_file)
                    + conf(users, port))
    result = run_cli([path], timeout=20, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(),
                       what='the pid file'))
    try:
        assert alive(pid) and os.getsid(pid) == pid
        wait_for(lambda: port_open('127.0.0.1', port), what='the port')
        with login(port) as imap:
            imap.noop()
        assert run_cli(['-s', 'quit', path], cwd=tmp_path).returncode == 0
        wait_for(lambda: not alive(pid), what='the daemon to exit')
        assert not pid_file.exists()
        assert 'proxied session done' in log_file.read_text()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
