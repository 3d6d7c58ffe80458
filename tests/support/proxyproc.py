"""gmailproxy as a subprocess (``python -m gmailproxy CONF``) for end-to-end tests.

    with GmailProxy(conf_text, tmp_path).start(ports=[imap_port]) as proxy:
        ...
        assert 'client logged in' in proxy.log_text()

``conf_text`` is a whole mail.conf; ``error_log DIR/error.log info;`` is put in front of
it (pass ``error_log=None`` to leave it out) so tests can read the log with
``log_text()``.
stdout and stderr go to ``DIR/stderr.log`` (``stderr_text()``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .net import wait_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.setdefault('PYTHONUNBUFFERED', '1')
    return env


def run_cli(args: list[str], timeout: float = 30.0,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m gmailproxy ARGS`` to completion (e.g. ``['-t', conf]``).

    Returns the CompletedProcess with text ``stdout``/``stderr``.
    """
    return subprocess.run([sys.executable, '-m', 'gmailproxy', *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=cwd, stdin=subprocess.DEVNULL)


class GmailProxy:
    """One gmailproxy process with its config, log and console output in ``dir``."""

    def __init__(self, conf_text: str, tmpdir: str | os.PathLike,
                 error_log: str | None = 'info', args: list[str] = (),
                 name: str = 'mail.conf'):
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / name
        self.error_log = self.dir / 'error.log'
        self.args = list(args)
        self.write_conf(conf_text, error_log)
        self.proc: subprocess.Popen | None = None
        self._out = None

    def write_conf(self, conf_text: str, error_log: str | None = 'info') -> None:
        """(Re)write the config file, e.g. before ``reload()``."""
        head = 'error_log %s %s;\n' % (self.error_log, error_log) if error_log else ''
        self.conf.write_text(head + conf_text)

    def start(self, ports=(), timeout: float = START_TIMEOUT,
              host: str = '127.0.0.1') -> 'GmailProxy':
        """Start and wait until every port in ``ports`` accepts connections."""
        self._out = open(self.dir / 'stderr.log', 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'gmailproxy', *self.args, str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            env=_env(), cwd=self.dir)
        try:
            for port in ports:
                wait_port(host, port, timeout, proc=self.proc, what='gmailproxy')
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(
                'gmailproxy did not start: %s\n--- stderr:\n%s\n--- log:\n%s'
                % (e, self.stderr_text(), self.log_text())) from e
        return self

    def __enter__(self) -> 'GmailProxy':
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None, 'not started'
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` (HUP reload, QUIT graceful stop, USR1 reopen logs, ...)."""
        assert self.proc is not None, 'not started'
        self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; its exit code (else TimeoutExpired)."""
        assert self.proc is not None, 'not started'
        return self.proc.wait(timeout)

    def wait_log(self, text: str, timeout: float = 5.0, start: int = 0) -> str:
        """Wait until ``text`` appears in the error log (after offset ``start``)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log[start:]:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError('%r not in the log after %ss:\n%s\n--- stderr:\n%s'
                                     % (text, timeout, log, self.stderr_text()))
            time.sleep(0.02)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._out is not None:
            self._out.close()
            self._out = None
        return self.proc.returncode

    def log_text(self) -> str:
        """The error log written by gmailproxy."""
        try:
            return self.error_log.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def stderr_text(self) -> str:
        try:
            return (self.dir / 'stderr.log').read_text(errors='replace')
        except FileNotFoundError:
            return ''
