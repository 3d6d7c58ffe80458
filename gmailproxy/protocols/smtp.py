"""SMTP (smtp.md): greeting, client dialogue until credentials (or a RCPT TO with
``smtp_auth none``), then the backend EHLO/XCLIENT/HELO/AUTH/MAIL/RCPT login.

Kept as nginx has it: ``starttls only`` blocks only AUTH before TLS, so with
``smtp_auth none`` MAIL and RCPT still work in plaintext (smtp.md section 5).
Beyond nginx: raw client input quoted in log lines stops before any AUTH argument.
"""
import re

from gevent import select

from .. import backend_tls, errors, oauth, resolver, sasl
from .. import ssl as tls
from ..config import values
from ..config.directives import D, MAIL_SERVER
from ..errors import BadCommand
from ..log import printable

NAME = 'smtp'
PORTS = (25, 465, 587)

DIRECTIVES = [
    D('smtp_client_buffer', MAIL_SERVER, '1', values.size, default=values.page_size),
    D('smtp_greeting_delay', MAIL_SERVER, '1', values.time_ms, default=0.0),
    D('smtp_capabilities', MAIL_SERVER, '1+', values.words, multi='extend', default=()),
    D('smtp_auth', MAIL_SERVER, '1+',
      values.methods('plain', 'login', 'cram-md5', 'external', 'xoauth2', 'oauthbearer',
                     'none'),
      multi='extend', default=('plain', 'login')),
]

OK = b'250 2.0.0 OK\r\n'
REPLIES = {
    'invalid': b'500 5.5.1 Invalid command\r\n',
    'internal': b'451 4.3.2 Internal server error\r\n',
    'cert_error': b'421 4.7.1 SSL certificate error\r\n',
    'cert_missing': b'421 4.7.1 No required SSL certificate\r\n',
    'limit_address': b'421 4.7.0 Too many connections from your address\r\n',
    'limit_login': b'421 4.7.0 Too many sessions for this user\r\n',
    'limit_failures': b'421 4.7.0 Too many failed logins, try again later\r\n',
    'invalid_argument': b'501 5.5.4 Invalid argument\r\n',
    'bad_sequence': b'503 5.5.1 Bad sequence of commands\r\n',
    'auth_required': b'530 5.7.1 Authentication required\r\n',
    'pipelining': b'503 5.5.0 Improper use of SMTP command pipelining\r\n',
    'bye': b'221 2.0.0 Bye\r\n',
    'starttls': b'220 2.0.0 Start TLS\r\n',
    'auth_ok': b'235 2.0.0 OK\r\n',
}
AUTH_FAILED_CODE = b'535 5.7.0'
OAUTH_FAILED_CODE = b'535 5.7.8'        # RFC 4954 "credentials invalid", as Gmail sends
AUTH_ORDER = (('plain', b'PLAIN'), ('login', b'LOGIN'), ('cram-md5', b'CRAM-MD5'),
              ('external', b'EXTERNAL'), ('xoauth2', b'XOAUTH2'),
              ('oauthbearer', b'OAUTHBEARER'))
SASL_CHALLENGE = b'334 '
MAX_ARGS = 11

# A verb: 4 letters or STARTTLS, ended by space, CR or LF (ngx_mail_smtp_parse_command).
_VERB = re.compile(rb'(?:[A-Za-z]{4}|[Ss][Tt][Aa][Rr][Tt][Tt][Ll][Ss])(?=[ \r\n])')
_AUTH_LINE = re.compile(rb'(?im)^auth +[^ \r\n]*')
_XTEXT = re.compile(rb'[\x00-\x20+=\x7f-\xff]')


def client_buffer(conf) -> int:
    return conf.smtp_client_buffer


def finalize(conf) -> None:
    """Greeting, HELO reply and the three EHLO replies, built once (smtp.md 6)."""
    # configuration text keeps non-UTF-8 bytes as surrogates: give them back as bytes
    name = conf.server_name.encode('utf-8', 'surrogateescape')
    caps = [name] + [word.encode('utf-8', 'surrogateescape') for word in conf.smtp_capabilities]
    methods = [word for method, word in AUTH_ORDER if method in conf.smtp_auth]
    auth = [b'AUTH ' + b' '.join(methods)] if methods else []
    conf.smtp_greeting = b'220 ' + name + b' ESMTP ready\r\n'
    conf.smtp_helo_reply = b'250 ' + name + b'\r\n'
    conf.smtp_ehlo = _multiline(caps + auth)
    conf.smtp_ehlo_starttls = _multiline(caps + auth + [b'STARTTLS'])
    conf.smtp_ehlo_starttls_only = _multiline(caps + [b'STARTTLS'])


def _multiline(lines: list) -> bytes:
    return b''.join(b'250-' + line + b'\r\n' for line in lines[:-1]) + \
        b'250 ' + lines[-1] + b'\r\n'


def reply(s, key: str) -> bytes:
    return REPLIES[key]


def auth_failed_reply(s, exc: errors.AuthFailed) -> bytes:
    """``<Auth-Error-Code or 535 5.7.0> <Auth-Status text>`` (XOAUTH2 and
    OAUTHBEARER: 535 5.7.8)."""
    default = OAUTH_FAILED_CODE if s.auth_method in oauth.METHODS else AUTH_FAILED_CODE
    return ((exc.error_code or default) + b' '
            + exc.message.encode('utf-8', 'replace') + b'\r\n')


def start(s) -> None:
    """Client host name, the optional greeting delay, then the greeting (section 1)."""
    conf = s.conf
    s.client_host = resolver.client_host(s)
    if conf.smtp_greeting_delay:
        s.action = 'in delay pipelining state'
        if _talks_first(s, conf.smtp_greeting_delay):
            if not s.stream.buf:
                s.stream.fill()                 # one read, as nginx
            s.info('client was rejected before greeting: "%s"' % _shown(s.stream.buf))
            s.send(REPLIES['pipelining'])
            raise errors.SessionDone()
    s.action = 'sending client greeting line'
    s.send(conf.smtp_greeting)


def _talks_first(s, delay: float) -> bool:
    """Did the client send anything before the greeting (waiting up to ``delay``)?"""
    if s.stream.buf:
        return True
    pending = getattr(s.sock, 'pending', None)      # TLS: bytes already decrypted
    if pending is not None and pending():
        return True
    readable, _, _ = select.select([s.sock], [], [], delay)
    return bool(readable)


def reset(s) -> None:
    """After an Auth-Wait rejection: HELO and MAIL stay (a refused RCPT may be
    retried with another recipient)."""


def serve(s) -> None:
    """Answer commands until credentials are complete (AUTH) or a RCPT TO is stored."""
    while True:
        try:
            line = s.stream.read_line()
        except errors.TooLong:
            raise errors.TooLong('client sent too long command "%s"'
                                 % _shown(s.stream.buf)) from None
        try:
            verb, args = parse(line)
            if COMMANDS[verb](s, line, args):
                return
        except BadCommand as exc:
            s.invalid(exc)


def parse(line: bytes) -> tuple:
    """``(VERB, [args])`` per ngx_mail_smtp_parse_command; BadCommand if not valid."""
    body = line[:-1]
    if body.endswith(b'\r'):
        body = body[:-1]
    verb = _VERB.match(body + b'\n')
    if verb is None or b'\r' in body:
        raise BadCommand()
    name = verb.group().upper()
    if name not in COMMANDS:
        raise BadCommand()
    args = body[verb.end():].split(b' ')
    args = [arg for arg in args if arg]
    if len(args) > MAX_ARGS:
        raise BadCommand()
    return name, args


def _shown(data: bytes) -> str:
    """Client input for a log line: CR and LF as ``_`` (nginx), and nothing after an
    AUTH mechanism, since what follows is a credential."""
    auth = _AUTH_LINE.search(data)
    if auth is not None:
        data = data[:auth.end()] + b' ...'
    return printable(data.replace(b'\r', b'_').replace(b'\n', b'_'), limit=2048)


def _stored(line: bytes) -> bytes:
    """A MAIL/RCPT line as typed, from the verb to the end of its last argument."""
    return line.rstrip(b'\r\n').rstrip(b' ')


def cmd_helo(s, line, args) -> None:
    if len(args) != 1:
        return s.send(REPLIES['invalid_argument'])
    s.helo = args[0]
    s.mail_from = s.rcpt_to = None
    s.send(s.conf.smtp_helo_reply)


def cmd_ehlo(s, line, args) -> None:
    if len(args) != 1:
        return s.send(REPLIES['invalid_argument'])
    s.helo = args[0]
    s.mail_from = s.rcpt_to = None
    s.esmtp = True
    conf = s.conf
    s.send(tls.by_starttls(s, conf.smtp_ehlo, conf.smtp_ehlo_starttls,
                           conf.smtp_ehlo_starttls_only))


def cmd_noop(s, line, args) -> None:
    s.send(OK)


def cmd_rset(s, line, args) -> None:
    s.mail_from = s.rcpt_to = None
    s.send(OK)


def cmd_quit(s, line, args) -> None:
    s.send(REPLIES['bye'])
    raise errors.SessionDone()


def cmd_starttls(s, line, args) -> None:
    if s.tls or s.conf.starttls == 'off':
        raise BadCommand()
    s.helo = s.mail_from = s.rcpt_to = None      # RFC 3207: forget what came before TLS
    s.send(REPLIES['starttls'])
    tls.starttls(s)


def cmd_mail(s, line, args) -> None:
    if 'none' not in s.conf.smtp_auth:
        s.info('client was rejected: "%s"' % _shown(line + s.stream.buf))
        return s.send(REPLIES['auth_required'])
    if s.mail_from:
        return s.send(REPLIES['bad_sequence'])
    if not args:
        return s.send(REPLIES['invalid_argument'])
    s.mail_from = _stored(line)
    s.login = s.passwd = None        # CVE-2025-53859: not a failed AUTH's credentials
    s.send(OK)


def cmd_rcpt(s, line, args) -> bool:
    if not s.mail_from:
        return s.send(REPLIES['bad_sequence'])
    if not args:
        return s.send(REPLIES['invalid_argument'])
    s.rcpt_to = _stored(line)
    s.auth_method = 'none'
    return True


def cmd_invalid(s, line, args) -> None:
    raise BadCommand()


def cmd_auth(s, line, args) -> bool:
    if tls.tls_required(s):
        raise BadCommand()
    if not args:
        return s.send(REPLIES['invalid_argument'])
    if len(args) > 2:
        raise BadCommand()
    sasl.run_mechanism(s, args[0], args[1] if len(args) == 2 else None, s.conf.smtp_auth,
                       lambda text: sasl.answer(s, SASL_CHALLENGE + text + b'\r\n'))
    return True


COMMANDS = {b'HELO': cmd_helo, b'EHLO': cmd_ehlo, b'AUTH': cmd_auth, b'MAIL': cmd_mail,
            b'RCPT': cmd_rcpt, b'RSET': cmd_rset, b'NOOP': cmd_noop, b'QUIT': cmd_quit,
            b'STARTTLS': cmd_starttls, b'VRFY': cmd_invalid, b'EXPN': cmd_invalid,
            b'HELP': cmd_invalid}


def xtext(value: bytes) -> bytes:
    """RFC 3461 xtext, as nginx 1.29.2+ encodes XCLIENT LOGIN=."""
    return _XTEXT.sub(lambda m: b'+%02X' % m.group()[0], value)


def xclient_line(s) -> bytes:
    """``XCLIENT ADDR=<addr>[ LOGIN=<login>] NAME=<host>`` (smtp.md section 8)."""
    addr = s.client_ip.encode()
    if b':' in addr:
        addr = b'IPV6:' + addr
    line = b'XCLIENT ADDR=' + addr
    if s.login and not s.conf.proxy_smtp_auth:
        line += b' LOGIN=' + xtext(s.login)
    return line + b' NAME=' + (s.client_host or resolver.UNAVAILABLE) + b'\r\n'


def login_upstream(s, up) -> None:
    """The backend dialogue of smtp.md section 7; each reply checked by its command."""
    conf = s.conf
    greeting = up.read_reply(s, multiline=True)
    up.check(s, greeting, greeting.startswith(b'220'))
    if up.tls == 'starttls':
        backend_tls.starttls(s, up)         # STARTTLS to the backend
    verb = b'EHLO ' if s.esmtp or conf.xclient else b'HELO '
    _step(s, up, verb + conf.server_name.encode('utf-8', 'surrogateescape') + b'\r\n',
          'sending HELO/EHLO to upstream', (b'250',))
    if conf.xclient:
        _step(s, up, xclient_line(s), 'sending XCLIENT to upstream', (b'220', b'250'))
        if s.helo:
            verb = b'EHLO ' if s.esmtp else b'HELO '
            _step(s, up, verb + s.helo + b'\r\n',
                  'sending client HELO/EHLO to upstream', (b'250',))
    if s.auth_method == 'none':
        _step(s, up, s.mail_from + b'\r\n', 'sending MAIL FROM to upstream', (b'250',))
        up.send(s, s.rcpt_to + b'\r\n', 'sending RCPT TO to upstream')
        s.send(up.read_reply(s, multiline=True))      # whatever it says, even 5xx
        return
    if conf.proxy_smtp_auth and oauth.replays(s):
        oauth.smtp_auth(s, up)
    elif conf.proxy_smtp_auth:
        if s.passwd is None:
            s.action = 'sending AUTH to upstream'
            raise errors.UpstreamError('no password available')
        plain = sasl.b64encode(b'\0' + s.login + b'\0' + s.passwd)
        _step(s, up, b'AUTH PLAIN ' + plain + b'\r\n', 'sending AUTH to upstream',
              (b'235',))
    s.send(REPLIES['auth_ok'])


def _step(s, up, line: bytes, action: str, expected: tuple) -> None:
    up.send(s, line, action)
    answer = up.read_reply(s, multiline=True)
    up.check(s, answer, answer.startswith(expected))
