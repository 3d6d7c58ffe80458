"""The parser entry points, driven offline: shared by the atheris harnesses next to this
file and by the hypothesis tests in tests/unit/test_properties.py.

Each ``check_*`` function feeds hostile bytes to one entry point of the real code and
raises ``AssertionError`` when a property breaks. Only our own error types may come out
of the code (``ProxyError`` and its subclasses, ``ConfigError``, and for DNS the
dnspython errors the resolver already catches); anything else is a bug and propagates
(atheris reports it as a crash, hypothesis shrinks it).

Properties checked beyond "no foreign exception":

* the dialogue (``proto.serve``) never buffers more than the client buffer, never
  reads past the end of the input, and each pass through it ends in credentials or
  one of our errors;
* the auth_http request built from whatever credentials the dialogue accepted has
  exactly its fixed header lines (no CR/LF smuggled in by a user name or password);
* the backend login sends exactly the expected command lines (no CR/LF in a SASL
  credential becoming a second command);
* PROXY parsing is incremental: every proper prefix of a header parses as
  "incomplete", never as something else;
* the auth_http response path returns either our error or an AuthResult whose
  backends are IP literals with ports 1-65535.

Nothing here opens a socket: sockets are ``FakeSock`` objects over byte strings.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gmailproxy import auth_http, errors, proxy_protocol, sasl  # noqa: E402
from gmailproxy import upstream as upstream_mod  # noqa: E402
from gmailproxy.config import lexer, parser  # noqa: E402
from gmailproxy.errors import ConfigError, ProxyError  # noqa: E402

LIMIT_FACTOR = 4      # a parser may hold at most this many times its input (+ slack)


# --- fake sockets -------------------------------------------------------------------

class FakeSock:
    """``recv`` hands out ``chunks`` in order (split to the size asked), then b'' (EOF);
    ``sendall`` records what the code wrote. ``reply(data)`` may queue more input after
    each write (a scripted backend)."""

    def __init__(self, chunks=(), reply=None, peer=('192.0.2.7', 40000),
                 local=('127.0.0.1', 143)):
        self.chunks = [bytes(c) for c in chunks if c]
        self.sent: list[bytes] = []
        self.reply = reply
        self.peer, self.local = peer, local
        self.family = 2
        self.received = 0

    def recv(self, size, flags=0):
        assert size > 0, 'recv(%d)' % size
        if not self.chunks:
            return b''
        data = self.chunks[0]
        if len(data) > size:
            self.chunks[0] = data[size:]
            data = data[:size]
        else:
            self.chunks.pop(0)
        self.received += len(data)
        return data

    def sendall(self, data):
        data = bytes(data)
        self.sent.append(data)
        if self.reply is not None:
            more = self.reply(data)
            if more:
                self.chunks.append(more)

    def send(self, data):
        self.sendall(data)
        return len(data)

    def getsockname(self):
        return self.local

    def getpeername(self):
        return self.peer

    def setsockopt(self, *args):
        pass

    def fileno(self):
        return -1

    def close(self):
        pass


def split(data: bytes, cuts) -> list[bytes]:
    """``data`` cut at the given positions (a TCP stream's segments)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# --- a loaded configuration ---------------------------------------------------------

CONF = '''
events { }
mail {
    error_log %(log)s debug;
    auth_http http://127.0.0.1:9/auth;
    auth_http_header X-Key "k";
    timeout 1s;
    max_errors 5;
    server_name fuzz.example;
    xclient on;
    imap_auth plain login cram-md5 external;
    pop3_auth plain apop cram-md5 external;
    server { listen 127.0.0.1:1143; protocol imap; }
    server { listen 127.0.0.1:1144; protocol imap; imap_client_buffer 1k; }
    server { listen 127.0.0.1:1110; protocol pop3; }
    server { listen 127.0.0.1:1025; protocol smtp;
             smtp_auth plain login cram-md5 external; }
    server { listen 127.0.0.1:1026; protocol smtp; smtp_auth none plain;
             proxy_smtp_auth on; smtp_client_buffer 1k; }
}
'''
_config = None


def config():
    """The configuration above, loaded once, its servers' loggers set (to /dev/null at
    debug, so every log line is formatted)."""
    global _config
    if _config is None:
        from gmailproxy import log
        fd, path = tempfile.mkstemp(suffix='.conf')
        with os.fdopen(fd, 'w') as f:
            f.write(CONF % {'log': os.devnull})
        try:
            _config = parser.load(path)
        finally:
            os.unlink(path)
        for conf in _config.servers:        # no server.attach_loggers: it would
            conf.logger = log.get_logger(conf.error_log)    # reset the main logger
    return _config


def listen_for(name: str):
    """'imap', 'imap1k', 'pop3', 'smtp', 'smtp_none' -> a Listen of that server."""
    index = {'imap': 0, 'imap1k': 1, 'pop3': 2, 'smtp': 3, 'smtp_none': 4}[name]
    return config().servers[index].listen[0]


def session(name: str, sock: FakeSock):
    from gmailproxy.session import Session
    return Session(sock, sock.peer, sock.local, listen_for(name))


# --- configuration ------------------------------------------------------------------

def check_lexer(data: bytes) -> list:
    """The tokenizer yields (str|None, int, bool) tuples ending with None, or raises
    ConfigError; each token is no longer than the input."""
    out = []
    try:
        for token in lexer.tokenize(data, 'fuzz.conf'):
            text, line, quoted = token
            assert text is None or isinstance(text, str), token
            assert isinstance(line, int) and 1 <= line <= data.count(b'\n') + 1, token
            assert isinstance(quoted, bool), token
            assert text is None or len(text) <= len(data), token
            out.append(token)
    except ConfigError as exc:
        assert ' in fuzz.conf:' in str(exc) or str(exc).endswith('fuzz.conf'), str(exc)
        return out
    assert out and out[-1][0] is None, out[-3:]
    return out


_conf_dir = None


def check_config(data: bytes) -> None:
    """The whole loader on a file holding ``data``: a Config or ConfigError. Includes
    are confined to an empty temporary folder by the ``prefix``."""
    global _conf_dir
    if _conf_dir is None:
        _conf_dir = tempfile.mkdtemp(prefix='fuzzconf')
    path = os.path.join(_conf_dir, 'mail.conf')
    with open(path, 'wb') as f:
        f.write(data)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL + 10)    # warnings go to the root logger
    try:
        parser.load('mail.conf', prefix=_conf_dir)
    except ConfigError:
        pass
    except ValueError as exc:
        if not (TOLERATE_KNOWN and 'null byte' in str(exc)):   # NUL in a file name
            raise
    except IndexError:
        if not (TOLERATE_KNOWN and b'unix:' in data.lower()):  # resolver unix:...
            raise
    finally:
        root.setLevel(level)


# --- SASL ----------------------------------------------------------------------------

def check_sasl(data: bytes) -> None:
    """Every decoder: credentials without CR/LF (and no NUL in a login), or BadCommand."""
    for decode in (sasl.decode_plain, sasl.decode_cram_md5, sasl.decode_xoauth2,
                   sasl.decode_oauthbearer):
        try:
            login, passwd = decode(data)
        except errors.BadCommand:
            continue
        _clean(login, passwd)
    for password in (False, True):
        try:
            value = sasl.decode_login(data, password=password)
        except errors.BadCommand:
            continue
        _clean(b'' if password else value, value if password else b'')
    try:
        _clean(sasl.decode_external(data), b'')
    except errors.BadCommand:
        pass
    try:
        decoded = sasl.b64decode(data)
        assert len(decoded) <= len(data), (len(decoded), len(data))
    except ValueError:
        pass
    token = sasl.first_token(data)
    assert b' ' not in token and len(token) <= len(data)


def _clean(login: bytes, passwd: bytes) -> None:
    assert b'\r' not in login and b'\n' not in login and b'\0' not in login, login
    assert b'\r' not in passwd and b'\n' not in passwd, passwd


# --- PROXY protocol ------------------------------------------------------------------

def check_proxy_protocol(data: bytes) -> None:
    """``parse`` of a buffer: (None, 0), (info, n <= len) or ProxyProtocolError; a
    complete header's proper prefixes are all incomplete, and bytes after a complete
    header change nothing."""
    try:
        info, size = proxy_protocol.parse(data)
    except proxy_protocol.ProxyProtocolError:
        return
    if info is None:
        assert size == 0
        assert len(data) < proxy_protocol.MAX_HEADER, len(data)
        return
    assert 0 < size <= len(data), (size, len(data))
    assert size <= proxy_protocol.MAX_HEADER
    for port in (info.src_port, info.dst_port):
        assert port is None or 0 <= port <= 65535, port
    header = data[:size]
    for cut in range(1, size):
        try:
            again = proxy_protocol.parse(header[:cut])
        except proxy_protocol.ProxyProtocolError as exc:
            raise AssertionError('prefix %r of a valid header refused: %s'
                                 % (header[:cut], exc)) from None
        assert again == (None, 0), (header[:cut], again)
    assert proxy_protocol.parse(header + b'X' * 8)[1] == size


# --- auth_http responses -------------------------------------------------------------

class _Url:
    uri = b'/auth'
    host_header = b'127.0.0.1'
    addr_text = '127.0.0.1:9'
    family, sockaddr, tls = 2, ('127.0.0.1', 9), None


URL = _Url()


def check_auth_response(data: bytes, cuts=(), proto: str = 'imap') -> object:
    """The response path of auth_http: ``_roundtrip`` over a fake socket cutting
    ``data`` into segments, then ``interpret``. Returns the AuthResult, the error, or
    'wait' (Auth-Status WAIT: the sleep is not taken)."""
    sock = FakeSock(split(data, cuts))
    try:
        headers = auth_http._roundtrip(URL, sock, b'GET / HTTP/1.0\r\n\r\n', 0, [], False)
    except errors.AuthServiceError as exc:
        return exc
    assert sock.received <= auth_http.RESPONSE_LIMIT + 1024, sock.received
    for name, value in headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)
    s = session(proto, FakeSock())
    s.login, s.passwd = b'alice', b'secret'
    slept = []
    real_sleep = auth_http.gevent.sleep
    auth_http.gevent.sleep = slept.append
    try:
        result = auth_http.interpret(s, URL, headers)
    except (errors.AuthFailed, errors.AuthServiceError) as exc:
        if isinstance(exc, errors.AuthFailed):
            _check_wait(exc.wait)
        return exc
    finally:
        auth_http.gevent.sleep = real_sleep
    if result is None:
        assert slept, 'WAIT without a sleep'
        _check_wait(slept[0])
        return 'wait'
    assert result.servers, 'OK without a backend'
    import socket as _socket
    for sockaddr, family, name in result.servers:
        _socket.inet_pton(family, sockaddr[0])
        assert 0 < sockaddr[1] < 65536, sockaddr
    assert b'\r' not in (result.login or b'') and b'\n' not in (result.login or b'')
    return result


# Bugs already reported, tolerated when FUZZ_TOLERATE_KNOWN=1 so a long fuzzing run
# goes on looking for new ones (the tests check them strictly, marked xfail).
TOLERATE_KNOWN = os.environ.get('FUZZ_TOLERATE_KNOWN') == '1'


def _check_wait(wait) -> None:
    """An Auth-Wait the session can sleep: gevent.sleep takes a finite float."""
    try:
        float(wait)
    except OverflowError:
        if not TOLERATE_KNOWN:
            raise AssertionError('Auth-Wait of %d digits: gevent.sleep raises '
                                 'OverflowError' % len(str(wait))) from None


# --- the client dialogue and the backend login --------------------------------------

INPUT_LIMIT = 1 << 16


def check_dialogue(name: str, data: bytes, cuts=()) -> list:
    """Run ``proto.start`` then ``proto.serve`` on ``data`` (cut into segments) until
    the input ends or the session ends; after each set of credentials check the
    auth_http request and the backend login built from them. Returns what happened
    (('creds', login, passwd, method) or ('end', error class name))."""
    return run_dialogue(name, FakeSock(split(data[:INPUT_LIMIT], cuts)))


def run_dialogue(name: str, sock: FakeSock) -> list:
    s = session(name, sock)
    proto = s.proto
    limit = proto.client_buffer(s.conf)
    happened = []
    try:
        proto.start(s)
        for _ in range(64):
            s.action = 'in auth state'
            proto.serve(s)
            assert len(s.stream.buf) <= limit, (len(s.stream.buf), limit)
            happened.append(('creds', s.login, s.passwd, s.auth_method))
            check_request(s)
            check_backend_login(s)
            s.upstream_name = None
            s.login_attempt += 1
            proto.reset(s)
    except ProxyError as exc:
        assert len(s.stream.buf) <= limit, (len(s.stream.buf), limit)
        happened.append(('end', type(exc).__name__))
    return happened


KNOWN_HEADERS = {b'Host', b'Auth-Method', b'Auth-User', b'Auth-Pass', b'Auth-Salt',
                 b'Auth-Protocol', b'Auth-Login-Attempt', b'Client-IP', b'Client-Host',
                 b'Auth-SMTP-Helo', b'Auth-SMTP-From', b'Auth-SMTP-To', b'X-Key'}


def check_request(s) -> bytes:
    """The auth_http request for the credentials the dialogue accepted: the request
    line, nginx's headers in order, each one line; user and password escaped."""
    request = auth_http.build_request(s, URL)
    assert request.endswith(b'\r\n\r\n'), request
    lines = request[:-4].split(b'\r\n')
    for line in lines:
        assert b'\r' not in line and b'\n' not in line, line
        if not line.startswith(b'Auth-SMTP-'):    # nginx sends those unescaped
            assert b'\0' not in line, line
    assert lines[0].startswith(b'GET /auth HTTP/1.'), lines[0]
    names = [line.split(b':', 1)[0] for line in lines[1:]]
    assert names[:4] == [b'Host', b'Auth-Method', b'Auth-User', b'Auth-Pass'], names
    assert len(set(names)) == len(names), names
    assert set(names) <= KNOWN_HEADERS, names
    values = dict(line.split(b': ', 1) for line in lines[1:] if b': ' in line)
    assert unescape(values[b'Auth-User']) == (s.login or b''), (values, s.login)
    assert unescape(values[b'Auth-Pass']) == (s.passwd or b'')
    for value in (values[b'Auth-User'], values[b'Auth-Pass']):
        assert b' ' not in value and not any(c < 0x20 for c in value), value
    return request


def unescape(value: bytes) -> bytes:
    """The inverse of nginx's mail-auth escaping (%XX for controls, space and %)."""
    out, i = bytearray(), 0
    while i < len(value):
        if value[i] == 0x25:
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return bytes(out)


def _imap_backend(s):
    state = {'n': 0}

    def reply(line):
        state['n'] += 1
        if line.endswith(b'}\r\n') and state['n'] <= 2:
            return b'+ OK\r\n'
        return s.tag + b'OK done\r\n'
    return b'* OK backend\r\n', reply


def _pop3_backend(s):
    return b'+OK backend\r\n', lambda line: b'+OK\r\n'


def _smtp_backend(s):
    def reply(line):
        if line.startswith(b'AUTH '):
            return b'235 2.7.0 ok\r\n'
        if line.startswith(b'EHLO '):
            return b'250-backend\r\n250 8BITMIME\r\n'
        return b'250 ok\r\n'
    return b'220 backend ESMTP\r\n', reply


BACKENDS = {'imap': _imap_backend, 'pop3': _pop3_backend, 'smtp': _smtp_backend}


class _AsIf:
    """What ``interpret`` would give for an ``Auth-Status: OK`` echoing nothing."""
    servers = [(('127.0.0.1', 1), 2, '127.0.0.1:1')]


def check_backend_login(s) -> list:
    """Run the protocol's ``login_upstream`` against an accepting scripted backend and
    check every line sent: exactly the commands of the dialogue, each a single line
    (or, for IMAP, literals of the announced sizes)."""
    proto = s.proto
    greeting, reply = BACKENDS[proto.NAME](s)
    sock = FakeSock([greeting], reply=reply)
    up = upstream_mod.Upstream(sock, s.conf.proxy_buffer, 'backend:1')
    client_sent = len(s.sock.sent)
    if s.passwd is None and proto.NAME != 'smtp':
        s.passwd = b'from-auth-service'      # interpret() requires one for IMAP/POP3
    try:
        proto.login_upstream(s, up)
    except errors.UpstreamError as exc:
        # Only our own refusals of unusable credentials may stop an accepting backend.
        assert proto.NAME == 'pop3' or 'no password available' in exc.message, exc.message
        assert any(c in (s.login or b'') + (s.passwd or b'') for c in (b'\r', b'\n')) \
            or 'no password available' in exc.message, exc.message
        return sock.sent
    finally:
        del s.sock.sent[client_sent:]       # the relayed backend answer
    sent = sock.sent
    if proto.NAME == 'imap':
        login, passwd = s.login, s.passwd or b''
        assert sent == [s.tag + b'LOGIN {%d}\r\n' % len(login),
                        login + b' {%d}\r\n' % len(passwd), passwd + b'\r\n'], sent
    elif proto.NAME == 'pop3':
        assert sent == [b'USER ' + s.login + b'\r\n', b'PASS ' + s.passwd + b'\r\n'], sent
        for line in sent:
            assert line.count(b'\n') == 1 and line.count(b'\r') == 1, line
    else:
        for line in sent:
            assert line.endswith(b'\r\n') and line.count(b'\n') == 1 \
                and line.count(b'\r') == 1, line
        verbs = [line.split(b' ', 1)[0].upper() for line in sent]
        allowed = {b'EHLO', b'HELO', b'XCLIENT', b'AUTH', b'MAIL', b'RCPT'}
        assert set(verbs) <= allowed, verbs
        assert verbs.count(b'MAIL') <= 1 and verbs.count(b'RCPT') <= 1, verbs
        assert verbs.count(b'AUTH') <= 1, verbs
    return sent


# --- DNS answers ---------------------------------------------------------------------

def wrap_dns_answer(data: bytes) -> bytes:
    """A response to a resolver query whose answer, authority and additional sections
    are ``data[2:]``: the first two bytes pick the question (PTR, A or AAAA; one of a
    few names), the rcode and the section counts, so a fuzzer spends its time in the
    record parsing and the resolver, not in guessing a matching header."""
    import dns.message
    import dns.rdatatype
    if len(data) < 2:
        return b''
    names = ('7.0.2.192.in-addr.arpa.', 'host.example.', 'a.b.')
    rdtype = (dns.rdatatype.PTR, dns.rdatatype.A, dns.rdatatype.AAAA)[data[0] % 3]
    query = dns.message.make_query(names[data[0] // 3 % 3], rdtype)
    wire = bytearray(query.to_wire())
    wire[2] = 0x81                       # QR, RD
    wire[3] = 0x80 | (data[0] >> 5 if data[0] >> 5 in (0, 2, 3, 5) else 0)   # RA, rcode
    counts = data[1]
    wire[6:12] = bytes((0, counts & 7, 0, counts >> 3 & 3, 0, counts >> 5))
    return bytes(wire) + data[2:]


def check_dns_answer(data: bytes):
    """A datagram as the resolver would get it: dnspython parses it (its errors are
    what ``dns.query.udp(ignore_errors=True)`` drops), then the resolver's own handling
    (``Resolver._resolve`` with this answer to every query) must return a result and
    never raise; the host-name check of ``client_host`` accepts or rejects it."""
    import dns.exception
    import dns.message
    import dns.name
    import dns.rdatatype
    from gmailproxy import resolver as res

    if len(data) < 4:
        return None
    # a response to a standard query, as dns.query.udp keeps only those
    data = data[:2] + bytes(((data[2] | 0x80) & 0x87,)) + data[3:]
    try:
        message = dns.message.from_wire(data)
    except Exception:       # dns.query.udp(ignore_errors=True) drops whatever fails
        return None
    if len(message.question) != 1:
        return None
    question = message.question[0]
    if question.rdtype not in (dns.rdatatype.PTR, dns.rdatatype.A, dns.rdatatype.AAAA):
        return None         # the resolver only asks these
    query = dns.message.make_query(question.name, question.rdtype)
    query.id = message.id
    if not query.is_response(message):
        return None

    class Canned(res.Resolver):
        def _query(self, qname, rdtype, deadline):
            return message

    resolver = Canned([('127.0.0.1', 53)])
    qname, rdtype = question.name, question.rdtype
    result, ttl = resolver._resolve(qname, rdtype, 1e18)
    code, values = result
    assert isinstance(code, int) and isinstance(values, list), result
    assert ttl >= 0, ttl
    for value in values:
        if isinstance(value, bytes):
            if res._HOST.match(value):
                try:
                    dns.name.from_text(value.decode('ascii'))
                except (ValueError, dns.exception.DNSException):
                    pass
    return result


ENTRY_POINTS = {
    'lexer': check_lexer,
    'config': check_config,
    'sasl': check_sasl,
    'proxy_protocol': check_proxy_protocol,
    'auth_http': check_auth_response,
    'imap': lambda data: check_dialogue('imap', data),
    'pop3': lambda data: check_dialogue('pop3', data),
    'smtp': lambda data: check_dialogue('smtp', data),
    'smtp_none': lambda data: check_dialogue('smtp_none', data),
    'dns': check_dns_answer,
}
