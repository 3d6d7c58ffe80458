"""gmailproxy (2 workers) under a real supervisord, configured as conf/supervisord.conf
advises (stopsignal QUIT, stopasgroup): no stray process, ever (issue 4)."""
import importlib.util
import imaplib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import dump_on_failure
from tests.support.fake_backend import FakeBackend
from tests.support.net import free_port, port_open
from tests.support.procs import alive, children, procs, two_workers, wait_for

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = 'Sv-pa55-Jw4'
MAIL_CONF = '''worker_processes 2;
error_log %(log)s info;
events { }
mail {
    auth_http %(auth)s;
    timeout 5s;
    server {
        listen 127.0.0.1:%(port)d;
        protocol imap;
    }
}
'''
SUPERVISORD_CONF = '''[unix_http_server]
file=%(dir)s/supervisor.sock

[supervisord]
logfile=%(dir)s/supervisord.log
pidfile=%(dir)s/supervisord.pid
childlogdir=%(dir)s
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(dir)s/supervisor.sock

[program:gmailproxy]
command=%(python)s -m gmailproxy %(dir)s/mail.conf
directory=%(dir)s
environment=PYTHONPATH="%(root)s",PYTHONUNBUFFERED="1"
autostart=false
autorestart=unexpected
startsecs=1
startretries=3
exitcodes=0
stopsignal=QUIT
stopwaitsecs=10
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile=%(dir)s/console.log
'''


def group(pgrp: int) -> list[int]:
    """Live processes of process group ``pgrp`` (supervisor starts each program in a
    group of its own, named after the master's pid)."""
    return sorted(p for p, (state, _, g) in procs().items() if g == pgrp and state != 'Z')


class Supervisor:
    def __init__(self, folder: Path):
        self.dir = folder
        self.conf = folder / 'supervisord.conf'
        self.proc = None
        self.masters = []       # every gmailproxy master seen, for the cleanup

    def start(self) -> 'Supervisor':
        self.conf.write_text(SUPERVISORD_CONF % dict(dir=self.dir, python=sys.executable,
                                                     root=ROOT))
        out = open(self.dir / 'supervisord.out', 'ab')
        self.proc = subprocess.Popen([sys.executable, '-m', 'supervisor.supervisord', '-c',
                                      str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
        out.close()
        wait_for(lambda: self.ctl('status', check=False).returncode in (0, 3),
                 what='supervisord')
        return self

    def ctl(self, *args, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, '-m', 'supervisor.supervisorctl', '-c',
                                 str(self.conf), *args], capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def master(self) -> int:
        pid = int(self.ctl('pid', 'gmailproxy').stdout.strip())
        assert pid > 0
        self.masters.append(pid)
        return pid

    def stop(self) -> None:
        if self.proc is None:
            return
        self.ctl('shutdown', check=False)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in self.masters:         # only what this test started, should be none
            for stray in group(pid):
                os.kill(stray, signal.SIGKILL)


@pytest.fixture
def supervised(request, tmp_path, auth):
    if importlib.util.find_spec('supervisor') is None:
        pytest.skip('supervisor is not installed (pip install supervisor)')
    backend = FakeBackend('imap')
    auth.users = {'alice': {'password': PASSWORD}}
    auth.ports = {'imap': backend.port}
    port = free_port()
    (tmp_path / 'mail.conf').write_text(MAIL_CONF % dict(log=tmp_path / 'error.log',
                                                         auth=auth.url, port=port))
    sup = Supervisor(tmp_path).start()
    sup.port = port
    yield sup
    sup.stop()
    backend.stop()
    for name in ('supervisord.log', 'console.log', 'error.log'):
        path = tmp_path / name
        if path.exists():
            text = path.read_text(errors='replace')
            dump_on_failure(request, name, text)
            assert PASSWORD not in text, 'password in %s' % name


def running(sup) -> tuple[int, list[int]]:
    """The master's pid and its two workers, once serving."""
    master = sup.master()
    workers = two_workers(master)
    wait_for(lambda: port_open('127.0.0.1', sup.port), what='the port')
    with imaplib.IMAP4('127.0.0.1', sup.port, timeout=5) as imap:
        imap.login('alice', PASSWORD)
        assert imap.noop()[0] == 'OK'
    return master, workers


def test_start_stop_restart_leave_no_stray_process(supervised):
    sup = supervised
    assert 'started' in sup.ctl('start', 'gmailproxy').stdout
    master, workers = running(sup)
    assert group(master) == sorted([master] + workers)

    assert 'stopped' in sup.ctl('stop', 'gmailproxy').stdout
    assert group(master) == []
    assert not port_open('127.0.0.1', sup.port)

    sup.ctl('start', 'gmailproxy')
    second, second_workers = running(sup)
    assert second != master
    result = sup.ctl('restart', 'gmailproxy').stdout
    assert 'stopped' in result and 'started' in result
    third, third_workers = running(sup)
    assert third != second
    assert group(second) == []
    assert group(third) == sorted([third] + third_workers)
    log = (sup.dir / 'error.log').read_text()
    assert log.count('signal 3 (SIGQUIT) received, shutting down') == 2
    assert '[alert]' not in log and '[emerg]' not in log
    console = (sup.dir / 'supervisord.log').read_text()
    assert console.count('stopped: gmailproxy (exit status 0)') == 2

    sup.ctl('stop', 'gmailproxy')
    assert group(third) == []


def test_sigkill_worker_is_replaced_sigkill_master_leaves_no_worker(supervised):
    sup = supervised
    sup.ctl('start', 'gmailproxy')
    master, workers = running(sup)

    os.kill(workers[0], signal.SIGKILL)
    now = wait_for(lambda: (len(children(master)) == 2 and workers[0] not in
                            children(master) and children(master)),
                   what='a new worker')
    assert workers[1] in now
    log = (sup.dir / 'error.log').read_text()
    assert 'worker process %d exited on signal 9' % workers[0] in log
    assert sup.master() == master           # supervisor saw nothing
    running(sup)

    now = children(master)
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not any(alive(w) for w in now), 5, 'the workers to die')
    # supervisor starts a new master (autorestart), alone in its group with its workers
    new = wait_for(lambda: (lambda p: p != master and p)(
        int(sup.ctl('pid', 'gmailproxy', check=False).stdout.strip() or 0)),
        what='a new master')
    sup.masters.append(new)
    second, second_workers = running(sup)
    assert second == new
    assert group(master) == []
    assert group(new) == sorted([new] + second_workers)
    sup.ctl('stop', 'gmailproxy')
    assert group(new) == []
