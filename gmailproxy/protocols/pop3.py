"""POP3 (pop3.md): client dialogue until credentials, then the backend USER/PASS login.

Beyond nginx: ``pop3_client_buffer`` (nginx's POP3 command buffer is fixed at 128 bytes,
which rejects long user names and ``AUTH PLAIN`` responses; 128 stays the default).
"""
from .. import backend_tls, errors, oauth, sasl
from .. import ssl as tls
from ..config import values
from ..log import printable
from ..config.directives import D, MAIL_SERVER
from ..errors import BadCommand

NAME = 'pop3'
PORTS = (110, 995)

DIRECTIVES = [
    D('pop3_capabilities', MAIL_SERVER, '1+', values.words, multi='extend',
      default=('TOP', 'USER', 'UIDL')),
    D('pop3_auth', MAIL_SERVER, '1+',
      values.methods('plain', 'apop', 'cram-md5', 'external', 'xoauth2',
                     'oauthbearer'),
      multi='extend', default=('plain',)),
    # Beyond nginx (whose POP3 buffer is fixed at 128 bytes).
    D('pop3_client_buffer', MAIL_SERVER, '1', values.size, default=128),
]

GREETING = b'+OK POP3 ready'
OK = b'+OK\r\n'
REPLIES = {
    'invalid': b'-ERR invalid command\r\n',
    'internal': b'-ERR internal server error\r\n',
    'cert_error': b'-ERR SSL certificate error\r\n',
    'cert_missing': b'-ERR No required SSL certificate\r\n',
    'limit_address': b'-ERR [SYS/TEMP] Too many connections from your address\r\n',
    'limit_login': b'-ERR [SYS/TEMP] Too many sessions for this user\r\n',
    'limit_failures': b'-ERR [SYS/TEMP] Too many failed logins, try again later\r\n',
}
# SASL names in nginx's fixed order; LOGIN comes with ``plain``, APOP is never listed.
AUTH_ORDER = (('plain', b'PLAIN'), ('plain', b'LOGIN'), ('cram-md5', b'CRAM-MD5'),
              ('external', b'EXTERNAL'), ('xoauth2', b'XOAUTH2'),
              ('oauthbearer', b'OAUTHBEARER'))
SASL_CHALLENGE = b'+ '
MAX_ARGS = 3                  # ngx_mail_pop3_parse_command
COMMAND_LENGTH = 4


def client_buffer(conf) -> int:
    return conf.pop3_client_buffer


def finalize(conf) -> None:
    """Build the CAPA variants and the AUTH list once (pop3.md section 4)."""
    head = b'+OK Capability list follows\r\n'
    words = [w.encode('utf-8', 'surrogateescape') for w in conf.pop3_capabilities]
    listed = b''.join(w + b'\r\n' for w in words)
    names = [name for method, name in AUTH_ORDER if method in conf.pop3_auth]
    sasl_line = b'SASL' + b''.join(b' ' + name for name in names) + b'\r\n'
    conf.pop3_capability = head + listed + sasl_line + b'.\r\n'
    conf.pop3_starttls_capability = head + listed + sasl_line + b'STLS\r\n.\r\n'
    conf.pop3_starttls_only_capability = (
        head + b''.join(w + b'\r\n' for w in words if w.upper() != b'USER')
        + b'STLS\r\n.\r\n')
    conf.pop3_auth_capability = (b'+OK methods supported:\r\n'
                                 + b''.join(name + b'\r\n' for name in names)
                                 + b'.\r\n')
    conf.pop3_salted = 'apop' in conf.pop3_auth or 'cram-md5' in conf.pop3_auth


def reply(s, key: str) -> bytes:
    return REPLIES[key]


def auth_failed_reply(s, exc: errors.AuthFailed) -> bytes:
    return b'-ERR ' + exc.message.encode('utf-8', 'replace') + b'\r\n'


def start(s) -> None:
    """The greeting; with APOP or CRAM-MD5 enabled it carries the session's salt."""
    if s.conf.pop3_salted:
        s.salt = sasl.make_salt(s.conf.server_name)
        s.send(GREETING + b' ' + s.salt + b'\r\n')
    else:
        s.send(GREETING + b'\r\n')


def reset(s) -> None:
    """After an Auth-Wait rejection nginx returns to the start state; ``serve`` always
    begins there, and like nginx we keep the login for the log lines."""


def serve(s) -> None:
    """Answer pre-authentication commands until credentials are complete.

    Every invalid command returns to the start state (nginx resets ``mail_state``),
    which here is simply this loop: the "user" state lives inside ``cmd_user``.
    """
    while True:
        try:
            name, args = read_command(s)
            handler = COMMANDS.get(name)
            if handler is None:
                raise BadCommand()
            if handler(s, args):
                return
        except BadCommand as exc:
            s.invalid(exc)


def _read_line(s, secret: bool = False) -> bytes:
    """The next line; a too-long one is logged with its command word only (nginx logs
    the whole buffer, which would hold the password of a long PASS, APOP or AUTH
    line)."""
    try:
        return s.stream.read_line()
    except errors.TooLong:
        head = b'' if secret else s.stream.buf.split(b' ', 1)[0][:COMMAND_LENGTH]
        raise errors.TooLong('client sent too long command "%s..."'
                             % printable(head)) from None


def _body(line: bytes) -> bytes:
    """The line without its LF or CRLF; any other CR makes it invalid (common.md 1)."""
    body = line[:-2] if line.endswith(b'\r\n') else line[:-1]
    if b'\r' in body:
        raise BadCommand()
    return body


def read_command(s) -> tuple[bytes, list]:
    """``(NAME, args)`` from the next line, parsed as ngx_mail_pop3_parse_command does.

    The command is exactly 4 letters. For ``USER``/``PASS`` the one argument is the rest
    of the line after the spaces (inner and trailing spaces kept); other commands split
    at spaces, at most 3 arguments.
    """
    body = _body(_read_line(s))
    name, _, rest = body.partition(b' ')
    if len(name) != COMMAND_LENGTH or not name.isalpha():      # bytes: ASCII letters
        raise BadCommand()
    name = name.upper()
    if name in (b'USER', b'PASS'):
        rest = rest.lstrip(b' ')
        return name, [rest] if rest else []
    args = [arg for arg in rest.split(b' ') if arg]
    if len(args) > MAX_ARGS:
        raise BadCommand()
    return name, args


def read_response(s, challenge: bytes) -> bytes:
    """Send a SASL challenge; the answer line is parsed as arguments (nginx keeps its
    parser in the argument state after AUTH) and the first one is the response."""
    s.send(challenge)
    body = _body(_read_line(s, secret=True))
    first, _, rest = body.partition(b' ')
    if len([a for a in rest.split(b' ') if a]) > MAX_ARGS - 1:
        raise BadCommand()
    return first


def cmd_capa(s, args) -> None:
    conf = s.conf
    s.send(tls.by_starttls(s, conf.pop3_capability, conf.pop3_starttls_capability,
                           conf.pop3_starttls_only_capability))


def cmd_capa_user(s, args) -> None:
    s.send(s.conf.pop3_capability)      # nginx quirk: never the STLS variants here


def cmd_noop(s, args) -> None:
    s.send(OK)


def cmd_quit(s, args) -> None:
    s.send(OK)
    raise errors.SessionDone()


def cmd_stls(s, args) -> None:
    if s.tls or s.conf.starttls == 'off':
        raise BadCommand()
    s.send(OK)
    tls.starttls(s)


def cmd_user(s, args) -> bool:
    """``USER name``, then nginx's "user" state: PASS completes the credentials; CAPA,
    NOOP and QUIT are answered; anything else is invalid and back to the start."""
    if tls.tls_required(s) or len(args) != 1:
        raise BadCommand()
    s.login = args[0]
    s.send(OK)
    while True:
        name, args = read_command(s)
        if name == b'PASS':
            return cmd_pass(s, args)
        handler = USER_COMMANDS.get(name)
        if handler is None:
            raise BadCommand()
        handler(s, args)


def cmd_pass(s, args) -> bool:
    if len(args) != 1:
        raise BadCommand()
    sasl.check_credentials(s.login, args[0])
    s.passwd = args[0]
    s.auth_method = 'plain'
    return True


def cmd_apop(s, args) -> bool:
    """``APOP name digest``: the digest goes to auth_http with the salt, unchecked."""
    if tls.tls_required(s) or len(args) != 2 or 'apop' not in s.conf.pop3_auth:
        raise BadCommand()
    sasl.check_credentials(args[0], args[1])
    s.login, s.passwd = args
    s.auth_method = 'apop'
    return True


def cmd_auth(s, args) -> bool:
    if tls.tls_required(s):
        raise BadCommand()
    if not args:
        s.send(s.conf.pop3_auth_capability)
        return False
    if len(args) > 2:
        raise BadCommand()
    sasl.run_mechanism(s, args[0], args[1] if len(args) == 2 else None, s.conf.pop3_auth,
                       lambda text: read_response(s, SASL_CHALLENGE + text + b'\r\n'))
    return True


COMMANDS = {b'USER': cmd_user, b'APOP': cmd_apop, b'AUTH': cmd_auth, b'CAPA': cmd_capa,
            b'NOOP': cmd_noop, b'QUIT': cmd_quit, b'STLS': cmd_stls}
USER_COMMANDS = {b'CAPA': cmd_capa_user, b'NOOP': cmd_noop, b'QUIT': cmd_quit}


def login_upstream(s, up) -> None:
    """USER/PASS whatever the client used (pop3.md section 5); the backend's answer to
    PASS is relayed to the client verbatim."""
    login, passwd = s.login, s.passwd or b''
    if b'\r' in login or b'\n' in login or b'\r' in passwd or b'\n' in passwd:
        raise errors.UpstreamError('upstream POP3 credential contains CR or LF')
    greeting = up.read_reply(s)
    up.check(s, greeting, greeting.startswith(b'+OK'))
    if up.tls == 'starttls':
        backend_tls.starttls(s, up)         # STARTTLS to the backend
    if oauth.replays(s):
        return oauth.pop3_login(s, up)
    up.send(s, b'USER ' + login + b'\r\n', 'sending user name to upstream')
    answer = up.read_reply(s)
    up.check(s, answer, answer.startswith(b'+OK'))
    up.send(s, b'PASS ' + passwd + b'\r\n', 'sending password to upstream')
    answer = up.read_reply(s)
    up.check(s, answer, answer.startswith(b'+OK'))
    s.send(answer)
