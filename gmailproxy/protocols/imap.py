"""IMAP (imap.md): client dialogue until credentials, then the backend LOGIN.

Beyond nginx: ``ID`` is answered before login (``* ID NIL``; Outlook, Apple Mail and
OfflineIMAP send it first) and advertised while ``imap_id`` is on (the default).
"""
import re

from .. import backend_tls, errors, oauth, realip, sasl
from .. import ssl as tls
from ..stream import redacted
from ..config import values
from ..config.directives import D, MAIL_SERVER
from ..errors import BadCommand

NAME = 'imap'
PORTS = (143, 993)

DIRECTIVES = [
    D('imap_client_buffer', MAIL_SERVER, '1', values.size, default=values.page_size),
    D('imap_capabilities', MAIL_SERVER, '1+', values.words, multi='extend',
      default=('IMAP4', 'IMAP4rev1', 'UIDPLUS')),
    D('imap_auth', MAIL_SERVER, '1+',
      values.methods('plain', 'login', 'cram-md5', 'external', 'xoauth2',
                     'oauthbearer'),
      multi='extend', default=('plain',)),
    D('imap_id', MAIL_SERVER, '1', values.flag, default=True),
]

GREETING = b'* OK IMAP4 ready\r\n'
OK = b'OK completed\r\n'
INVALID = b'BAD invalid command\r\n'
REPLIES = {
    'invalid': INVALID,
    'internal': b'* BAD internal server error\r\n',
    'cert_error': b'* BYE SSL certificate error\r\n',
    'cert_missing': b'* BYE No required SSL certificate\r\n',
    'limit_address': b'* BYE [UNAVAILABLE] Too many connections from your address\r\n',
    'limit_login': b'NO [UNAVAILABLE] Too many sessions for this user\r\n',
    'limit_failures': b'NO [UNAVAILABLE] Too many failed logins, try again later\r\n',
}
TAGGED = frozenset(('invalid', 'limit_login', 'limit_failures'))   # get the tag first
AUTH_ORDER = (('plain', b'AUTH=PLAIN'), ('login', b'AUTH=LOGIN'),
              ('cram-md5', b'AUTH=CRAM-MD5'), ('external', b'AUTH=EXTERNAL'),
              ('xoauth2', b'AUTH=XOAUTH2'), ('oauthbearer', b'AUTH=OAUTHBEARER'))
SASL_CHALLENGE = b'+ '
MAX_ID_PAIRS = 30                     # RFC 2971

_TAG = re.compile(rb'[A-Za-z0-9._-]{1,32} ')
_NAME = re.compile(rb' *([A-Za-z]+)(?=[ \r\n])')
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_UNESCAPE = re.compile(rb'\\(.)', re.S)
_LITERAL = re.compile(rb'\{(\d{1,10})(\+?)\}\r?\n\Z')
_ATOM = re.compile(rb'[^ \r\n]*')
_ATOM_IN_LIST = re.compile(rb'[^ \r\n()]*')
_ANNOUNCES_LITERAL_PLUS = re.compile(rb'\+\}\r?\n\Z')


def client_buffer(conf) -> int:
    return conf.imap_client_buffer


def finalize(conf) -> None:
    """Build the three CAPABILITY lines once (imap.md section 4)."""
    words = list(conf.imap_capabilities)
    if conf.imap_id and 'ID' not in (w.upper() for w in words):
        words.append('ID')
    base = b'* CAPABILITY' + b''.join(b' ' + w.encode('utf-8', 'surrogateescape') for w in words)
    auth = b''.join(b' ' + name for method, name in AUTH_ORDER if method in conf.imap_auth)
    conf.imap_capability = base + auth + b'\r\n'
    conf.imap_starttls_capability = base + auth + b' STARTTLS\r\n'
    conf.imap_starttls_only_capability = base + b' STARTTLS LOGINDISABLED\r\n'


def reply(s, key: str) -> bytes:
    text = REPLIES[key]
    if key in TAGGED:
        return (s.tag or b'* ') + text
    return text


def auth_failed_reply(s, exc: errors.AuthFailed) -> bytes:
    return s.tag + b'NO ' + exc.message.encode('utf-8', 'replace') + b'\r\n'


def start(s) -> None:
    s.send(GREETING)


def reset(s) -> None:
    s.login = None


def serve(s) -> None:
    """Answer pre-authentication commands until credentials are complete."""
    while True:
        try:
            name, line, pos = read_command(s)
            handler = COMMANDS.get(name)
            if handler is None:
                raise BadCommand(close=_ANNOUNCES_LITERAL_PLUS.search(line) is not None)
            args = read_args(s, line, pos, in_list=name == b'ID')
            if handler(s, args):
                return
        except BadCommand as exc:
            s.invalid(exc)
            if exc.close:
                raise errors.SessionDone() from None


def read_command(s):
    """``(NAME, line, position after the name)``; sets ``s.tag`` (with its space)."""
    s.tag = None
    try:
        line = s.stream.read_line()
    except errors.TooLong:
        tag = _TAG.match(s.stream.buf)      # answered with the tag if it was complete
        s.tag = tag.group() if tag else None
        raise
    tag = _TAG.match(line)
    if tag is None:
        raise BadCommand(close=_ANNOUNCES_LITERAL_PLUS.search(line) is not None)
    s.tag = tag.group()
    name = _NAME.match(line, tag.end())
    if name is None:
        raise BadCommand(close=_ANNOUNCES_LITERAL_PLUS.search(line) is not None)
    return name.group(1).upper(), line, name.end()


def read_args(s, line: bytes, pos: int, in_list: bool = False) -> list:
    """Atoms, quoted strings and literals (imap.md section 2); at most 3 unless in_list
    (``ID``'s parenthesised list, whose parentheses come back as b'(' and b')')."""
    limit = s.conf.imap_client_buffer
    used = len(line)
    args = []
    atom = _ATOM_IN_LIST if in_list else _ATOM
    while True:
        while line[pos] == 32:
            pos += 1
        c = line[pos]
        if c == 10 or (c == 13 and line[pos + 1:pos + 2] == b'\n'):
            return args
        if c == 13 or (len(args) == 3 and not in_list):
            raise BadCommand(close=_ANNOUNCES_LITERAL_PLUS.search(line) is not None)
        if c == 34:                                   # "quoted"
            m = _QUOTED.match(line, pos)
            if m is None:
                raise BadCommand()
            args.append(_UNESCAPE.sub(rb'\1', m.group(1)))
            pos = m.end()
        elif c == 123:                                # {literal}
            m = _LITERAL.match(line, pos)
            if m is None:
                raise BadCommand(close=_ANNOUNCES_LITERAL_PLUS.search(line) is not None)
            size, plus = int(m.group(1)), m.group(2)
            if size > limit:
                raise BadCommand(close=bool(plus))
            used += size
            if used > limit:
                raise errors.TooLong('client sent too long command "%s"' % redacted(line))
            if not plus:
                s.send(b'+ OK\r\n')
            args.append(s.stream.read_exact(size))
            line = s.stream.read_line()
            used += len(line)
            if used > limit:
                raise errors.TooLong('client sent too long command "%s"' % redacted(line))
            pos = 0
            if line[0] not in (32, 13, 10) and not (in_list and line[0] == 41):
                raise BadCommand()
        elif in_list and c in (40, 41):               # ( )
            args.append(line[pos:pos + 1])
            pos += 1
        else:
            m = atom.match(line, pos)
            args.append(m.group())
            pos = m.end()


def _ok(s, text: bytes = b'') -> None:
    s.send(text + s.tag + OK)


def cmd_capability(s, args) -> None:
    conf = s.conf
    _ok(s, tls.by_starttls(s, conf.imap_capability, conf.imap_starttls_capability,
                           conf.imap_starttls_only_capability))


def cmd_noop(s, args) -> None:
    _ok(s)


def cmd_logout(s, args) -> None:
    _ok(s, b'* BYE\r\n')
    raise errors.SessionDone()


def cmd_id(s, args) -> None:
    """``ID NIL`` or ``ID ("name" "value" ...)``: answered, never forwarded (RFC 2971)."""
    if s.conf.imap_id:
        if len(args) == 1 and args[0].upper() == b'NIL':
            return _ok(s, b'* ID NIL\r\n')
        inner = args[1:-1]
        if (len(args) >= 2 and args[0] == b'(' and args[-1] == b')'
                and b'(' not in inner and b')' not in inner
                and len(inner) % 2 == 0 and len(inner) <= 2 * MAX_ID_PAIRS):
            return _ok(s, b'* ID NIL\r\n')
    raise BadCommand()


def cmd_starttls(s, args) -> None:
    if s.tls or s.conf.starttls == 'off':
        raise BadCommand()
    _ok(s)
    tls.starttls(s)


def cmd_login(s, args) -> bool:
    if tls.tls_required(s) or len(args) != 2 or not args[0]:
        raise BadCommand()
    s.login, s.passwd = args
    sasl.check_credentials(s.login, s.passwd)
    s.auth_method = 'plain'
    return True


def cmd_authenticate(s, args) -> bool:
    if tls.tls_required(s) or not 1 <= len(args) <= 2:
        raise BadCommand()
    sasl.run_mechanism(s, args[0], args[1] if len(args) == 2 else None, s.conf.imap_auth,
                       lambda text: sasl.answer(s, SASL_CHALLENGE + text + b'\r\n'))
    return True


COMMANDS = {b'CAPABILITY': cmd_capability, b'NOOP': cmd_noop, b'LOGOUT': cmd_logout,
            b'STARTTLS': cmd_starttls, b'LOGIN': cmd_login, b'AUTHENTICATE': cmd_authenticate,
            b'ID': cmd_id}


def login_upstream(s, up) -> None:
    """LOGIN with synchronizing literals under the client's tag (imap.md section 6); the
    backend's untagged lines and its tagged OK are relayed to the client."""
    tag, login, passwd = s.tag, s.login, s.passwd or b''
    greeting = up.read_reply(s)
    up.check(s, greeting, greeting.startswith(b'* OK'))
    if up.tls == 'starttls':
        backend_tls.starttls(s, up)         # STARTTLS to the backend
    if s.conf.imap_forward_client_id:
        # Beyond nginx: the client's address in ID; any tagged answer will do.
        up.send(s, realip.imap_id_command(s, tag), 'sending ID to upstream')
        line = up.read_reply(s)
        while line.startswith(b'* '):
            line = up.read_reply(s)
        up.check(s, line, line.startswith(tag))
    if oauth.replays(s):
        return relay_final_reply(s, up, tag, oauth.imap_login(s, up, greeting))
    up.send(s, b'%sLOGIN {%d}\r\n' % (tag, len(login)), 'sending LOGIN command to upstream')
    ready = up.read_reply(s)
    up.check(s, ready, ready.startswith(b'+'))
    up.send(s, b'%s {%d}\r\n' % (login, len(passwd)), 'sending user name to upstream')
    ready = up.read_reply(s)
    up.check(s, ready, ready.startswith(b'+'))
    up.send(s, passwd + b'\r\n', 'sending password to upstream')
    relay_final_reply(s, up, tag, up.read_reply(s))


def relay_final_reply(s, up, tag: bytes, line: bytes) -> None:
    """Relay the backend's untagged lines and its tagged OK to the client (imap.md
    section 6; any number of untagged lines, e.g. Dovecot's CAPABILITY)."""
    relayed = b''
    while line.startswith(b'* '):
        relayed += line
        if len(relayed) > s.conf.proxy_buffer:
            raise errors.UpstreamError('upstream sent too long response line: "%s"'
                                       % relayed[:64].decode('latin-1'))
        line = up.read_reply(s)
    up.check(s, relayed + line, line.startswith(tag + b'OK'))
    s.send(relayed + line)
