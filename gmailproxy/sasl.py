"""SASL decoding shared by IMAP, POP3 and SMTP (common.md sections 4-5).

Pure functions: each decoder takes the base64 text the client sent and returns the
credentials, or raises ``BadCommand`` with the info-level text nginx logs
(ngx_mail_auth_plain, ngx_mail_auth_login_username, ngx_mail_auth_cram_md5,
ngx_mail_auth_external). XOAUTH2 and OAUTHBEARER go beyond nginx (their failure
dialogue and the replay to the backend are in oauth.py).
"""
import binascii
import hashlib
import hmac
import re
import secrets
import time

from .errors import BadCommand, TooLong

# Everything before the first '=' must be from the base64 alphabet (ngx_decode_base64).
_B64_BODY = re.compile(rb'[A-Za-z0-9+/]*')

_SASLNAME = re.compile(rb'(?:[^=,]|=2C|=3D)*')

USERNAME_CHALLENGE = b'VXNlcm5hbWU6'    # base64 "Username:"
PASSWORD_CHALLENGE = b'UGFzc3dvcmQ6'    # base64 "Password:"


def b64decode(data: bytes) -> bytes:
    """Decode exactly what nginx's ngx_decode_base64 accepts.

    Decoding stops at the first ``=`` (anything after it is ignored); before it only
    ``A-Z a-z 0-9 + /`` are allowed; padding is optional; a length of 4k+1 is an error;
    leftover bits are ignored. Raises ``ValueError`` otherwise.
    """
    end = _B64_BODY.match(data).end()
    if end < len(data) and data[end] != 0x3D:      # 0x3D is '='
        raise ValueError('invalid base64 character')
    rest = end % 4
    if rest == 1:
        raise ValueError('invalid base64 length')
    body = data[:end]
    if rest:
        body += b'=' * (4 - rest)
    return binascii.a2b_base64(body)


def b64encode(data: bytes) -> bytes:
    """Standard base64 with padding and no line breaks."""
    return binascii.b2a_base64(data, newline=False)


def first_token(line: bytes) -> bytes:
    """The SASL response in a client line: nginx takes only the first space-separated
    token (the rest is ignored); the line ending (CRLF or bare LF) is dropped."""
    if line.endswith(b'\n'):
        line = line[:-2] if line.endswith(b'\r\n') else line[:-1]
    return line.split(b' ', 1)[0]


def check_credentials(login: bytes, passwd: bytes) -> None:
    """Refuse CR or LF in either value and NUL in the login.

    Beyond nginx: such bytes would let a client append its own command line to the
    backend login dialogue (POP3 ``USER``/``PASS``, SMTP ``XCLIENT LOGIN=``).
    """
    if (b'\r' in login or b'\n' in login or b'\0' in login
            or b'\r' in passwd or b'\n' in passwd):
        raise BadCommand('client sent invalid credentials with CR or LF')


def _decode(b64: bytes, mech: str) -> bytes:
    try:
        return b64decode(b64)
    except ValueError:
        raise BadCommand('client sent invalid base64 encoding in AUTH %s command'
                         % mech) from None


def decode_plain(b64: bytes) -> tuple[bytes, bytes]:
    """AUTH PLAIN (ngx_mail_auth_plain): ``authzid NUL login NUL password``.

    The authorization identity is discarded; the password is everything after the
    second NUL and may itself contain NULs.
    """
    plain = _decode(b64, 'PLAIN')
    parts = plain.split(b'\0', 2)
    if len(parts) < 2:
        raise BadCommand('client sent invalid login in AUTH PLAIN command')
    if len(parts) < 3:
        raise BadCommand('client sent invalid password in AUTH PLAIN command')
    login, passwd = parts[1], parts[2]
    check_credentials(login, passwd)
    return login, passwd


def decode_login(b64: bytes, password: bool = False) -> bytes:
    """One AUTH LOGIN line, the user name or (``password=True``) the password
    (ngx_mail_auth_login_username / _password). Empty values are allowed.

    A user name may contain neither CR, LF nor NUL; a password neither CR nor LF
    (NUL is kept, as nginx keeps it).
    """
    value = _decode(b64, 'LOGIN')
    if password:
        check_credentials(b'', value)
    else:
        check_credentials(value, b'')
    return value


def decode_cram_md5(b64: bytes) -> tuple[bytes, bytes]:
    """AUTH CRAM-MD5 response (ngx_mail_auth_cram_md5): ``login SP digest``.

    Split at the first space; the digest must be exactly 32 bytes (nginx does not
    check that it is hex).
    """
    text = _decode(b64, 'CRAM-MD5')
    login, sep, digest = text.partition(b' ')
    if not sep or len(digest) != 32:
        raise BadCommand('client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command')
    check_credentials(login, digest)
    return login, digest


def decode_external(b64: bytes) -> bytes:
    """AUTH EXTERNAL (ngx_mail_auth_external): the decoded authorization identity,
    possibly empty, becomes the login."""
    login = _decode(b64, 'EXTERNAL')
    check_credentials(login, b'')
    return login


def make_salt(server_name: str) -> bytes:
    """The APOP / CRAM-MD5 challenge ``<RANDOM.UNIXTIME@server_name>`` (ngx_mail_salt).

    nginx uses the C ``random()`` (0 .. 2**31-1); we draw the same range from the OS
    CSPRNG because the challenge is what keeps a sniffed digest from being replayed,
    and the Mersenne Twister behind ``random`` can be predicted from its outputs.
    """
    return b'<%d.%d@%s>' % (secrets.randbits(31), int(time.time()),
                             server_name.encode('utf-8', 'surrogateescape'))


def cram_md5_digest(salt: bytes, password: bytes) -> bytes:
    """The lowercase hex HMAC-MD5 of the salt keyed with the password (RFC 2195)."""
    return hmac.new(password, salt, hashlib.md5).hexdigest().encode()


def apop_digest(salt: bytes, password: bytes) -> bytes:
    """The lowercase hex MD5 of salt + password (RFC 1939 APOP)."""
    return hashlib.md5(salt + password).hexdigest().encode()


# --- OAuth 2.0 bearer tokens (beyond nginx) -------------------------------------------

def _bearer(value: bytes, mech: str) -> bytes:
    scheme, sep, token = value.partition(b' ')
    if not sep or scheme.lower() != b'bearer' or not token:
        raise BadCommand('client sent invalid %s response' % mech)
    return token


def _kvpairs(text: bytes, mech: str) -> dict[bytes, bytes]:
    """``key=value`` pairs, each ended by 0x01, then one more 0x01 (RFC 7628 3.1)."""
    if not text.endswith(b'\x01\x01'):
        raise BadCommand('client sent invalid %s response' % mech)
    pairs = {}
    for item in text[:-2].split(b'\x01'):
        key, sep, value = item.partition(b'=')
        if not sep or not key:
            raise BadCommand('client sent invalid %s response' % mech)
        pairs.setdefault(key, value)
    return pairs


def decode_xoauth2(b64: bytes) -> tuple[bytes, bytes]:
    """Google's XOAUTH2: ``user=USER 0x01 auth=Bearer TOKEN 0x01 0x01``."""
    text = _decode(b64, 'XOAUTH2')
    pairs = _kvpairs(text, 'XOAUTH2')
    if b'user' not in pairs or b'auth' not in pairs:
        raise BadCommand('client sent invalid XOAUTH2 response')
    user, token = pairs[b'user'], _bearer(pairs[b'auth'], 'XOAUTH2')
    check_credentials(user, token)
    return user, token


def encode_xoauth2(user: bytes, token: bytes) -> bytes:
    return b64encode(b'user=%s\x01auth=Bearer %s\x01\x01' % (user, token))


def _saslname(value: bytes) -> bytes:
    """RFC 5801 saslname: ``,`` and ``=`` travel as ``=2C`` and ``=3D``."""
    if not _SASLNAME.fullmatch(value):
        raise ValueError('bad saslname')
    return value.replace(b'=2C', b',').replace(b'=3D', b'=')


def decode_oauthbearer(b64: bytes) -> tuple[bytes, bytes]:
    """RFC 7628 OAUTHBEARER: GS2 header ``n,a=USER,`` then 0x01-separated pairs
    including ``auth=Bearer TOKEN``. The user is empty when the header names none.
    Channel binding (``p=``) is refused: we never offer a -PLUS mechanism."""
    text = _decode(b64, 'OAUTHBEARER')
    flag, _, rest = text.partition(b',')
    authzid, sep, rest = rest.partition(b',')
    if flag not in (b'n', b'y') or not sep or not rest.startswith(b'\x01'):
        raise BadCommand('client sent invalid OAUTHBEARER response')
    if authzid and not authzid.startswith(b'a='):
        raise BadCommand('client sent invalid OAUTHBEARER response')
    try:
        user = _saslname(authzid[2:])
    except ValueError:
        raise BadCommand('client sent invalid OAUTHBEARER response') from None
    pairs = _kvpairs(rest[1:], 'OAUTHBEARER')
    if b'auth' not in pairs:
        raise BadCommand('client sent invalid OAUTHBEARER response')
    token = _bearer(pairs[b'auth'], 'OAUTHBEARER')
    check_credentials(user, token)
    return user, token


def encode_oauthbearer(user: bytes, token: bytes) -> bytes:
    """RFC 7628 initial response; an empty user leaves the authzid out (``n,,``)."""
    name = user.replace(b'=', b'=3D').replace(b',', b'=2C')
    gs2 = b'n,a=%s,' % name if user else b'n,,'
    return b64encode(b'%s\x01auth=Bearer %s\x01\x01' % (gs2, token))


# --- the mechanism dialogues, shared by IMAP AUTHENTICATE, POP3 AUTH and SMTP AUTH -----

def answer(s, challenge: bytes) -> bytes:
    """Send a challenge; the first token of the client's answer. A too long answer is
    logged as "...": it is base64 credentials."""
    try:
        return first_token(s.ask(challenge))
    except TooLong:
        raise TooLong('client sent too long command "..."') from None


def run_mechanism(s, mechanism: bytes, initial: bytes | None, enabled, ask) -> None:
    """One SASL exchange (common.md section 4): sets ``s.login``, ``s.passwd`` and
    ``s.auth_method`` or raises BadCommand. ``enabled`` is the protocol's ``*_auth``
    list (PLAIN and LOGIN are always accepted, as in nginx; the others only when
    listed); ``ask(b64)`` sends a challenge in the protocol's form (``+ x`` or
    ``334 x``) and returns the first token of the client's answer."""
    handler = MECHANISMS.get(mechanism.upper())
    if handler is None:
        raise BadCommand()
    handler(s, initial, enabled, ask)


def _plain(s, initial, enabled, ask) -> None:
    s.login, s.passwd = decode_plain(initial if initial is not None else ask(b''))
    s.auth_method = 'plain'


def _login(s, initial, enabled, ask) -> None:
    login = decode_login(initial if initial is not None else ask(USERNAME_CHALLENGE))
    s.passwd = decode_login(ask(PASSWORD_CHALLENGE), password=True)
    s.login = login
    s.auth_method = 'plain'           # nginx never reports "login"


def _cram_md5(s, initial, enabled, ask) -> None:
    if initial is not None or 'cram-md5' not in enabled:
        raise BadCommand()
    if s.salt is None:                # POP3 made it for the greeting; IMAP/SMTP now
        s.salt = make_salt(s.conf.server_name)
    s.login, s.passwd = decode_cram_md5(ask(b64encode(s.salt)))
    s.auth_method = 'cram-md5'


def _external(s, initial, enabled, ask) -> None:
    if 'external' not in enabled:
        raise BadCommand()
    s.login = decode_external(initial if initial is not None else ask(USERNAME_CHALLENGE))
    s.passwd = None                   # never an earlier attempt's password
    s.auth_method = 'external'


def _xoauth2(s, initial, enabled, ask) -> None:
    """Beyond nginx: the user and the bearer token go to auth_http as Auth-User and
    Auth-Pass (``Auth-Method: xoauth2``); an empty challenge asks for the response."""
    if 'xoauth2' not in enabled:
        raise BadCommand()
    s.login, s.passwd = decode_xoauth2(initial if initial is not None else ask(b''))
    s.auth_method = 'xoauth2'


def _oauthbearer(s, initial, enabled, ask) -> None:
    """Beyond nginx: RFC 7628, as XOAUTH2 (``Auth-Method: oauthbearer``); the user may
    be empty (no authzid), the auth service then names it in Auth-User."""
    if 'oauthbearer' not in enabled:
        raise BadCommand()
    s.login, s.passwd = decode_oauthbearer(initial if initial is not None else ask(b''))
    s.auth_method = 'oauthbearer'


MECHANISMS = {b'PLAIN': _plain, b'LOGIN': _login, b'CRAM-MD5': _cram_md5,
              b'EXTERNAL': _external, b'XOAUTH2': _xoauth2,
              b'OAUTHBEARER': _oauthbearer}
