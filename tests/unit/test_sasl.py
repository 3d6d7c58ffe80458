"""gmailproxy.sasl: nginx's base64 quirks, every decoder and its exact log text."""
import re

import pytest
from hypothesis import given, strategies as st

from gmailproxy import sasl
from gmailproxy.errors import BadCommand, ProxyError

B64_ALPHABET = b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'


def ngx_decode_base64(src: bytes) -> bytes:
    """A line-by-line port of nginx's ngx_decode_base64_internal, as the reference."""
    basis = {c: i for i, c in enumerate(B64_ALPHABET)}
    length = 0
    while length < len(src):
        if src[length] == ord('='):
            break
        if src[length] not in basis:
            raise ValueError
        length += 1
    if length % 4 == 1:
        raise ValueError
    s, out = 0, bytearray()
    while length > 3:
        out.append((basis[src[s]] << 2 | basis[src[s + 1]] >> 4) & 0xFF)
        out.append((basis[src[s + 1]] << 4 | basis[src[s + 2]] >> 2) & 0xFF)
        out.append((basis[src[s + 2]] << 6 | basis[src[s + 3]]) & 0xFF)
        s += 4
        length -= 4
    if length > 1:
        out.append((basis[src[s]] << 2 | basis[src[s + 1]] >> 4) & 0xFF)
    if length > 2:
        out.append((basis[src[s + 1]] << 4 | basis[src[s + 2]] >> 2) & 0xFF)
    return bytes(out)


def bad(message):
    return pytest.raises(BadCommand, match='^%s$' % re.escape(message))


# --- base64 ---------------------------------------------------------------------------

@pytest.mark.parametrize('text, value', [
    (b'', b''),
    (b'dGVzdA==', b'test'),
    (b'dGVzdA', b'test'),                   # padding is optional
    (b'dGVzdA=', b'test'),
    (b'dGVzdA==garbage', b'test'),          # everything after the first '=' is ignored
    (b'dGVzdA=!! \r\n', b'test'),
    (b'=anything', b''),
    (b'dGVz', b'tes'),
    (b'dGU', b'te'),
    (b'QR==', b'A'),                        # leftover bits are ignored
    (b'+/+/', b'\xfb\xff\xbf'),
    (b'AHVzZXIAcGFzcw==', b'\x00user\x00pass'),
])
def test_b64decode_accepts_what_nginx_accepts(text, value):
    assert sasl.b64decode(text) == value


@pytest.mark.parametrize('text', [
    b'dGVzd',                               # 4k+1 characters before '='
    b'd',
    b'dGVzd=',
    b'dGVz dA==',                           # a space is not in the alphabet
    b' dGVzdA==',
    b'dGVzdA\r\n',
    b'dGVz-A==',                            # nor the URL-safe alphabet
    b'dGVz_A==',
    b'*',                                   # a client cancelling
    b'\x00',
    b'dGVzdA\xff',
])
def test_b64decode_rejects(text):
    with pytest.raises(ValueError):
        sasl.b64decode(text)


@given(st.binary(max_size=64))
def test_b64encode_round_trip_with_and_without_padding(data):
    text = sasl.b64encode(data)
    assert sasl.b64decode(text) == data
    assert sasl.b64decode(text.rstrip(b'=')) == data


def test_b64encode_exact():
    assert sasl.b64encode(b'') == b''
    assert sasl.b64encode(b'test') == b'dGVzdA=='
    assert sasl.b64encode(b'x' * 100).endswith(b'eHh4eA==')
    assert b'\n' not in sasl.b64encode(b'x' * 100)


@given(st.lists(st.sampled_from(list(B64_ALPHABET) + list(b'= \r\n*-_\x00\xff')),
                max_size=40).map(bytes))
def test_b64decode_matches_nginx_reference(text):
    try:
        expected = ngx_decode_base64(text)
    except ValueError:
        with pytest.raises(ValueError):
            sasl.b64decode(text)
    else:
        assert sasl.b64decode(text) == expected


@given(st.binary(max_size=80))
def test_b64decode_only_returns_or_raises_value_error(data):
    try:
        assert isinstance(sasl.b64decode(data), bytes)
    except ValueError:
        pass


# --- first_token ----------------------------------------------------------------------

@pytest.mark.parametrize('line, token', [
    (b'dXNlcg==\r\n', b'dXNlcg=='),
    (b'dXNlcg==\n', b'dXNlcg=='),
    (b'dXNlcg==', b'dXNlcg=='),
    (b'dXNlcg== ignored words\r\n', b'dXNlcg=='),
    (b'\r\n', b''),
    (b'*\r\n', b'*'),
    (b' dXNlcg==\r\n', b''),
    (b'a\rb\r\n', b'a\rb'),
])
def test_first_token(line, token):
    assert sasl.first_token(line) == token


# --- PLAIN ----------------------------------------------------------------------------

@pytest.mark.parametrize('text, login, passwd', [
    (b'AHVzZXIAcGFzcw==', b'user', b'pass'),            # \0user\0pass
    (b'YWRtaW4AdXNlcgBwAHNz', b'user', b'p\x00ss'),     # no authzid, NUL in passwd
    (b'AABwYXNz', b'', b'pass'),                        # \0\0pass: empty login
    (b'AHVzZXIA', b'user', b''),                        # \0user\0: empty password
    (b'AHVzZXIAcGFzcw==junk', b'user', b'pass'),
])
def test_decode_plain(text, login, passwd):
    assert sasl.decode_plain(text) == (login, passwd)


@pytest.mark.parametrize('text, message', [
    (b'AHVzZXIAcGFzc', 'client sent invalid base64 encoding in AUTH PLAIN command'),
    (b'AHVz ZXIAcGFzcw==', 'client sent invalid base64 encoding in AUTH PLAIN command'),
    (b'*', 'client sent invalid base64 encoding in AUTH PLAIN command'),
    (b'', 'client sent invalid login in AUTH PLAIN command'),
    (b'dXNlcnBhc3M=', 'client sent invalid login in AUTH PLAIN command'),  # userpass
    (b'AHVzZXI=', 'client sent invalid password in AUTH PLAIN command'),   # \0user
    # \0u\r\nUSER x\0p, \0u\0p\rDLELE, \0u\0p\nq
    (b'AHUNClVTRVIgeABw', 'client sent invalid credentials with CR or LF'),
    (b'AHUAcA1ETEVMRQ==', 'client sent invalid credentials with CR or LF'),
    (b'AHUAcApx', 'client sent invalid credentials with CR or LF'),
])
def test_decode_plain_errors(text, message):
    with bad(message) as info:
        sasl.decode_plain(text)
    assert info.value.reply == 'invalid'


# --- LOGIN ----------------------------------------------------------------------------

@pytest.mark.parametrize('text, value', [
    (b'dXNlcg==', b'user'),
    (b'dXNlcg', b'user'),
    (b'', b''),
    (b'=', b''),
])
def test_decode_login(text, value):
    assert sasl.decode_login(text) == value
    assert sasl.decode_login(text, password=True) == value


@pytest.mark.parametrize('text', [b'dXNlc', b'dXN lcg==', b'*', b'\xff'])
def test_decode_login_bad_base64(text):
    with bad('client sent invalid base64 encoding in AUTH LOGIN command'):
        sasl.decode_login(text)
    with bad('client sent invalid base64 encoding in AUTH LOGIN command'):
        sasl.decode_login(text, password=True)


def test_decode_login_nul_allowed_in_password_only():
    assert sasl.decode_login(b'cABhc3M=', password=True) == b'p\x00ass'
    with bad('client sent invalid credentials with CR or LF'):
        sasl.decode_login(b'cABhc3M=')


@pytest.mark.parametrize('text', [b'dQ1x', b'dQpx', b'dQ0KcQ=='])   # u\rq, u\nq, u\r\nq
def test_decode_login_cr_lf_rejected(text):
    for password in (False, True):
        with bad('client sent invalid credentials with CR or LF'):
            sasl.decode_login(text, password=password)


# --- CRAM-MD5 -------------------------------------------------------------------------

def test_decode_cram_md5():
    # "user 0123456789abcdef0123456789abcdef"
    text = b'dXNlciAwMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZg=='
    assert sasl.decode_cram_md5(text) == (b'user', b'0123456789abcdef0123456789abcdef')


def test_decode_cram_md5_splits_at_first_space_and_does_not_check_hex():
    text = sasl.b64encode(b'a b ' + b'Z' * 30)
    assert sasl.decode_cram_md5(text) == (b'a', b'b ' + b'Z' * 30)
    assert sasl.decode_cram_md5(sasl.b64encode(b' ' + b'x' * 32)) == (b'', b'x' * 32)


@pytest.mark.parametrize('plain', [
    b'user',                                # no space
    b'user ' + b'a' * 31,
    b'user ' + b'a' * 33,
    b'',
    b'user ',
])
def test_decode_cram_md5_bad_hash(plain):
    with bad('client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command'):
        sasl.decode_cram_md5(sasl.b64encode(plain))


def test_decode_cram_md5_bad_base64():
    with bad('client sent invalid base64 encoding in AUTH CRAM-MD5 command'):
        sasl.decode_cram_md5(b'dXNlc')


def test_decode_cram_md5_cr_lf_in_login():
    with bad('client sent invalid credentials with CR or LF'):
        sasl.decode_cram_md5(sasl.b64encode(b'u\r\nQUIT ' + b'a' * 32))


# --- EXTERNAL -------------------------------------------------------------------------

def test_decode_external():
    assert sasl.decode_external(b'dXNlcg==') == b'user'
    assert sasl.decode_external(b'') == b''
    assert sasl.decode_external(b'=') == b''


def test_decode_external_errors():
    with bad('client sent invalid base64 encoding in AUTH EXTERNAL command'):
        sasl.decode_external(b'dXNlc')
    with bad('client sent invalid credentials with CR or LF'):
        sasl.decode_external(b'dQ0KcQ==')
    with bad('client sent invalid credentials with CR or LF'):
        sasl.decode_external(b'dQBx')                     # u\0q


# --- check_credentials ----------------------------------------------------------------

@pytest.mark.parametrize('login, passwd', [
    (b'u\r', b''), (b'u\n', b''), (b'u\0', b''), (b'', b'p\r'), (b'', b'p\n'),
])
def test_check_credentials_rejects(login, passwd):
    with bad('client sent invalid credentials with CR or LF'):
        sasl.check_credentials(login, passwd)


def test_check_credentials_accepts():
    assert sasl.check_credentials(b'user@example.com', b'p\0ss word\t') is None
    assert sasl.check_credentials(b'', b'') is None


# --- salt and digests -----------------------------------------------------------------

def test_make_salt_format(monkeypatch):
    monkeypatch.setattr(sasl.time, 'time', lambda: 1700000000.75)
    monkeypatch.setattr(sasl.secrets, 'randbits', lambda bits: 1804289383)
    assert sasl.make_salt('mail.example.com') == \
        b'<1804289383.1700000000@mail.example.com>'


def test_make_salt_random_range():
    salts = {sasl.make_salt('mx') for _ in range(50)}
    assert len(salts) > 40
    for salt in salts:
        m = re.fullmatch(rb'<(\d+)\.(\d+)@mx>', salt)
        assert m is not None
        assert 0 <= int(m.group(1)) <= 2 ** 31 - 1


def test_cram_md5_digest_rfc2195():
    salt = b'<1896.697170952@postoffice.reston.mci.net>'
    assert sasl.cram_md5_digest(salt, b'tanstaaftanstaaf') == \
        b'b913a602c7eda7a495b4e6e7334d3890'


def test_apop_digest_rfc1939():
    assert sasl.apop_digest(b'<1896.697170952@dbc.mtview.ca.us>', b'tanstaaf') == \
        b'c4c9334bac560ecc979e58001b3e22fb'


def test_cram_md5_digest_passes_decoder():
    digest = sasl.cram_md5_digest(b'<1.2@h>', b'secret')
    assert sasl.decode_cram_md5(sasl.b64encode(b'bob ' + digest)) == (b'bob', digest)


# --- XOAUTH2 --------------------------------------------------------------------------

GOOGLE_XOAUTH2 = (b'dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZG'
                  b'OWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==')


def test_xoauth2_known_vector():
    assert sasl.decode_xoauth2(GOOGLE_XOAUTH2) == (
        b'someuser@example.com', b'ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg')
    assert sasl.encode_xoauth2(b'someuser@example.com',
                               b'ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg') == \
        GOOGLE_XOAUTH2


@pytest.mark.parametrize('plain', [
    b'user=u\x01auth=Bearer t\x01',          # one final 0x01 missing
    b'user=u\x01auth=Bearer t',
    b'auth=Bearer t\x01\x01',                # no user
    b'user=u\x01\x01',                       # no auth
    b'user=u\x01auth=Basic t\x01\x01',
    b'user=u\x01auth=Bearer \x01\x01',       # empty token
    b'user=u\x01auth=Bearer\x01\x01',
    b'user=u\x01noequals\x01\x01',
    b'\x01\x01',
    b'',
])
def test_xoauth2_invalid(plain):
    with bad('client sent invalid XOAUTH2 response'):
        sasl.decode_xoauth2(sasl.b64encode(plain))


def test_xoauth2_errors_base64_and_crlf():
    with bad('client sent invalid base64 encoding in AUTH XOAUTH2 command'):
        sasl.decode_xoauth2(b'dXNlc')
    with bad('client sent invalid credentials with CR or LF'):
        sasl.decode_xoauth2(sasl.b64encode(b'user=u\r\nx\x01auth=Bearer t\x01\x01'))


def test_xoauth2_bearer_scheme_is_case_insensitive():
    assert sasl.decode_xoauth2(sasl.b64encode(b'user=u\x01auth=bearer t\x01\x01')) == \
        (b'u', b't')


# --- OAUTHBEARER ----------------------------------------------------------------------

RFC7628_EXAMPLE = (b'bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29t'
                   b'AXBvcnQ9MTQzAWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJo'
                   b'ZG1semRHRXVZMjl0Q2c9PQEB')


def test_oauthbearer_rfc7628_example():
    assert sasl.decode_oauthbearer(RFC7628_EXAMPLE) == (
        b'user@example.com', b'vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==')


def test_oauthbearer_encode_exact():
    assert sasl.encode_oauthbearer(b'u', b'tok') == sasl.b64encode(
        b'n,a=u,\x01auth=Bearer tok\x01\x01')
    assert sasl.encode_oauthbearer(b'a,b=c', b'tok') == sasl.b64encode(
        b'n,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01')


def test_oauthbearer_saslname_escapes_and_empty_authzid():
    assert sasl.decode_oauthbearer(sasl.b64encode(
        b'n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01')) == (b'a,b=c', b't')
    assert sasl.decode_oauthbearer(sasl.b64encode(
        b'y,,\x01auth=Bearer t\x01\x01')) == (b'', b't')


@pytest.mark.parametrize('plain', [
    b'p=tls-unique,a=u,\x01auth=Bearer t\x01\x01',   # channel binding not offered
    b'x,a=u,\x01auth=Bearer t\x01\x01',
    b'n,a=u\x01auth=Bearer t\x01\x01',               # GS2 header not closed
    b'n,u,\x01auth=Bearer t\x01\x01',                # authzid without a=
    b'n,a=u=2,\x01auth=Bearer t\x01\x01',            # bad saslname escape
    b'n,a==2C=,\x01auth=Bearer t\x01\x01',
    b'n,a=u,auth=Bearer t\x01\x01',                  # no 0x01 after the header
    b'n,a=u,\x01host=h\x01\x01',                     # no auth
    b'n,a=u,\x01auth=Bearer t\x01',
    b'n,a=u,\x01\x01',
    b'n,a=u,\x01auth=MAC t\x01\x01',
    b'',
])
def test_oauthbearer_invalid(plain):
    with bad('client sent invalid OAUTHBEARER response'):
        sasl.decode_oauthbearer(sasl.b64encode(plain))


def test_oauthbearer_errors_base64_and_crlf():
    with bad('client sent invalid base64 encoding in AUTH OAUTHBEARER command'):
        sasl.decode_oauthbearer(b'*')
    with bad('client sent invalid credentials with CR or LF'):
        sasl.decode_oauthbearer(sasl.b64encode(b'n,a=u,\x01auth=Bearer t\nx\x01\x01'))


safe_text = st.binary(min_size=1, max_size=30).filter(
    lambda b: not set(b) & set(b'\r\n\x00\x01'))


@given(safe_text, safe_text.filter(lambda b: b' ' not in b))
def test_oauth_round_trips(user, token):
    assert sasl.decode_xoauth2(sasl.encode_xoauth2(user, token)) == (user, token)
    text = sasl.encode_oauthbearer(user, token)
    assert sasl.decode_oauthbearer(text) == (user, token)


# --- any input: only a result or BadCommand -------------------------------------------

DECODERS = [sasl.decode_plain, sasl.decode_login, sasl.decode_cram_md5,
            sasl.decode_external, sasl.decode_xoauth2, sasl.decode_oauthbearer]


@given(st.binary(max_size=120))
def test_decoders_never_raise_anything_else(data):
    for text in (data, sasl.b64encode(data)):
        for decode in DECODERS:
            try:
                decode(text)
            except BadCommand as e:
                assert isinstance(e, ProxyError)
                assert e.reply == 'invalid'
                assert e.message.startswith('client sent invalid ')


@given(st.binary(max_size=60), st.binary(max_size=60), st.binary(max_size=60))
def test_plain_property(authzid, login, passwd):
    authzid, login = authzid.replace(b'\0', b''), login.replace(b'\0', b'')
    text = sasl.b64encode(authzid + b'\0' + login + b'\0' + passwd)
    if set(login) & set(b'\r\n') or set(passwd) & set(b'\r\n'):
        with bad('client sent invalid credentials with CR or LF'):
            sasl.decode_plain(text)
    else:
        assert sasl.decode_plain(text) == (login, passwd)
