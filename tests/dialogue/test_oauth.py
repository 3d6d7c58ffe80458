"""XOAUTH2 and OAUTHBEARER (beyond nginx), byte for byte, with an in-process proxy.

The RecordingAuthServer checks the token as the user's password (its default rule for
any method other than CRAM-MD5/APOP/EXTERNAL); the backend is a script that answers
each line it receives with the next reply, so every line the proxy sends it is checked
exactly. Expected bytes are spelled out, the error JSON included.
"""
import time

import gevent
import pytest

from tests.support.auth import b64
from tests.support.fake_backend import LineServer
from tests.support.nginxlog import logged_in, login_failed

CONF = '''
mail {
    error_log {log} info;
    auth_http {auth};
    auth_http_keepalive off;
    server_name mx.example;
    %s
    server { listen 127.0.0.1:{port}; protocol %s; %s }
}
'''
USER = b'alice@example.com'
TOKEN = b'ya29.A0ARrdaM-t0ken_x'
OTHER_TOKEN = b'ya29.backend-token'


XOAUTH2 = b64(b'user=alice@example.com\x01auth=Bearer ya29.A0ARrdaM-t0ken_x\x01\x01')
BEARER = b64(b'n,a=alice@example.com,\x01auth=Bearer ya29.A0ARrdaM-t0ken_x\x01\x01')
BAD_XOAUTH2 = b64(b'user=alice@example.com\x01auth=Bearer expired\x01\x01')
BAD_BEARER = b64(b'n,a=alice@example.com,\x01auth=Bearer expired\x01\x01')
XOAUTH2_ERROR = b64(b'{"status":"401","schemes":"bearer"}')
XOAUTH2_SCOPE_ERROR = b64(b'{"status":"401","schemes":"bearer",'
                          b'"scope":"https://mail.example/"}')
BEARER_ERROR = b64(b'{"status":"invalid_token"}')
BEARER_SCOPE_ERROR = b64(b'{"status":"invalid_token","scope":"https://mail.example/"}')
IMAP_IR_GREETING = b'* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n'


class Script(LineServer):
    """A backend that sends ``greeting``, then answers the n-th line it receives with
    ``replies[n]``; later lines (the pumped session) are only recorded."""

    def __init__(self, greeting: bytes, replies: list):
        self._greeting, self.replies = greeting, replies
        self._left = {}         # per connection: the replies not sent yet
        super().__init__()

    def greeting(self) -> bytes:
        return self._greeting

    def answer(self, sock, f, line: bytes) -> bytes:
        left = self._left.setdefault(f, iter(self.replies))
        return next(left, None) or b''

    def wait_lines(self, n: int, timeout: float = 5.0) -> list:
        with gevent.Timeout(timeout, AssertionError('backend got %r' % self.lines)):
            while len(self.lines) < n:
                gevent.sleep(0.01)
        return self.lines


@pytest.fixture
def script(request):
    made = []

    def make(greeting: bytes, replies: list) -> Script:
        backend = Script(greeting, replies)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.server.stop(timeout=1)


def start(mailproxy, auth, proto, backend=None, mail='', server='', **user):
    """The proxy for ``proto`` with ``USER`` known to the auth service (its password is
    ``TOKEN``; ``user`` adds entry keys such as ``user``, ``pass``, ``wait``)."""
    auth.users = {USER.decode(): dict({'password': TOKEN.decode()}, **user)}
    if backend is not None:
        auth.ports = {proto: backend.port}
    return mailproxy(CONF % (mail, proto, server))


def request(auth, index: int = -1) -> dict:
    req = auth.parsed[index]
    return {name: req.get(name) for name in ('Auth-Method', 'Auth-User', 'Auth-Pass',
                                              'Auth-Protocol')}


# --- what is advertised ---------------------------------------------------------------

def test_imap_capability_lists_them_after_external(mailproxy, auth):
    proxy = start(mailproxy, auth, 'imap',
                  mail='imap_auth oauthbearer xoauth2 external cram-md5 plain;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a CAPABILITY\r\n')
    c.expect(b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS ID AUTH=PLAIN AUTH=CRAM-MD5 '
             b'AUTH=EXTERNAL AUTH=XOAUTH2 AUTH=OAUTHBEARER\r\na OK completed\r\n')


def test_pop3_capa_and_auth_list(mailproxy, auth):
    proxy = start(mailproxy, auth, 'pop3', mail='pop3_auth plain xoauth2 oauthbearer;')
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'CAPA\r\n')
    c.expect(b'+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n'
             b'SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n.\r\n')
    c.send(b'AUTH\r\n')
    c.expect(b'+OK methods supported:\r\nPLAIN\r\nLOGIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n'
             b'.\r\n')


def test_smtp_ehlo_lists_them(mailproxy, auth):
    proxy = start(mailproxy, auth, 'smtp',
                  mail='smtp_auth login plain oauthbearer xoauth2;')
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'EHLO client.example\r\n')
    c.expect(b'250-mx.example\r\n250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n')


@pytest.mark.parametrize('proto, greeting, command, invalid', [
    ('imap', b'* OK IMAP4 ready\r\n', b'a AUTHENTICATE XOAUTH2 ' + XOAUTH2,
     b'a BAD invalid command\r\n'),
    ('imap', b'* OK IMAP4 ready\r\n', b'a AUTHENTICATE OAUTHBEARER',
     b'a BAD invalid command\r\n'),
    ('pop3', b'+OK POP3 ready\r\n', b'AUTH XOAUTH2', b'-ERR invalid command\r\n'),
    ('smtp', b'220 mx.example ESMTP ready\r\n', b'AUTH OAUTHBEARER ' + BEARER,
     b'500 5.5.1 Invalid command\r\n'),
])
def test_not_offered_is_an_invalid_command(mailproxy, auth, proto, greeting, command,
                                           invalid):
    proxy = start(mailproxy, auth, proto)            # default *_auth: no OAuth
    c = proxy.client(greeting=greeting)
    c.send(command + b'\r\n')
    c.expect(invalid)
    assert auth.requests == []


@pytest.mark.parametrize('response, log', [
    (b64(b'user=alice\x01auth=Basic abc\x01\x01'),
     'client sent invalid XOAUTH2 response'),
    (b'dXNlc', 'client sent invalid base64 encoding in AUTH XOAUTH2 command'),
    (b64(b'user=a\r\nb\x01auth=Bearer t\x01\x01'),
     'client sent invalid credentials with CR or LF'),
])
def test_malformed_response_is_an_invalid_command(mailproxy, auth, response, log):
    proxy = start(mailproxy, auth, 'imap', mail='imap_auth xoauth2;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE XOAUTH2 ' + response + b'\r\n')
    c.expect(b'a BAD invalid command\r\n')
    proxy.wait_log(log)
    assert auth.requests == []


# --- IMAP -----------------------------------------------------------------------------

def test_imap_xoauth2_initial_response_replayed_with_sasl_ir(mailproxy, auth, script):
    be = script(IMAP_IR_GREETING, [b'* CAPABILITY IMAP4rev1 IDLE\r\n'
                                   b'a OK [CAPABILITY IMAP4rev1] done\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth xoauth2;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'* CAPABILITY IMAP4rev1 IDLE\r\na OK [CAPABILITY IMAP4rev1] done\r\n')
    assert be.lines == [b'a AUTHENTICATE XOAUTH2 ' + XOAUTH2 + b'\r\n']
    assert request(auth) == {'Auth-Method': 'xoauth2', 'Auth-User': 'alice@example.com',
                             'Auth-Pass': TOKEN.decode(), 'Auth-Protocol': 'imap'}
    c.send(b'b NOOP\r\n')                               # then the pump
    assert be.wait_lines(2)[1] == b'b NOOP\r\n'
    proxy.wait_log(logged_in('alice@example.com', be.port))
    assert TOKEN.decode() not in proxy.log_text()


def test_imap_xoauth2_continuation_both_sides(mailproxy, auth, script):
    """Without SASL-IR (a client may not send an initial response, a backend may not
    accept one) the response follows an empty challenge."""
    be = script(b'* OK backend ready\r\n', [b'+ \r\n', b'a OK done\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth xoauth2;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE XOAUTH2\r\n')
    c.expect(b'+ \r\n')
    c.send(XOAUTH2 + b'\r\n')
    c.expect(b'a OK done\r\n')
    assert be.lines == [b'a AUTHENTICATE XOAUTH2\r\n', XOAUTH2 + b'\r\n']


def test_imap_oauthbearer_replayed(mailproxy, auth, script):
    be = script(IMAP_IR_GREETING, [b'a OK done\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth oauthbearer;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE OAUTHBEARER ' + BEARER + b'\r\n')
    c.expect(b'a OK done\r\n')
    assert be.lines == [b'a AUTHENTICATE OAUTHBEARER ' + BEARER + b'\r\n']
    assert request(auth)['Auth-Method'] == 'oauthbearer'
    assert request(auth)['Auth-User'] == 'alice@example.com'


def test_imap_login_and_password_from_the_answer(mailproxy, auth, script):
    """Auth-User and Auth-Pass both: the normal LOGIN, as for any method."""
    be = script(IMAP_IR_GREETING, [b'+ OK\r\n', b'+ OK\r\n', b'a OK logged in\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth xoauth2;',
                  user='alice', **{'pass': 'secret'})
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'a OK logged in\r\n')
    assert be.lines == [b'a LOGIN {5}\r\n', b'alice {6}\r\n', b'secret\r\n']


@pytest.mark.parametrize('answer, replayed', [
    ({'user': 'mbox7'}, b'user=mbox7\x01auth=Bearer ya29.A0ARrdaM-t0ken_x\x01\x01'),
    ({'pass': 'ya29.backend-token'},
     b'user=alice@example.com\x01auth=Bearer ya29.backend-token\x01\x01'),
])
def test_imap_user_or_token_alone_from_the_answer(mailproxy, auth, script, answer,
                                                  replayed):
    """Auth-User alone names the backend user, Auth-Pass alone is a token for it."""
    be = script(IMAP_IR_GREETING, [b'a OK done\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth xoauth2;', **answer)
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'a OK done\r\n')
    assert be.lines == [b'a AUTHENTICATE XOAUTH2 ' + b64(replayed) + b'\r\n']


def test_imap_oauthbearer_without_user_takes_it_from_the_answer(mailproxy, auth,
                                                                script):
    be = script(IMAP_IR_GREETING, [b'a OK done\r\n'])
    auth.users = {'': {'password': TOKEN.decode(), 'user': 'alice'}}
    auth.ports = {'imap': be.port}
    proxy = mailproxy(CONF % ('imap_auth oauthbearer;', 'imap', ''))
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE OAUTHBEARER '
           + b64(b'n,,\x01auth=Bearer ya29.A0ARrdaM-t0ken_x\x01\x01') + b'\r\n')
    c.expect(b'a OK done\r\n')
    assert request(auth)['Auth-User'] == ''
    replayed = b64(b'n,a=alice,\x01auth=Bearer ya29.A0ARrdaM-t0ken_x\x01\x01')
    assert be.lines == [b'a AUTHENTICATE OAUTHBEARER ' + replayed + b'\r\n']


@pytest.mark.parametrize('method, response, answer', [
    (b'XOAUTH2', XOAUTH2, b'\r\n'),
    (b'OAUTHBEARER', BEARER, b'AQ==\r\n'),
])
def test_imap_backend_refusing_the_token(mailproxy, auth, script, method, response,
                                         answer):
    """The backend's error challenge is answered as a client would; its NO is an
    internal error for the client, as any failed backend login."""
    be = script(IMAP_IR_GREETING, [b'+ ' + XOAUTH2_ERROR + b'\r\n',
                                   b'a NO [AUTHENTICATIONFAILED] failed\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth xoauth2 oauthbearer;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE ' + method + b' ' + response + b'\r\n')
    c.expect(b'* BAD internal server error\r\n')
    assert be.lines == [b'a AUTHENTICATE ' + method + b' ' + response + b'\r\n', answer]
    proxy.wait_log(r'upstream sent invalid response: "a NO \[AUTHENTICATIONFAILED\] '
                   r'failed" while reading response from upstream')


# --- refusals: the error challenge, the client's answer, the protocol's failure -----

@pytest.mark.parametrize('proto, greeting, command, challenge, answer, final', [
    ('imap', b'* OK IMAP4 ready\r\n', b'a AUTHENTICATE XOAUTH2 ' + BAD_XOAUTH2,
     b'+ ' + XOAUTH2_ERROR, b'', b'a NO Invalid login or password\r\n'),
    ('imap', b'* OK IMAP4 ready\r\n', b'a AUTHENTICATE OAUTHBEARER ' + BAD_BEARER,
     b'+ ' + BEARER_ERROR, b'AQ==', b'a NO Invalid login or password\r\n'),
    ('pop3', b'+OK POP3 ready\r\n', b'AUTH XOAUTH2 ' + BAD_XOAUTH2,
     b'+ ' + XOAUTH2_ERROR, b'', b'-ERR Invalid login or password\r\n'),
    ('pop3', b'+OK POP3 ready\r\n', b'AUTH OAUTHBEARER ' + BAD_BEARER,
     b'+ ' + BEARER_ERROR, b'AQ==', b'-ERR Invalid login or password\r\n'),
    ('smtp', b'220 mx.example ESMTP ready\r\n', b'AUTH XOAUTH2 ' + BAD_XOAUTH2,
     b'334 ' + XOAUTH2_ERROR, b'', b'535 5.7.8 Invalid login or password\r\n'),
    ('smtp', b'220 mx.example ESMTP ready\r\n', b'AUTH OAUTHBEARER ' + BAD_BEARER,
     b'334 ' + BEARER_ERROR, b'AQ==', b'535 5.7.8 Invalid login or password\r\n'),
])
def test_refused_token_failure_dialogue(mailproxy, auth, proto, greeting, command,
                                        challenge, answer, final):
    proxy = start(mailproxy, auth, proto,
                  mail='%s_auth plain xoauth2 oauthbearer;' % proto)
    c = proxy.client(greeting=greeting)
    c.send(command + b'\r\n')
    c.expect(challenge + b'\r\n')
    c.send(answer + b'\r\n')
    c.expect(final)
    assert c.recv_all_until_close() == b''              # no Auth-Wait: closed
    assert request(auth)['Auth-Pass'] == 'expired'
    proxy.wait_log(login_failed('alice@example.com'))


@pytest.mark.parametrize('proto, greeting, command, challenge', [
    ('imap', b'* OK IMAP4 ready\r\n', b'a AUTHENTICATE XOAUTH2 ' + BAD_XOAUTH2,
     b'+ ' + XOAUTH2_SCOPE_ERROR),
    ('pop3', b'+OK POP3 ready\r\n', b'AUTH OAUTHBEARER ' + BAD_BEARER,
     b'+ ' + BEARER_SCOPE_ERROR),
    ('smtp', b'220 mx.example ESMTP ready\r\n', b'AUTH XOAUTH2 ' + BAD_XOAUTH2,
     b'334 ' + XOAUTH2_SCOPE_ERROR),
])
def test_error_challenge_names_oauth_scope(mailproxy, auth, proto, greeting, command,
                                           challenge):
    proxy = start(mailproxy, auth, proto, mail='%s_auth xoauth2 oauthbearer; '
                  'oauth_scope https://mail.example/;' % proto)
    c = proxy.client(greeting=greeting)
    c.send(command + b'\r\n')
    c.expect(challenge + b'\r\n')


def test_smtp_refusal_uses_auth_error_code(mailproxy, auth):
    proxy = start(mailproxy, auth, 'smtp', mail='smtp_auth xoauth2;',
                  status='Token expired', error_code='454 4.7.0')
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'AUTH XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'334 ' + XOAUTH2_ERROR + b'\r\n')
    c.send(b'\r\n')
    c.expect(b'454 4.7.0 Token expired\r\n')


def test_smtp_other_methods_keep_535_5_7_0(mailproxy, auth):
    proxy = start(mailproxy, auth, 'smtp', mail='smtp_auth plain xoauth2;')
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'AUTH PLAIN ' + b64(b'\0alice@example.com\0wrong') + b'\r\n')
    c.expect(b'535 5.7.0 Invalid login or password\r\n')


def test_imap_refusal_with_auth_wait_then_retry(mailproxy, auth, script):
    """Auth-Wait: the pause, the error challenge, the client's answer, NO; then the
    dialogue goes on and a second attempt may succeed."""
    be = script(IMAP_IR_GREETING, [b'b OK done\r\n'])
    proxy = start(mailproxy, auth, 'imap', be, mail='imap_auth xoauth2;', wait=1)
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    began = time.monotonic()
    c.send(b'a AUTHENTICATE XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n')
    c.expect(b'+ ' + XOAUTH2_ERROR + b'\r\n', timeout=5)
    assert 0.9 <= time.monotonic() - began < 3
    c.send(b'\r\n')
    c.expect(b'a NO Invalid login or password\r\n')
    c.send(b'b AUTHENTICATE XOAUTH2\r\n')
    c.expect(b'+ \r\n')
    c.send(XOAUTH2 + b'\r\n')
    c.expect(b'b OK done\r\n')
    assert be.lines == [b'b AUTHENTICATE XOAUTH2 ' + XOAUTH2 + b'\r\n']
    assert auth.parsed[1].get('Auth-Login-Attempt') == '2'


def test_imap_client_cancelling_the_error_challenge(mailproxy, auth):
    """Whatever the client answers (here ``*``), the refusal follows."""
    proxy = start(mailproxy, auth, 'imap', mail='imap_auth xoauth2;')
    c = proxy.client(greeting=b'* OK IMAP4 ready\r\n')
    c.send(b'a AUTHENTICATE XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n')
    c.expect(b'+ ' + XOAUTH2_ERROR + b'\r\n')
    c.send(b'*\r\n')
    c.expect(b'a NO Invalid login or password\r\n')


def test_client_silent_after_error_challenge_times_out(mailproxy, auth):
    proxy = start(mailproxy, auth, 'pop3', mail='pop3_auth xoauth2;',
                  server='timeout 1s;')
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'AUTH XOAUTH2 ' + BAD_XOAUTH2 + b'\r\n')
    c.expect(b'+ ' + XOAUTH2_ERROR + b'\r\n')
    assert c.recv_all_until_close(timeout=5) == b''
    proxy.wait_log('client timed out')


# --- POP3 -----------------------------------------------------------------------------

def test_pop3_xoauth2_replayed(mailproxy, auth, script):
    be = script(b'+OK backend ready\r\n', [b'+OK logged in\r\n'])
    proxy = start(mailproxy, auth, 'pop3', be, mail='pop3_auth xoauth2;')
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'AUTH XOAUTH2\r\n')
    c.expect(b'+ \r\n')
    c.send(XOAUTH2 + b'\r\n')
    c.expect(b'+OK logged in\r\n')
    assert be.lines == [b'AUTH XOAUTH2 ' + XOAUTH2 + b'\r\n']
    assert request(auth)['Auth-Method'] == 'xoauth2'


def test_pop3_long_token_default_buffer_and_255_octet_rule(mailproxy, auth, script):
    """A 3000-byte token fits the raised default buffer (nginx's 128 bytes would refuse
    it); towards the backend the response follows a ``+`` (RFC 5034: an AUTH line
    with its initial response is at most 255 octets)."""
    token = b'eyJ' + b'x' * 2997
    response = b64(b'n,a=alice@example.com,\x01auth=Bearer ' + token + b'\x01\x01')
    be = script(b'+OK backend ready\r\n', [b'+ \r\n', b'+OK logged in\r\n'])
    proxy = start(mailproxy, auth, 'pop3', be, mail='pop3_auth oauthbearer;')
    auth.users[USER.decode()]['password'] = token.decode()
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'AUTH OAUTHBEARER ' + response + b'\r\n')
    c.expect(b'+OK logged in\r\n')
    assert be.lines == [b'AUTH OAUTHBEARER\r\n', response + b'\r\n']


def test_pop3_explicit_buffer_is_kept(mailproxy, auth):
    proxy = start(mailproxy, auth, 'pop3',
                  mail='pop3_auth xoauth2; pop3_client_buffer 128;')
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'AUTH XOAUTH2 ' + b64(b'user=a\x01auth=Bearer %s\x01\x01' % (b'x' * 100))
           + b'\r\n')
    c.expect(b'-ERR invalid command\r\n')
    proxy.wait_log('client sent too long command "AUTH..."')


def test_pop3_user_pass_from_the_answer(mailproxy, auth, script):
    be = script(b'+OK backend ready\r\n', [b'+OK\r\n', b'+OK maildrop ready\r\n'])
    proxy = start(mailproxy, auth, 'pop3', be, mail='pop3_auth oauthbearer;',
                  user='alice', **{'pass': 'secret'})
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'AUTH OAUTHBEARER ' + BEARER + b'\r\n')
    c.expect(b'+OK maildrop ready\r\n')
    assert be.lines == [b'USER alice\r\n', b'PASS secret\r\n']


def test_pop3_backend_refusing_the_token(mailproxy, auth, script):
    be = script(b'+OK backend ready\r\n', [b'+ ' + BEARER_ERROR + b'\r\n',
                                           b'-ERR [AUTH] Authentication failed.\r\n'])
    proxy = start(mailproxy, auth, 'pop3', be, mail='pop3_auth oauthbearer;')
    c = proxy.client(greeting=b'+OK POP3 ready\r\n')
    c.send(b'AUTH OAUTHBEARER ' + BEARER + b'\r\n')
    c.expect(b'-ERR internal server error\r\n')
    assert be.lines == [b'AUTH OAUTHBEARER ' + BEARER + b'\r\n', b'AQ==\r\n']


# --- SMTP -----------------------------------------------------------------------------

SMTP_BACKEND = [b'250-backend\r\n250 AUTH XOAUTH2 OAUTHBEARER\r\n',
                b'235 2.7.0 Accepted\r\n', b'250 2.1.0 Ok\r\n']


@pytest.mark.parametrize('method, response', [(b'XOAUTH2', XOAUTH2),
                                              (b'OAUTHBEARER', BEARER)])
def test_smtp_replayed_with_proxy_smtp_auth(mailproxy, auth, script, method, response):
    be = script(b'220 backend ESMTP\r\n', SMTP_BACKEND)
    proxy = start(mailproxy, auth, 'smtp', be, mail='smtp_auth xoauth2 oauthbearer;',
                  server='xclient off; proxy_smtp_auth on;')
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'EHLO client.example\r\n')
    c.read_lines_until(b'250 ')
    c.send(b'AUTH ' + method + b' ' + response + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    c.send(b'MAIL FROM:<alice@example.com>\r\n')
    c.expect(b'250 2.1.0 Ok\r\n')
    assert be.lines == [b'EHLO mx.example\r\n',
                        b'AUTH ' + method + b' ' + response + b'\r\n',
                        b'MAIL FROM:<alice@example.com>\r\n']


def test_smtp_without_proxy_smtp_auth_names_the_user_in_xclient(mailproxy, auth,
                                                                script):
    be = script(b'220 backend ESMTP\r\n', [b'250 backend\r\n', b'220 backend\r\n'])
    proxy = start(mailproxy, auth, 'smtp', be, mail='smtp_auth xoauth2;')
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'AUTH XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert be.lines == [b'EHLO mx.example\r\n', b'XCLIENT ADDR=127.0.0.1 '
                        b'LOGIN=alice@example.com NAME=[UNAVAILABLE]\r\n']


def test_smtp_auth_plain_from_the_answer(mailproxy, auth, script):
    be = script(b'220 backend ESMTP\r\n', SMTP_BACKEND)
    proxy = start(mailproxy, auth, 'smtp', be, mail='smtp_auth xoauth2;',
                  server='xclient off; proxy_smtp_auth on;', user='alice',
                  **{'pass': 'secret'})
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'AUTH XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'235 2.0.0 OK\r\n')
    assert be.lines == [b'HELO mx.example\r\n',
                        b'AUTH PLAIN ' + b64(b'\0alice\0secret') + b'\r\n']


def test_smtp_backend_refusing_the_token(mailproxy, auth, script):
    be = script(b'220 backend ESMTP\r\n', [
        b'250 backend\r\n', b'334 ' + XOAUTH2_ERROR + b'\r\n',
        b'535 5.7.8 Username and Password not accepted\r\n'])
    proxy = start(mailproxy, auth, 'smtp', be, mail='smtp_auth xoauth2;',
                  server='xclient off; proxy_smtp_auth on;')
    c = proxy.client(greeting=b'220 mx.example ESMTP ready\r\n')
    c.send(b'AUTH XOAUTH2 ' + XOAUTH2 + b'\r\n')
    c.expect(b'451 4.3.2 Internal server error\r\n')
    assert be.lines == [b'HELO mx.example\r\n', b'AUTH XOAUTH2 ' + XOAUTH2 + b'\r\n',
                        b'\r\n']
    proxy.wait_log(r'upstream sent invalid response: "535 5\.7\.8 Username and '
                   r'Password not accepted" while reading response from upstream')
