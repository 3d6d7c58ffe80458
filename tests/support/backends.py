"""Throwaway real servers for end-to-end tests: Dovecot, Postfix, nginx, haproxy.

Each runs in the foreground as a subprocess under its own temporary folder, on free
loopback ports, and leaves the system's configuration alone (recipes:
shared/notes/test-backends.md). ``start()`` waits for the ports; ``stop()`` terminates
the process and removes the folder (kept when the environment variable
``KEEP_TEST_DIRS`` is set). They are context managers. A missing binary, or not being
root where the server needs it, is a ``pytest.skip`` with the reason; tools/test
installs everything, so in CI nothing skips.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .net import free_port, wait_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def unavailable(reason: str):
    """Skip the test, except under CI (``CI=true``), where tools/test installed
    everything and a missing tool is a failure, not a silent skip."""
    if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
        pytest.fail('%s (CI is set: tools/test should have installed it)' % reason)
    pytest.skip(reason)


def need_binary(path_or_name: str, package: str) -> str:
    """The binary's path, or skip the test naming the Debian package providing it."""
    found = path_or_name if os.path.isabs(path_or_name) and os.access(
        path_or_name, os.X_OK) else shutil.which(path_or_name)
    if not found:
        unavailable('%s not found (install the Debian package %s; tools/test does)'
                    % (path_or_name, package))
    return found


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable('%s needs root for this test setup' % what)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors='replace')
    except FileNotFoundError:
        return ''


class _Server:
    """A foreground subprocess in a temporary folder."""
    name = 'server'
    stop_grace = STOP_TIMEOUT   # seconds from SIGTERM to SIGKILL of the process group

    def __init__(self, tmpdir: str | os.PathLike | None = None):
        self._own_dir = tmpdir is None
        self.dir = Path(tempfile.mkdtemp(prefix='gp-%s-' % self.name) if tmpdir is None
                        else tmpdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)   # service users must reach their files below it
        self.proc: subprocess.Popen | None = None
        self._out = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, argv: list[str], ports: list[int], timeout: float) -> None:
        self._out = open(self.dir / 'console.log', 'ab')
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, cwd=self.dir,
                                     start_new_session=True)
        try:
            for port in ports:
                wait_port('127.0.0.1', port, timeout, proc=self.proc, what=self.name)
        except (RuntimeError, TimeoutError) as e:
            self.stop(remove=False)
            raise RuntimeError(
                '%s did not start: %s\n--- console:\n%s\n--- log:\n%s'
                % (self.name, e, self.console_text(), self.log_text())) from e

    def console_text(self) -> str:
        """What the process wrote to stdout/stderr."""
        return _read(self.dir / 'console.log')

    def log_text(self) -> str:
        return ''

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        if self.proc is not None:
            # children that outlived their master (same session id)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._out is not None:
            self._out.close()
            self._out = None
        if remove:
            self.remove()

    def remove(self) -> None:
        """Delete the temporary folder (unless given, or KEEP_TEST_DIRS is set)."""
        if self._own_dir and not os.environ.get('KEEP_TEST_DIRS'):
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- Dovecot

class Dovecot(_Server):
    """Dovecot with IMAP and POP3 on free loopback ports and passwd-file users.

    ``users`` maps login to plaintext password. Ports: ``imap_port``, ``pop3_port``;
    with ``ssl_cert``/``ssl_key`` also ``imaps_port``, ``pop3s_port`` (``ssl`` is then
    ``'yes'`` unless given, ``'required'`` refuses plaintext auth without TLS); with
    ``haproxy=True`` also ``imap_haproxy_port``, ``pop3_haproxy_port`` expecting a PROXY
    header from 127.0.0.0/8. ``login_trusted_networks = 127.0.0.0/8`` lets Dovecot take
    the client address a proxy forwards (IMAP ``ID`` x-originating-ip / XCLIENT in
    POP3).
    """
    name = 'dovecot'
    stop_grace = 0.3   # its master takes ~1 s to reap children; nothing to save here
    MAIL_UID = MAIL_GID = 1000

    def __init__(self, users: dict[str, str] | None = None, tmpdir=None,
                 ssl_cert: str | None = None, ssl_key: str | None = None,
                 ssl: str | None = None, haproxy: bool = False,
                 auth_mechanisms: str = 'plain login', extra_conf: str = ''):
        super().__init__(tmpdir)
        self.users = dict(users if users is not None else {'alice': 'secret'})
        self.ssl_cert, self.ssl_key = ssl_cert, ssl_key
        self.ssl = ssl or ('yes' if ssl_cert else 'no')
        self.haproxy = haproxy
        self.auth_mechanisms = auth_mechanisms
        self.extra_conf = extra_conf
        self.imap_port = free_port()
        self.pop3_port = free_port()
        self.imaps_port = self.pop3s_port = None
        self.imap_haproxy_port = self.pop3_haproxy_port = None
        if ssl_cert:
            self.imaps_port, self.pop3s_port = free_port(), free_port()
        if haproxy:
            self.imap_haproxy_port, self.pop3_haproxy_port = free_port(), free_port()

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.imap_port, self.pop3_port, self.imaps_port,
                            self.pop3s_port, self.imap_haproxy_port,
                            self.pop3_haproxy_port) if p]

    def home(self, user: str) -> Path:
        return self.dir / 'mail' / user

    def maildir(self, user: str) -> Path:
        """The user's Maildir (``cur``, ``new``, ``tmp`` inside)."""
        return self.home(user) / 'Maildir'

    def _make_maildir(self, user: str) -> None:
        for path in (self.home(user), self.maildir(user),
                     *(self.maildir(user) / d for d in ('cur', 'new', 'tmp'))):
            path.mkdir(exist_ok=True)
            os.chown(path, self.MAIL_UID, self.MAIL_GID)
            os.chmod(path, 0o700)

    def _config(self) -> str:
        d = self.dir
        ssl_lines = 'ssl = %s\n' % self.ssl
        if self.ssl_cert:
            ssl_lines += 'ssl_cert = <%s\nssl_key = <%s\n' % (self.ssl_cert,
                                                              self.ssl_key)
        imap_extra = pop3_extra = ''
        if self.ssl_cert:
            imap_extra += ('  inet_listener imaps {\n    port = %d\n'
                           '    ssl = yes\n  }\n' % self.imaps_port)
            pop3_extra += ('  inet_listener pop3s {\n    port = %d\n'
                           '    ssl = yes\n  }\n' % self.pop3s_port)
        if self.haproxy:
            imap_extra += ('  inet_listener imap_haproxy {\n    port = %d\n'
                           '    haproxy = yes\n  }\n' % self.imap_haproxy_port)
            pop3_extra += ('  inet_listener pop3_haproxy {\n    port = %d\n'
                           '    haproxy = yes\n  }\n' % self.pop3_haproxy_port)
        return f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
{ssl_lines}disable_plaintext_auth = no
auth_mechanisms = {self.auth_mechanisms}
auth_verbose = yes
auth_failure_delay = 0
mail_location = maildir:~/Maildir
first_valid_uid = 0
login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
{imap_extra}}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
{pop3_extra}}}
{self.extra_conf}
"""

    def start(self, timeout: float = START_TIMEOUT) -> 'Dovecot':
        binary = need_binary('dovecot', 'dovecot-imapd dovecot-pop3d')
        need_root('dovecot')
        d = self.dir
        (d / 'mail').mkdir(exist_ok=True)
        os.chmod(d / 'mail', 0o755)
        lines = []
        for user, password in self.users.items():
            self._make_maildir(user)
            lines.append('%s:{PLAIN}%s:%d:%d::%s\n' % (
                user, password, self.MAIL_UID, self.MAIL_GID, self.home(user)))
        (d / 'users').write_text(''.join(lines))
        (d / 'dovecot.conf').write_text(self._config())
        self._spawn([binary, '-F', '-c', str(d / 'dovecot.conf')], self.ports, timeout)
        return self

    def deliver(self, user: str, message: bytes) -> Path:
        """Put ``message`` into the user's Maildir/new (IMAP INBOX, POP3 drop)."""
        if not self.maildir(user).exists():
            self._make_maildir(user)
        name = '%d.M%dP%d.test,S=%d' % (time.time(), time.monotonic_ns() % 10**9,
                                        os.getpid(), len(message))
        tmp = self.maildir(user) / 'tmp' / name
        tmp.write_bytes(message)
        os.chown(tmp, self.MAIL_UID, self.MAIL_GID)
        final = self.maildir(user) / 'new' / name
        os.rename(tmp, final)
        return final

    def messages(self, user: str) -> list[bytes]:
        """The INBOX messages stored on disk (new/ and cur/, oldest first).

        Dovecot stores what IMAP APPEND received with LF line ends (it gives CRLF back
        over IMAP/POP3), so compare with ``msg.replace(b'\\r\\n', b'\\n')``;
        ``deliver()`` stores its bytes as given.
        """
        files = [p for d in ('new', 'cur') if (self.maildir(user) / d).is_dir()
                 for p in (self.maildir(user) / d).iterdir()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def log_text(self) -> str:
        return _read(self.dir / 'dovecot.log')


# --------------------------------------------------------------------------- Postfix

class Postfix(_Server):
    """Postfix smtpd on a free loopback port delivering to virtual Maildirs.

    ``mailboxes`` are addresses in ``domain`` (a bare local part gets ``@domain``);
    other recipients in the domain get ``550``, other domains are relayed only from
    mynetworks and then bounce (no outbound mail). XCLIENT is allowed from
    ``xclient_hosts``. ``extra_main_cf`` is appended to main.cf; ``smtpd_options``
    become ``-o`` flags of the smtpd service (e.g. ``{'smtpd_upstream_proxy_protocol':
    'haproxy'}``).
    """
    name = 'postfix'
    MASTER = '/usr/lib/postfix/sbin/master'

    def __init__(self, mailboxes=('bob@test.example',), domain: str = 'test.example',
                 tmpdir=None, xclient_hosts: str = '127.0.0.1', extra_main_cf: str = '',
                 smtpd_options: dict[str, str] | None = None,
                 myhostname: str = 'mx.test.example'):
        super().__init__(tmpdir)
        self.domain = domain
        self.mailboxes = [self.address(m) for m in mailboxes]
        self.xclient_hosts = xclient_hosts
        self.extra_main_cf = extra_main_cf
        self.smtpd_options = dict(smtpd_options or {})
        self.myhostname = myhostname
        self.port = free_port()

    def address(self, mailbox: str) -> str:
        return mailbox if '@' in mailbox else '%s@%s' % (mailbox, self.domain)

    def mailbox_dir(self, mailbox: str) -> Path:
        return self.dir / 'mail' / self.address(mailbox).replace('@', '_')

    def _main_cf(self) -> str:
        d = self.dir
        pw = pwd.getpwnam('postfix')
        return f"""\
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = {self.myhostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_authorized_xclient_hosts = {self.xclient_hosts}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = texthash:{d}/etc/vmailbox
virtual_uid_maps = static:{pw.pw_uid}
virtual_gid_maps = static:{pw.pw_gid}
default_transport = error:outbound mail disabled
relay_transport = error:outbound mail disabled
smtputf8_enable = no
{self.extra_main_cf}
"""

    def _master_cf(self) -> str:
        opts = ''.join('\n  -o %s=%s' % kv for kv in self.smtpd_options.items())
        return f"""\
127.0.0.1:{self.port} inet n - n - - smtpd{opts}
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

    def start(self, timeout: float = START_TIMEOUT) -> 'Postfix':
        need_binary(self.MASTER, 'postfix')
        postfix = need_binary('postfix', 'postfix')
        need_root('postfix')
        d = self.dir
        pw = pwd.getpwnam('postfix')
        etc = d / 'etc'
        etc.mkdir(exist_ok=True)
        (d / 'spool').mkdir(exist_ok=True)
        for sub in ('data', 'mail'):
            (d / sub).mkdir(exist_ok=True)
            os.chown(d / sub, pw.pw_uid, pw.pw_gid)
        (etc / 'main.cf').write_text(self._main_cf())
        (etc / 'master.cf').write_text(self._master_cf())
        (etc / 'vmailbox').write_text(''.join(
            '%s %s/\n' % (m, self.mailbox_dir(m).name) for m in self.mailboxes))
        # a freshly changed main.cf makes Postfix wait ~2 s: date the files in the past
        past = time.time() - 120
        for f in etc.iterdir():
            os.utime(f, (past, past))
        check = subprocess.run([postfix, '-c', str(etc), 'check'], capture_output=True,
                               timeout=30)
        if check.returncode != 0:
            raise RuntimeError('postfix check failed: %s%s'
                               % (check.stdout.decode(), check.stderr.decode()))
        self._spawn([self.MASTER, '-c', str(etc), '-s'], [self.port], timeout)
        return self

    def messages(self, mailbox: str) -> list[bytes]:
        """Messages delivered to ``mailbox`` so far (oldest first)."""
        new = self.mailbox_dir(mailbox) / 'new'
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))
        return [f.read_bytes() for f in files]

    def wait_messages(self, mailbox: str, count: int = 1,
                      timeout: float = 5.0) -> list[bytes]:
        """Wait until ``mailbox`` holds ``count`` messages or more; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(mailbox)
            if len(msgs) >= count or time.monotonic() >= deadline:
                assert len(msgs) >= count, (
                    '%d message(s) in %s after %ss, wanted %d; log:\n%s'
                    % (len(msgs), mailbox, timeout, count, self.log_text()))
                return msgs
            time.sleep(0.02)

    def log_text(self) -> str:
        return _read(self.dir / 'maillog')


# --------------------------------------------------------------------------- nginx

NGINX_MAIL_MODULES = ('/usr/lib/nginx/modules/ngx_mail_module.so',
                      '/usr/share/nginx/modules/ngx_mail_module.so')


def nginx_mail_module() -> str:
    for path in NGINX_MAIL_MODULES:
        if os.path.exists(path):
            return path
    unavailable('ngx_mail_module.so not found '
                '(install libnginx-mod-mail; tools/test does)')


def nginx_version() -> str:
    """``'1.22.1'`` for Debian 12's nginx (skips if nginx is missing)."""
    binary = need_binary('nginx', 'nginx-light')
    out = subprocess.run([binary, '-v'], capture_output=True, timeout=10)
    return (out.stderr or out.stdout).decode().strip().rsplit('/', 1)[-1]


class Nginx(_Server):
    """Debian's nginx with the dynamic mail module running ``mail_conf``, foreground.

    ``mail_conf`` is the text of a ``mail { ... }`` block (or anything valid at the top
    level); ``load_module``, ``events``, ``pid`` and ``error_log DIR/error.log info``
    are added. ``start(ports)`` waits for the listed ports.
    """
    name = 'nginx'

    def __init__(self, mail_conf: str, tmpdir=None, log_level: str = 'info'):
        super().__init__(tmpdir)
        self.mail_conf = mail_conf
        self.log_level = log_level

    def start(self, ports=(), timeout: float = START_TIMEOUT) -> 'Nginx':
        binary = need_binary('nginx', 'nginx-light')
        module = nginx_mail_module()
        d = self.dir
        (d / 'nginx.conf').write_text(
            'load_module %s;\n'
            'pid %s/nginx.pid;\n'
            'error_log %s/error.log %s;\n'
            'events {\n    worker_connections 64;\n}\n\n%s\n'
            % (module, d, d, self.log_level, self.mail_conf))
        self._spawn([binary, '-p', '%s/' % d, '-e', str(d / 'error.log'),
                     '-c', str(d / 'nginx.conf'),
                     '-g', 'daemon off; master_process off;'], list(ports), timeout)
        return self

    def error_log_text(self) -> str:
        return _read(self.dir / 'error.log')

    log_text = error_log_text


# --------------------------------------------------------------------------- haproxy

class Haproxy(_Server):
    """haproxy in TCP mode; ``config`` is the text after the ``global`` and
    ``defaults`` parts (``frontend``/``backend``/``listen`` sections)."""
    name = 'haproxy'

    def __init__(self, config: str, tmpdir=None):
        super().__init__(tmpdir)
        self.config = config

    def start(self, ports=(), timeout: float = START_TIMEOUT) -> 'Haproxy':
        binary = need_binary('haproxy', 'haproxy')
        (self.dir / 'haproxy.cfg').write_text(
            'global\n    log stderr format raw local0 info\n\n'
            'defaults\n    mode tcp\n    log global\n    timeout connect 5s\n'
            '    timeout client 30s\n    timeout server 30s\n\n%s\n' % self.config)
        self._spawn([binary, '-db', '-f', str(self.dir / 'haproxy.cfg')], list(ports),
                    timeout)
        return self

    def log_text(self) -> str:
        return self.console_text()


# ---------------------------------------------------------------------- certificates

def make_cert(directory: str | os.PathLike, cn: str = 'localhost',
              name: str = 'server') -> tuple[str, str]:
    """A self-signed certificate and key (PEM files) made with the openssl CLI."""
    openssl = need_binary('openssl', 'openssl')
    directory = Path(directory)
    cert, key = directory / ('%s.crt' % name), directory / ('%s.key' % name)
    subprocess.run([openssl, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
                    '-days', '30', '-subj', '/CN=%s' % cn,
                    '-addext', 'subjectAltName=DNS:%s' % cn,
                    '-keyout', str(key), '-out', str(cert)],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o644)   # readable by service users in throwaway folders
    return str(cert), str(key)
