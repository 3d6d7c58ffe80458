"""The command line: nginx's flags, messages and exit codes."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gmailproxy import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / 'conf' / 'nginx-example.conf'
GOOD = ('events { }\nmail {\n    auth_http 127.0.0.1:9000/auth;\n'
        '    server { listen 127.0.0.1:%d; protocol imap; }\n}\n')


def run_cli(*args, env=None, cwd=ROOT, timeout=30) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('GMAILPROXY_')}
    full_env['PYTHONPATH'] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, '-m', 'gmailproxy', *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def write(folder: Path, text: str, name: str = 'mail.conf') -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_test_mode_accepts_the_nginx_documentation_example():
    result = run_cli('-t', 'conf/nginx-example.conf')
    assert result.returncode == 0
    assert result.stdout == ''
    assert result.stderr == (
        'gmailproxy: the configuration file %s syntax is ok\n'
        'gmailproxy: configuration file %s test is successful\n' % (EXAMPLE, EXAMPLE))


@pytest.mark.parametrize('args', [['-x'], ['-s', 'restart'], ['a.conf', 'b.conf']])
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith('usage: gmailproxy ')
    assert 'Traceback' not in result.stderr


def test_options_from_environment_variables(tmp_path):
    write(tmp_path, GOOD % 8143, 'conf/mail.conf')
    result = run_cli(env={'GMAILPROXY_PREFIX': str(tmp_path), 'GMAILPROXY_TEST': 'true',
                          'GMAILPROXY_GLOBALS': 'worker_processes 2; foo;'}, cwd='/')
    assert result.returncode == 1
    assert result.stderr == (
        'gmailproxy: [emerg] unknown directive "foo" in command line\n'
        'gmailproxy: configuration file %s/conf/mail.conf test failed\n' % tmp_path)
    result = run_cli(env={'GMAILPROXY_CONF': str(EXAMPLE), 'GMAILPROXY_TEST': '1',
                          'GMAILPROXY_QUIET': 'yes'})
    assert (result.returncode, result.stderr) == (0, '')


def test_version(capsys):
    assert cli.main(['-v']) == 0
    assert capsys.readouterr().err == 'gmailproxy version: gmailproxy/0.1.0\n'
    assert cli.main(['-V']) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == 'gmailproxy version: gmailproxy/0.1.0'
    assert re.match(r'built with Python 3\.\d+\.\d+, gevent \S+, OpenSSL ', lines[1])


def test_version_then_test(capsys):
    assert cli.main(['-v', '-q', '-t', str(EXAMPLE)]) == 0
    assert capsys.readouterr().err == 'gmailproxy version: gmailproxy/0.1.0\n'


def test_dump_prints_every_file(tmp_path, capsys):
    included = write(tmp_path, 'server { listen 127.0.0.1:8143; protocol imap; }\n',
                     'servers/a.conf')
    main = write(tmp_path, 'events { }\nmail {\n    auth_http 127.0.0.1:9000;\n'
                 '    include servers/*.conf;\n}\n')
    assert cli.main(['-T', str(main)]) == 0
    out, err = capsys.readouterr()
    assert out == ('# configuration file %s:\n%s\n# configuration file %s:\n%s\n'
                   % (main, main.read_text(), included, included.read_text()))
    assert err.splitlines() == [
        'gmailproxy: the configuration file %s syntax is ok' % main,
        'gmailproxy: configuration file %s test is successful' % main]


def test_warnings_are_printed_and_quiet_hides_them(tmp_path, capsys):
    path = write(tmp_path, 'http { }\n' + GOOD % 8143)
    assert cli.main(['-t', str(path)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        'gmailproxy: [warn] the "http" block is ignored in %s:1' % path,
        'gmailproxy: the configuration file %s syntax is ok' % path,
        'gmailproxy: configuration file %s test is successful' % path]
    assert cli.main(['-t', '-q', str(path)]) == 0
    assert capsys.readouterr().err == ''


def test_default_configuration_is_conf_mail_conf_in_the_prefix(tmp_path, capsys):
    assert cli.main(['-t', '-p', str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        'gmailproxy: [emerg] open() "%s/conf/mail.conf" failed (2: No such file or directory)'
        % tmp_path,
        'gmailproxy: configuration file %s/conf/mail.conf test failed' % tmp_path]
    write(tmp_path, GOOD % 8143, 'conf/mail.conf')
    assert cli.main(['-t', '-q', '-p', str(tmp_path)]) == 0


def test_error_log_option_gets_start_up_errors(tmp_path, capsys):
    path = write(tmp_path, 'events { }\nbogus;\n')
    log = tmp_path / 'start.log'
    assert cli.main(['-t', '-e', str(log), str(path)]) == 1
    line = 'unknown directive "bogus" in %s:2' % path
    assert capsys.readouterr().err.splitlines()[0] == 'gmailproxy: [emerg] ' + line
    assert re.fullmatch(r'\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[emerg\] \d+#\d+: %s\n'
                        % re.escape(line), log.read_text())


def test_unexpected_errors_are_one_alert_line(monkeypatch, capsys):
    def broken(*args, **kw):
        raise RuntimeError('boom')
    monkeypatch.setattr(cli, 'load', broken)
    assert cli.main(['-t', str(EXAMPLE)]) == 1
    assert capsys.readouterr().err == 'gmailproxy: [alert] unexpected error: RuntimeError: boom\n'


def test_start_opens_listeners_and_runs_the_server(tmp_path, monkeypatch):
    import socket
    import gmailproxy.server
    from gmailproxy.listeners import close_listeners
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    path = write(tmp_path, GOOD % port)
    calls = []
    monkeypatch.setattr(gmailproxy.server, 'run',
                        lambda config, bounds, options: calls.append((config, bounds, options)))
    assert cli.main(['--watch', str(path)]) == 0
    [(config, bounds, options)] = calls
    try:
        assert config.path == str(path) and options.watch is True
        assert [b.sock.getsockname() for b in bounds] == [('127.0.0.1', port)]
    finally:
        close_listeners(bounds)


def test_signal_needs_a_pid_directive(tmp_path, capsys):
    path = write(tmp_path, GOOD % 8143)
    assert cli.main(['-s', 'reload', str(path)]) == 1
    assert capsys.readouterr().err == (
        'gmailproxy: [error] no "pid" directive in %s, cannot send the "reload" signal\n' % path)


def test_signal_with_missing_or_bad_pid_file(tmp_path, capsys):
    path = write(tmp_path, 'pid run/gp.pid;\n' + GOOD % 8143)
    pid = tmp_path / 'run' / 'gp.pid'
    assert cli.main(['-p', str(tmp_path), '-s', 'quit', str(path)]) == 1
    assert capsys.readouterr().err == (
        'gmailproxy: [error] open() "%s" failed (2: No such file or directory)\n' % pid)
    pid.parent.mkdir()
    pid.write_text('abc\n')
    assert cli.main(['-p', str(tmp_path), '-s', 'quit', str(path)]) == 1
    assert capsys.readouterr().err == \
        'gmailproxy: [error] invalid PID number "abc" in "%s"\n' % pid


@pytest.mark.parametrize('name, signum', [('stop', signal.SIGTERM), ('reload', signal.SIGHUP)])
def test_signal_is_sent_to_the_pid_in_the_pid_file(tmp_path, name, signum):
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / 'gp.pid').write_text('%d\n' % child.pid)
        path = write(tmp_path, 'pid %s/gp.pid;\n' % tmp_path + GOOD % 8143)
        assert cli.main(['-s', name, str(path)]) == 0
        assert child.wait(timeout=10) == -signum
    finally:
        child.kill()
        child.wait(timeout=10)


def test_configuration_errors_never_show_a_traceback(tmp_path):
    path = write(tmp_path, 'events { }\nmail { server { listen 127.0.0.1:8143; } }\n')
    result = run_cli(str(path))
    assert result.returncode == 1
    assert result.stderr == ('gmailproxy: [emerg] unknown mail protocol for server in %s:2\n'
                             % path)
