"""The ``gmailproxy`` command: ``gmailproxy [options] [CONF]`` with nginx's flags.

Exit codes: 0 ok, 1 configuration (or bind) error, 2 usage error. Messages go to stderr as
nginx prints them: ``gmailproxy: [emerg] unknown directive "foo" in /etc/mail.conf:12``.
"""
from gevent import monkey
monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import configargparse  # noqa: E402
import gevent  # noqa: E402

from .config.address import atoi  # noqa: E402
from .config.parser import load  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .listeners import open_listeners  # noqa: E402

NAME = 'gmailproxy'
VERSION = '0.1.0'
DEFAULT_CONF = 'conf/mail.conf'     # relative to the prefix, like nginx's conf/nginx.conf
SIGNALS = {'stop': signal.SIGTERM, 'quit': signal.SIGQUIT, 'reopen': signal.SIGUSR1,
           'reload': signal.SIGHUP}
LEVEL_NAMES = {logging.CRITICAL: 'emerg', logging.ERROR: 'error', logging.WARNING: 'warn',
               logging.INFO: 'info', logging.DEBUG: 'debug'}


def options_parser() -> configargparse.ArgumentParser:
    p = configargparse.ArgumentParser(
        prog=NAME, description='A mail (IMAP, POP3, SMTP) proxy configured like nginx.',
        epilog='Each option can also be set by the environment variable in brackets.')
    p.add_argument('conf', nargs='?', metavar='CONF',
                   help='configuration file (default: %s in the prefix)' % DEFAULT_CONF)
    p.add_argument('-c', dest='conf_option', metavar='FILE', env_var='GMAILPROXY_CONF',
                   help='configuration file (CONF wins when both are given)')
    p.add_argument('-t', dest='test', action='store_true', env_var='GMAILPROXY_TEST',
                   help='test the configuration and exit')
    p.add_argument('-T', dest='dump', action='store_true', env_var='GMAILPROXY_DUMP',
                   help='test the configuration, print it (includes expanded) and exit')
    p.add_argument('-p', dest='prefix', metavar='PREFIX', env_var='GMAILPROXY_PREFIX',
                   help='folder relative paths resolve against (default: the current one)')
    p.add_argument('-e', dest='error_log', metavar='FILE|stderr',
                   env_var='GMAILPROXY_ERROR_LOG', help='error log used while starting')
    p.add_argument('-g', dest='globals', metavar='DIRECTIVES', env_var='GMAILPROXY_GLOBALS',
                   help='main-context directives read before the file\'s')
    p.add_argument('-q', dest='quiet', action='store_true', env_var='GMAILPROXY_QUIET',
                   help='only print errors while testing the configuration')
    p.add_argument('-v', dest='version', action='store_true', help='print the version')
    p.add_argument('-V', dest='version_full', action='store_true',
                   help='print the version and the versions of what it runs on')
    p.add_argument('-s', dest='signal', choices=sorted(SIGNALS), env_var='GMAILPROXY_SIGNAL',
                   help='send a signal to the running process (pid file of the config)')
    p.add_argument('--watch', action='store_true', env_var='GMAILPROXY_WATCH',
                   help='reload when a configuration file changes')
    return p


class _Report:
    """Start-up messages: stderr, and the ``-e FILE`` log in error-log format."""

    def __init__(self, error_log: str | None):
        self.file = error_log if error_log not in (None, 'stderr') else None

    def __call__(self, level: str, msg: str) -> None:
        sys.stderr.write('%s: %s\n' % (NAME, '[%s] %s' % (level, msg) if level else msg))
        sys.stderr.flush()
        if self.file and level:
            line = '%s [%s] %d#%d: %s\n' % (time.strftime('%Y/%m/%d %H:%M:%S'), level,
                                            os.getpid(), threading.get_native_id(), msg)
            try:
                with open(self.file, 'a', encoding='utf-8', errors='backslashreplace') as f:
                    f.write(line)
            except OSError as e:
                self.file = None
                self('alert', 'could not open error log file: open() "%s" failed (%d: %s)'
                     % (e.filename, e.errno, e.strerror))


class _ReportHandler(logging.Handler):
    """Shows the warnings logged while loading (``gmailproxy: [warn] ...``)."""

    def __init__(self, report: _Report, level: int):
        super().__init__(level)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        self.report(LEVEL_NAMES.get(record.levelno, 'notice'), record.getMessage())


def main(argv: list[str] | None = None) -> int:
    """Entry point; never lets a traceback out."""
    try:
        return run(argv)
    except KeyboardInterrupt:
        return 1
    except Exception as e:
        sys.stderr.write('%s: [alert] unexpected error: %s: %s\n'
                         % (NAME, type(e).__name__, e))
        return 1


def run(argv: list[str] | None) -> int:
    opts = options_parser().parse_args(argv)
    if opts.version or opts.version_full:
        print_version(opts.version_full)
        if not (opts.test or opts.dump):
            return 0
    report = _Report(opts.error_log)
    test = opts.test or opts.dump
    prefix = os.path.abspath(opts.prefix or os.getcwd())
    path = os.path.normpath(os.path.join(prefix, opts.conf or opts.conf_option
                                         or DEFAULT_CONF))
    logger = logging.getLogger(NAME)
    handler = _ReportHandler(report, logging.ERROR if test and opts.quiet else logging.INFO)
    logger.addHandler(handler)
    try:
        try:
            config = load(path, prefix=prefix, extra=opts.globals or '')
        except ConfigError as e:
            report('emerg', str(e))
            if test:
                report('', 'configuration file %s test failed' % path)
            return 1
        if test:
            if not opts.quiet:
                report('', 'the configuration file %s syntax is ok' % path)
                report('', 'configuration file %s test is successful' % path)
            if opts.dump:
                dump(config)
            return 0
        if opts.signal:
            return send_signal(config, opts.signal, report)
        try:
            bounds = open_listeners(config)
        except ConfigError as e:
            report('emerg', str(e))
            return 1
    finally:
        logger.removeHandler(handler)
    from . import server    # written separately; imported late so -t does not need it
    return server.run(config, bounds, opts) or 0


def print_version(full: bool) -> None:
    sys.stderr.write('%s version: %s/%s\n' % (NAME, NAME, VERSION))
    if full:
        sys.stderr.write('built with Python %s, gevent %s, %s\n' % (
            sys.version.split()[0], gevent.__version__, ssl.OPENSSL_VERSION))


def dump(config) -> None:
    """``-T``: every file read, as nginx prints them."""
    out = sys.stdout.buffer
    for path, text in config.texts.items():
        out.write(b'# configuration file %s:\n' % os.fsencode(path))
        out.write(text)
        out.write(b'\n')
    out.flush()


def send_signal(config, name: str, report) -> int:
    """``-s stop|quit|reopen|reload``: signal the pid in the configuration's pid file."""
    path = config.main.pid
    if path is None:
        report('error', 'no "pid" directive in %s, cannot send the "%s" signal'
               % (config.path, name))
        return 1
    try:
        with open(path, 'rb') as f:
            text = f.read(32).rstrip(b'\r\n').decode('ascii', 'replace')
    except OSError as e:
        report('error', 'open() "%s" failed (%d: %s)' % (path, e.errno, e.strerror))
        return 1
    pid = atoi(text)
    if not pid:
        report('error', 'invalid PID number "%s" in "%s"' % (text, path))
        return 1
    try:
        os.kill(pid, SIGNALS[name])
    except OSError as e:
        report('alert', 'kill(%d, %d) failed (%d: %s)' % (pid, SIGNALS[name], e.errno,
                                                          e.strerror))
        return 1
    return 0
