"""Hostile input for every parser (issue 11): hypothesis drives the entry points of
tools/fuzz/targets.py (the atheris harnesses use the same functions), which run the real
code offline over fake sockets and check its properties:

* nothing but our own error types comes out (``ProxyError`` subclasses, ``ConfigError``);
* nothing is held beyond its bound (the client buffer, auth_http's 1024 bytes, the PROXY
  header's 4096, an IMAP literal's announced size never allocated before it is allowed);
* credentials accepted by a dialogue become exactly nginx's auth_http header lines and
  exactly the backend login's command lines (no CR/LF smuggling);
* PROXY headers parse incrementally (every proper prefix is "incomplete").

Examples that fuzzing or review found are pinned with ``@example``.
"""
import base64
import os
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'fuzz'))
import targets  # noqa: E402

from gmailproxy import auth_http, errors, proxy_protocol  # noqa: E402

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
B = base64.b64encode


# --- configuration tokenizer ---------------------------------------------------------

CONF_PIECES = st.sampled_from([
    b'events', b'mail', b'server', b'listen', b'127.0.0.1:143', b'{', b'}', b';', b' ', b'\t',
    b'\n', b'\r\n', b'#c\n', b'"', b"'", b'\\', b'\\"', b'${', b'$', b'x', b'"a b"', b"'a;b'",
    b'include', b'*.conf', b'auth_http', b'http://127.0.0.1/', b'\xff', b'\x00', b'timeout',
    b'1s', b'-', b'imap_capabilities', b'"IMAP4rev1"'])


@FAST
@given(st.one_of(st.binary(max_size=600), st.lists(CONF_PIECES, max_size=60).map(b''.join)))
@example(b'"' + b'a' * 5000)
@example(b'a' * 5000 + b';')
@example(b'#' + b'x' * 5000 + b'\nevents {}')
@example(b'x "a"b;')
def test_config_tokenizer_yields_tokens_or_config_error(data):
    targets.check_lexer(data)


@pytest.mark.parametrize('directive', [b'server_name \x8f.example;',
                                       b'smtp_capabilities "\xff";',
                                       b'imap_capabilities "\xe9t\xe9";'])
def test_config_non_utf8_string_directive(directive):
    targets.check_config(b'events { }\nmail { auth_http http://127.0.0.1:9/a; ' + directive
                         + b' server { listen 127.0.0.1:1025; protocol smtp; }'
                         b' server { listen 127.0.0.1:1143; protocol imap; } }')


def test_config_include_name_with_nul():
    targets.check_config(b'events { }\nmail { include a\x00b; }')


def test_config_resolver_unix_url():
    targets.check_config(b'events { }\nmail { resolver unix:/run/dns.sock; }')


@settings(max_examples=60, deadline=None)
@given(st.lists(CONF_PIECES, max_size=40).map(b''.join))
@example(b'events {} mail { include /etc/*; }')
@example(b'events {} mail { server { listen 127.0.0.1:1143; protocol imap; } }')
def test_config_loader_gives_config_or_config_error(data):
    targets.check_config(b'events { }\n' + data)


# --- the client dialogues ------------------------------------------------------------

def lines(*words):
    return st.lists(st.sampled_from(words), max_size=12).map(b''.join)


IMAP = lines(
    b'a1 LOGIN alice secret\r\n', b'a1 LOGIN "al\\"ice" "p w"\r\n', b'a LOGIN {5}\r\nalice {3}\r\nabc\r\n',
    b'a LOGIN {5+}\r\nalice {3+}\r\nab\n\r\n', b'a LOGIN {4294967295}\r\n', b'a LOGIN {-1}\r\n',
    b'a LOGIN {99999999999+}\r\n', b'a LOGIN {2}\r\nab', b'a LOGIN {3}\r\na\r\nx\r\n',
    b'b CAPABILITY\r\n', b'c NOOP\r\n', b'd ID ("name" "x")\r\n', b'd ID NIL\r\n',
    b'd ID ("a" {1}\r\nb)\r\n', b'e AUTHENTICATE PLAIN\r\n', b'e AUTHENTICATE PLAIN ',
    B(b'\0u\0p') + b'\r\n', B(b'\0u\r\n\0p') + b'\r\n', B(b'u') + b'\r\n', b'=\r\n', b'*\r\n',
    b'e AUTHENTICATE LOGIN\r\n', b'e AUTHENTICATE CRAM-MD5\r\n',
    B(b'u 0123456789abcdef0123456789abcdef') + b'\r\n', b'e AUTHENTICATE EXTERNAL =\r\n',
    b'f STARTTLS\r\n', b'g LOGOUT\r\n', b'x' * 300, b'\r\n', b'\n', b'\x00', b' ', b'"', b'{',
    b'a1 LOGIN alice "unterminated\r\n', b'a1 login a b c d\r\n', b'(', b')')
POP3 = lines(
    b'USER alice\r\n', b'USER  al ice \r\n', b'PASS secret\r\n', b'PASS\r\n', b'CAPA\r\n', b'NOOP\r\n',
    b'APOP bob 0123456789abcdef0123456789abcdef\r\n', b'AUTH\r\n', b'AUTH PLAIN\r\n',
    b'AUTH PLAIN ' + B(b'\0u\0p') + b'\r\n', B(b'\0u\0p') + b'\r\n', b'AUTH LOGIN\r\n',
    B(b'u') + b'\r\n', B(b'p\r\nDELE 1') + b'\r\n', b'AUTH CRAM-MD5\r\n',
    B(b'u 0123456789abcdef0123456789abcdef') + b'\r\n', b'AUTH EXTERNAL =\r\n', b'STLS\r\n',
    b'QUIT\r\n', b'x' * 100, b'\r', b'\n', b'\x00', b' ', b'USER a\rb\r\n', b'a b c d e\r\n')
SMTP = lines(
    b'EHLO x\r\n', b'HELO a\x00b\r\n', b'EHLO\r\n', b'AUTH PLAIN ' + B(b'\0u\0p') + b'\r\n',
    b'AUTH PLAIN\r\n', B(b'\0u\0p') + b'\r\n', b'AUTH LOGIN\r\n', b'AUTH LOGIN ' + B(b'u') + b'\r\n',
    B(b'u') + b'\r\n', B(b'p') + b'\r\n', b'AUTH CRAM-MD5\r\n',
    B(b'u 0123456789abcdef0123456789abcdef') + b'\r\n', b'AUTH EXTERNAL =\r\n',
    b'MAIL FROM:<a@b>\r\n', b'MAIL FROM:<a@b> SIZE=1\r\n', b'RCPT TO:<c@d>\r\n', b'RCPT\r\n',
    b'RSET\r\n', b'NOOP\r\n', b'VRFY x\r\n', b'STARTTLS\r\n', b'QUIT\r\n', b'x' * 300,
    b'\r', b'\n', b'\x00', b' ', b'MAIL FROM:<a\rb>\r\n', b'a b c d e f g h i j k l m\r\n')
CUTS = st.lists(st.integers(0, 5000), max_size=6)


@FAST
@given(st.one_of(IMAP, st.binary(max_size=400)), CUTS)
@example(b'a1 AUTHENTICATE PLAIN\r\n' + B(b'\0alice\0pw') + b'A' * 5000 + b'\r\n', [])
@example(b'a LOGIN {5}\r\nal\r\nx {3}\r\na\nb\r\n', [7, 13])
def test_imap_dialogue_properties(data, cuts):
    targets.check_dialogue('imap', data, cuts)


@FAST
@given(st.one_of(IMAP, st.binary(max_size=400)), CUTS)
def test_imap_dialogue_small_buffer(data, cuts):
    targets.check_dialogue('imap1k', data, cuts)


@FAST
@given(st.one_of(POP3, st.binary(max_size=400)), CUTS)
def test_pop3_dialogue_properties(data, cuts):
    targets.check_dialogue('pop3', data, cuts)


@FAST
@given(st.one_of(SMTP, st.binary(max_size=400)), CUTS, st.booleans())
@example(b'EHLO a\x00b\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\n', [], True)
def test_smtp_dialogue_properties(data, cuts, relay):
    targets.check_dialogue('smtp_none' if relay else 'smtp', data, cuts)


@pytest.mark.parametrize('name, line', [
    ('imap', b'a1 LOGIN {4294967295}\r\n'), ('imap', b'a1 LOGIN {4294967295+}\r\n'),
    ('imap', b'a1 LOGIN {' + b'9' * 100 + b'}\r\n'), ('imap', b'x' * 10 ** 6),
    ('pop3', b'x' * 10 ** 6), ('smtp', b'x' * 10 ** 6), ('smtp', b'AUTH PLAIN\r\n' + b'A' * 10 ** 6),
])
def test_dialogue_memory_bounded_by_client_buffer(name, line):
    """A huge line, or a literal announcing gigabytes: the dialogue holds at most its
    client buffer, whatever the input's size (the input itself is allocated before
    counting starts)."""
    sock = targets.FakeSock(targets.split(line, range(0, len(line), 65536)))
    targets.config()
    tracemalloc.start()
    try:
        targets.run_dialogue(name, sock)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


# --- SASL -------------------------------------------------------------------------------

SASL_TEXT = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=120).map(B),
    st.tuples(st.binary(max_size=20), st.binary(max_size=20), st.binary(max_size=20)).map(
        lambda t: B(t[0] + b'\0' + t[1] + b'\0' + t[2])),
    st.text(alphabet='A-Za-z0-9+/=\r\n \x00', max_size=80).map(lambda s: s.encode()))


@FAST
@given(SASL_TEXT)
@example(B(b'\0alice\r\nx\0pw'))
@example(B(b'user=a\x01auth=Bearer t\r\n\x01\x01'))
@example(b'YQ==YQ')
@example(b'Y')
def test_sasl_decoders_give_clean_credentials_or_bad_command(data):
    targets.check_sasl(data)


# --- PROXY protocol ---------------------------------------------------------------------

ADDRS4 = st.ip_addresses(v=4).map(str)
ADDRS6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(0, 65535)


@st.composite
def proxy_headers(draw):
    src = draw(st.one_of(ADDRS4, ADDRS6))
    dst = draw(ADDRS4 if ':' not in src and draw(st.booleans()) else st.one_of(ADDRS4, ADDRS6))
    ends = ((src, draw(PORTS)), (dst, draw(PORTS)))
    if draw(st.booleans()):
        tls = draw(st.none() | st.fixed_dictionaries(
            {}, optional={'sni': st.text(max_size=20), 'alpn': st.text(max_size=8),
                          'version': st.sampled_from(['TLSv1.2', 'TLSv1.3']),
                          'cn': st.text(max_size=30), 'client_cert': st.booleans()}))
        header = proxy_protocol.build_v2(*ends, tls)
    else:
        header = proxy_protocol.build_v1(*ends)
    mutation = draw(st.sampled_from(['none', 'flip', 'cut', 'append']))
    if mutation == 'flip' and header:
        i = draw(st.integers(0, len(header) - 1))
        header = header[:i] + bytes([draw(st.integers(0, 255))]) + header[i + 1:]
    elif mutation == 'cut':
        header = header[:draw(st.integers(0, len(header)))]
    elif mutation == 'append':
        header += draw(st.binary(max_size=20))
    return header


@FAST
@given(st.one_of(proxy_headers(), st.binary(max_size=200),
                 st.binary(max_size=60).map(lambda b: b'PROXY ' + b),
                 st.binary(max_size=60).map(lambda b: proxy_protocol.V2_SIGNATURE + b)))
@example(b'PROXY TCP4 1.2.3.4 5.6.7.8 65535 65536\r\n')
@example(b'PROXY UNKNOWN' + b' ' * 200 + b'\r\n')
@example(proxy_protocol.V2_SIGNATURE + b'\x21\x11\xff\xff')
@example(proxy_protocol.V2_SIGNATURE + b'\x21\x11\x00\x0c' + b'\x00' * 12)
def test_proxy_protocol_parse_is_incremental_and_bounded(data):
    targets.check_proxy_protocol(data)


@FAST
@given(st.tuples(st.one_of(ADDRS4, ADDRS6), PORTS), st.tuples(st.one_of(ADDRS4, ADDRS6), PORTS))
def test_proxy_protocol_v2_round_trip(src, dst):
    info, size = proxy_protocol.parse(proxy_protocol.build_v2(src, dst))
    header = proxy_protocol.build_v2(src, dst)
    assert size == len(header)
    assert (info.src_port, info.dst_port) == (src[1], dst[1])


# --- auth_http responses ----------------------------------------------------------------

HEADER_NAMES = st.sampled_from([b'Auth-Status', b'Auth-Server', b'Auth-Port', b'Auth-User',
                                b'Auth-Pass', b'Auth-Wait', b'Auth-Error-Code', b'X-Y',
                                b'auth-status', b'Content-Length', b'Connection', b'Bad_Name',
                                b' Auth-Status', b''])
HEADER_VALUES = st.one_of(
    st.sampled_from([b'OK', b'WAIT', b'Invalid', b'127.0.0.1', b'::1', b'143', b'0', b'65536',
                     b'3', b'9' * 400, b'-1', b'host.example', b'', b'OK ', b' 127.0.0.1 ',
                     b'a\rb', b'a\nb', b'\x00', b'\xc3\xa9', b'1e9', b'close', b'keep-alive']),
    st.binary(max_size=30))


@st.composite
def auth_responses(draw):
    status = draw(st.sampled_from([b'HTTP/1.0 200 OK\r\n', b'HTTP/1.1 500 Oops\r\n',
                                   b'HTTP/1.0 200\r\n', b'', b'HTTP/9.9 x\r\n', b'HTTP/1.0 200 OK\n']))
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8))
    end = draw(st.sampled_from([b'\r\n', b'\n', b'', b'\r\nbody']))
    return status + b''.join(n + b': ' + v + b'\r\n' for n, v in headers) + end


@FAST
@given(st.one_of(auth_responses(), st.binary(max_size=300)), CUTS,
       st.sampled_from(['imap', 'pop3', 'smtp']))
@example(b'HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 1\r\n'
         b'X-Long: ' + b'x' * 5000 + b'\r\n\r\n', [], 'imap')
def test_auth_http_response_gives_result_or_our_error(data, cuts, proto):
    """Bounded read (1024 bytes of head), then an AuthResult naming IP literals and
    ports 1-65535, or AuthFailed/AuthServiceError, or a WAIT with a finite sleep."""
    targets.check_auth_response(data, cuts, proto)


@pytest.mark.parametrize('status', [b'Invalid login', b'WAIT'])
def test_auth_wait_too_large_is_ignored(status):
    targets.check_auth_response(b'HTTP/1.0 200 OK\r\nAuth-Status: ' + status + b'\r\n'
                                b'Auth-Wait: ' + b'9' * 400 + b'\r\n\r\n')


def test_auth_http_values_lose_trailing_spaces():
    result = targets.check_auth_response(
        b'HTTP/1.0 200 OK\r\nAuth-Status: OK  \r\nAuth-Server: 127.0.0.1 \r\n'
        b'Auth-Port: 143 \r\nAuth-Pass: pw \r\n\r\n')
    assert isinstance(result, auth_http.AuthResult), result
    assert result.servers[0][0] == ('127.0.0.1', 143)
    assert result.passwd == b'pw'


def _interpret(headers, proto='imap'):
    s = targets.session(proto, targets.FakeSock())
    s.login, s.passwd = b'alice', b'secret'
    real = auth_http.gevent.sleep
    auth_http.gevent.sleep = lambda secs: None
    try:
        return auth_http.interpret(s, targets.URL, headers)
    finally:
        auth_http.gevent.sleep = real


@FAST
@given(st.lists(st.tuples(st.sampled_from([b'Auth-Status', b'auth-status', b'AUTH-STATUS',
                                           b'Auth-Server', b'Auth-Port', b'Auth-Wait']),
                          st.sampled_from([b'OK', b'WAIT', b'ok', b'Invalid', b'', b'127.0.0.1',
                                           b'143', b'1'])), max_size=8))
def test_no_backend_without_ok_status(headers):
    """``interpret`` returns backends only if no Auth-Status said anything but OK
    (nginx: no Auth-Status at all with a server and port also succeeds)."""
    try:
        result = _interpret(headers)
    except (errors.AuthFailed, errors.AuthServiceError):
        return
    statuses = [v for n, v in headers if n.lower() == b'auth-status']
    if result is None:
        assert b'WAIT' in statuses
        return
    assert all(v == b'OK' for v in statuses), headers
    assert result.servers


@FAST
@given(st.binary(max_size=100))
def test_auth_http_escape_round_trip(value):
    """nginx's mail-auth escaping: no byte <= 0x20 and no bare %, reversible."""
    escaped = auth_http.escape(value)
    assert not any(c <= 0x20 for c in escaped)
    assert targets.unescape(escaped) == value
    assert escaped.replace(b'%25', b'').count(b'%') == sum(
        1 for c in value if c <= 0x20)


# --- DNS answers --------------------------------------------------------------------------

@st.composite
def dns_answers(draw):
    import dns.message
    import dns.rrset
    rdtype = draw(st.sampled_from(['PTR', 'A', 'AAAA']))
    qname = draw(st.sampled_from(['7.0.2.192.in-addr.arpa.', 'host.example.', 'a.b.']))
    response = dns.message.make_response(dns.message.make_query(qname, rdtype))
    response.set_rcode(draw(st.sampled_from([0, 0, 0, 2, 3, 5])))
    owner = qname
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(['CNAME', rdtype, 'PTR', 'A', 'TXT']))
        target = draw(st.sampled_from(['h.example.', 'a.b.', '\\000x.example.', 'x' * 63 + '.',
                                       'x..', '.']))
        try:
            text = {'A': '192.0.2.7', 'AAAA': '2001:db8::7', 'TXT': '"t"'}.get(kind, target)
            rrset = dns.rrset.from_text(owner, draw(st.integers(0, 2 ** 31 - 1)), 'IN', kind,
                                        text)
        except Exception:
            continue
        response.answer.append(rrset)
        if kind == 'CNAME':
            owner = target
    wire = response.to_wire()
    if draw(st.booleans()):
        i = draw(st.integers(0, len(wire) - 1))
        wire = wire[:i] + bytes([draw(st.integers(0, 255))]) + wire[i + 1:]
    return wire


@FAST
@given(st.one_of(dns_answers(), st.binary(max_size=200),
                 st.binary(min_size=2, max_size=200).map(targets.wrap_dns_answer)))
def test_resolver_handles_any_answer(data):
    """What the resolver makes of any datagram dns.query.udp hands it: a (code, values)
    result, never an exception."""
    targets.check_dns_answer(data)
