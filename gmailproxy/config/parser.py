"""Loading a configuration: tokens -> context and arity checks -> value parsers -> merged
``ServerConf`` objects, with nginx's messages and nginx's order of checks
(ngx_conf_file.c ngx_conf_parse/ngx_conf_handler, ngx_mail.c, each module's merge)."""
import glob
import logging
import os

from ..errors import ConfigError
from ..listeners import plan
from . import directives
from .directives import EVENTS, MAIL, MAIN, SERVER
from .lexer import COMMAND_LINE, error, tokenize

log = logging.getLogger('gmailproxy')

NARGS = {'0': (0, 0), '1': (1, 1), '2': (2, 2), '12': (1, 2), '1+': (1, 1 << 30),
         '2+': (2, 1 << 30), 'block': (0, 0)}
SKIPPED_BLOCKS = ('http', 'stream')
MAX_INCLUDE_DEPTH = 64
LOG_LEVELS = {'emerg': logging.CRITICAL, 'warn': logging.WARNING}
_MAIN, _EVENTS, _MAIL, _SERVER = MAIN.value, EVENTS.value, MAIL.value, SERVER.value


class MainConf:
    """Main and events directives, one attribute each (``worker_processes``, ``pid``,
    ``error_log``, ``worker_connections``, ...)."""


class ServerConf:
    """One ``server {}`` after merging: one attribute per mail directive, named like it
    (``conf.timeout``, ``conf.listen``), plus ``file``/``line`` of ``server {``.
    Protocol ``finalize`` functions add precomputed attributes."""

    def __init__(self, file: str, line: int):
        self.file = file
        self.line = line
        self._pos = {}

    def where(self, name: str) -> tuple[str, int]:
        """Position of the directive that set ``name`` (this server's, else the
        ``mail {}`` one); the ``server {}`` position for a default."""
        pos = self._pos.get(name)
        return (pos[0], pos[1]) if pos else (self.file, self.line)

    def written(self, name: str) -> bool:
        """Was ``name`` set in the file (this server or ``mail {}``), not defaulted?"""
        return name in self._pos

    def __repr__(self) -> str:
        return '<ServerConf %s %s:%s>' % (getattr(self, 'protocol', None), self.file,
                                          self.line)


class Config:
    """A loaded configuration: ``main``, ``servers``, and every file read."""

    def __init__(self, path: str, prefix: str):
        self.path = path
        self.prefix = prefix
        self.main = MainConf()
        self.servers: list[ServerConf] = []
        self.texts: dict[str, bytes] = {}       # file -> content, in reading order (-T)
        self.warnings: list[str] = []

    @property
    def files(self) -> list[str]:
        return list(self.texts)


def load(path: str, prefix: str | None = None, extra: str = '') -> Config:
    """Load ``path`` (relative to ``prefix``, default the current folder). ``extra`` holds
    ``-g`` directives, parsed first in the main context. Raises ConfigError."""
    return _Loader(path, prefix).load(extra)


def authenticated(conf: ServerConf) -> bool:
    """Whether a server has a way to check logins: nginx requires ``auth_http``; beyond
    nginx the user file (``auth_users``) or a Python hook (``auth_hook``) will do."""
    return any(getattr(conf, name, None) is not None
               for name in ('auth_http', 'auth_users', 'auth_hook'))


class _Ctx:
    """What value parsers see (see ``values``); one instance reused for every directive."""
    __slots__ = ('name', 'file', 'line', 'previous', 'cache', 'listens', 'loader')

    def warn(self, msg: str, level: str = 'warn') -> None:
        self.loader.warn(msg, self.file, self.line, level)

    def path(self, name: str) -> str:
        return os.path.normpath(os.path.join(self.loader.conf_prefix, name))

    def prefix_path(self, name: str) -> str:
        return os.path.normpath(os.path.join(self.loader.prefix, name))


class _Loader:
    def __init__(self, path: str, prefix: str | None):
        self.prefix = os.path.abspath(prefix or os.getcwd())
        self.path = os.path.normpath(os.path.join(self.prefix, path))
        self.conf_prefix = os.path.dirname(self.path)
        self.table = directives.registry()
        self.masks = {name: row.contexts.value for name, row in self.table.items()}
        self.config = Config(self.path, self.prefix)
        self.main = ({}, {})            # (values, positions) of a level
        self.mail = None
        self.events = False
        self.servers = []               # (ServerConf, level)
        self.depth = 0
        self.ctx = ctx = _Ctx()
        ctx.cache, ctx.listens, ctx.loader = {}, {}, self

    def load(self, extra: str) -> Config:
        if extra:
            tokens = tokenize(extra.encode('utf-8', 'surrogateescape'), COMMAND_LINE)
            self.parse(tokens, COMMAND_LINE, _MAIN, self.main, False)
        self.parse_file(self.path, _MAIN, self.main, None, None)
        if not self.events:
            raise ConfigError('no "events" section in configuration')
        main = self.config.main
        values = self.main[0]
        for row in self.table.values():
            if row.contexts & (MAIN | EVENTS) and row.parse is not None:
                setattr(main, row.name, values.get(row.name, _default(row)))
        for conf in self.config.servers:
            if conf.error_log is None:
                conf.error_log = main.error_log
        sockets = len(plan([l for conf in self.config.servers for l in conf.listen]))
        if main.worker_connections < sockets + 1:
            raise ConfigError('%d worker_connections are not enough for %d listening sockets'
                              % (main.worker_connections, sockets))
        return self.config

    def warn(self, msg: str, file: str, line: int, level: str = 'warn') -> None:
        text = str(error(msg, file, line))
        self.config.warnings.append(text)
        log.log(LOG_LEVELS.get(level, logging.WARNING), '%s', text)

    # Reading

    def parse_file(self, path, kind, level, at_file, at_line) -> None:
        try:
            with open(path, 'rb') as f:
                data = f.read()
        except (OSError, ValueError) as e:       # ValueError: a NUL in the name
            errno_ = getattr(e, 'errno', None)
            reason = '(%d: %s)' % (errno_, os.strerror(errno_)) if errno_ else '(%s)' % e
            raise error('open() "%s" failed %s' % (path, reason), at_file, at_line) from None
        self.config.texts.setdefault(path, data)
        self.parse(tokenize(data, path), path, kind, level, False)

    def parse(self, tokens, file, kind, level, in_block) -> None:
        """Directives until ``}`` (in a block) or the end of the text."""
        args = []
        for tok, line, quoted in tokens:
            if quoted:
                args.append(tok)
            elif tok is None:
                if in_block:
                    raise error('unexpected end of file, expecting "}"', file, line)
                return
            elif tok == '}':
                if in_block:
                    return
                raise error('unexpected "}"', file, line)
            elif tok == ';' or tok == '{':
                self.directive(args, tok, line, file, kind, level, tokens)
                args = []
            else:
                args.append(tok)

    def directive(self, args, term, line, file, kind, level, tokens) -> None:
        """nginx ngx_conf_handler: name, context, terminator, argument count."""
        name = args[0]
        row = self.table.get(name)
        if row is None:
            raise error('unknown directive "%s"' % name, file, line)
        if not self.masks[name] & kind:
            raise error('"%s" directive is not allowed here' % name, file, line)
        if row.nargs == 'block':
            if term != '{':
                raise error('directive "%s" has no opening "{"' % name, file, line)
        elif term != ';':
            raise error('directive "%s" is not terminated by ";"' % name, file, line)
        low, high = NARGS[row.nargs]
        if not low <= len(args) - 1 <= high:
            raise error('invalid number of arguments in "%s" directive' % name, file, line)
        if row.nargs == 'block':
            self.block(name, file, line, tokens)
        elif name == 'include':
            self.include(args[1], file, line, kind, level)
        else:
            self.set(row, args, file, line, level)

    def set(self, row, args, file, line, level) -> None:
        values, positions = level
        name = row.name
        if row.multi is None and name in values:
            raise error('"%s" directive is duplicate' % name, file, line)
        ctx = self.ctx
        ctx.name, ctx.file, ctx.line = name, file, line
        ctx.previous = values.get(name)
        try:
            value = row.parse(args[1:], ctx)
        except ValueError as e:
            raise error(str(e), file, line) from None
        if row.multi == 'append':
            value = values.get(name, ()) + (value,)
        elif row.multi == 'extend':
            value = values.get(name, ()) + tuple(value)
        values[name] = value
        positions[name] = (file, line, args)

    def include(self, pattern, file, line, kind, level) -> None:
        """nginx ngx_conf_include: relative to the main file's folder; a glob may match
        nothing; matches are read in sorted order."""
        path = self.ctx.path(pattern)
        if self.depth >= MAX_INCLUDE_DEPTH:
            raise error('too deep "include" nesting of "%s"' % path, file, line)
        paths = sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
        self.depth += 1
        for name in paths:
            self.parse_file(name, kind, level, file, line)
        self.depth -= 1

    def block(self, name, file, line, tokens) -> None:
        if name in SKIPPED_BLOCKS:
            self.warn('the "%s" block is ignored' % name, file, line)
            self.skip(tokens, file)
        elif name == 'events':
            if self.events:
                raise error('"events" directive is duplicate', file, line)
            self.events = True
            self.parse(tokens, file, _EVENTS, self.main, True)
        elif name == 'mail':
            if self.mail is not None:
                raise error('"mail" directive is duplicate', file, line)
            self.mail = ({}, {})
            self.parse(tokens, file, _MAIL, self.mail, True)
            self.finish_mail()
        else:   # server
            conf, level = ServerConf(file, line), ({}, {})
            self.parse(tokens, file, _SERVER, level, True)
            if not level[0].get('listen'):
                raise error('no "listen" is defined for server', file, line)
            self.servers.append((conf, level))

    @staticmethod
    def skip(tokens, file) -> None:
        depth = 1
        for tok, line, quoted in tokens:
            if quoted:
                continue
            if tok is None:
                raise error('unexpected end of file, expecting "}"', file, line)
            if tok == '{':
                depth += 1
            elif tok == '}':
                depth -= 1
                if not depth:
                    return

    # Merging (ngx_mail_block): module by module, server by server.

    def finish_mail(self) -> None:
        mail_values, mail_pos = self.mail
        base = {row.name: _default(row) for row in self.table.values()
                if row.contexts & SERVER}
        base['error_log'] = None    # the main-level one, known once the file is read
        base.update(mail_values)
        confs = []
        for conf, (values, positions) in self.servers:
            conf.__dict__.update(base)
            conf.__dict__.update(values)
            conf._pos = {**mail_pos, **positions}
            for lst in conf.listen:
                lst.server = conf
            confs.append(conf)
        self.config.servers = confs
        modules = directives.feature_modules()
        ports = {port: m.NAME for m in modules for port in getattr(m, 'PORTS', ())}
        for conf in confs:
            if conf.protocol is None:
                conf.protocol = next((ports[l.port] for l in conf.listen if l.port in ports),
                                     None)
                if conf.protocol is None:
                    raise error('unknown mail protocol for server', conf.file, conf.line)
        for module in modules:
            if module.__name__ == 'gmailproxy.ssl':
                for conf in confs:
                    check_ssl(conf)
            elif module.__name__ == 'gmailproxy.auth_http':
                for conf in confs:
                    if not authenticated(conf):
                        raise error('no "auth_http" is defined for server', conf.file,
                                    conf.line)
            finalize = getattr(module, 'finalize', None)
            if finalize is not None:
                for conf in confs:
                    finalize(conf)


def _default(row):
    if callable(row.default):
        return row.default()
    if row.default is None and row.multi in ('append', 'extend'):
        return ()
    return row.default


def check_ssl(conf: ServerConf) -> None:
    """nginx ngx_mail_ssl_merge_conf: certificate checks for servers that use TLS."""
    ssl = [l for l in conf.listen if l.ssl]
    if ssl:
        mode, file, line = 'listen ... ssl', ssl[-1].file, ssl[-1].line
    elif conf.starttls != 'off':
        mode, (file, line) = 'starttls', conf.where('starttls')
    else:
        return
    certs, keys = conf.ssl_certificate, conf.ssl_certificate_key
    if not certs:
        raise error('no "ssl_certificate" is defined for the "%s" directive' % mode,
                    file, line)
    if not keys:
        raise error('no "ssl_certificate_key" is defined for the "%s" directive' % mode,
                    file, line)
    if len(keys) < len(certs):
        written = conf._pos['ssl_certificate'][2][1]
        raise error('no "ssl_certificate_key" is defined for certificate "%s" and the "%s" '
                    'directive' % (written, mode), file, line)
    if conf.ssl_verify_client in ('on', 'optional') and not (
            conf.ssl_client_certificate or conf.ssl_trusted_certificate):
        raise ConfigError('no ssl_client_certificate or ssl_trusted_certificate for '
                          'ssl_verify_client')
