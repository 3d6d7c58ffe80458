"""gmailproxy.oauth and the XOAUTH2/OAUTHBEARER rows of sasl.py: configuration, the
mechanism handlers, the auth answer's Auth-User/Auth-Pass rule and the backend replay
(against a scripted stand-in for upstream.Upstream)."""
import base64
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gmailproxy import auth_http, errors, oauth, sasl
from gmailproxy.config.parser import load
from gmailproxy.config.values import page_size
from gmailproxy.errors import BadCommand, ConfigError

TOKEN = b'ya29.A0ARrdaM-t0ken_x'


def write(folder: Path, text: str) -> str:
    path = folder / 'mail.conf'
    path.write_text(text)
    return str(path)


def servers(tmp_path, mail: str = '', **protocols) -> dict:
    """Load a file with one server per protocol (``imap='directives'``)."""
    ports = {'imap': 8143, 'pop3': 8110, 'smtp': 8025}
    text = 'events { }\nmail {\n    auth_http 127.0.0.1:9000/auth;\n' + mail + '\n'
    for proto, body in protocols.items():
        text += '    server { listen 127.0.0.1:%d; protocol %s; %s }\n' % (
            ports[proto], proto, body)
    config = load(write(tmp_path, text + '}\n'))
    return {conf.protocol: conf for conf in config.servers}


# --- configuration --------------------------------------------------------------------

def test_error_challenges_without_and_with_scope(tmp_path):
    confs = servers(tmp_path, imap='', pop3='oauth_scope https://mail.example/;')
    decoded = {proto: {m: base64.b64decode(v) for m, v in conf.oauth_errors.items()}
               for proto, conf in confs.items()}
    assert decoded['imap'] == {'xoauth2': b'{"status":"401","schemes":"bearer"}',
                               'oauthbearer': b'{"status":"invalid_token"}'}
    assert decoded['pop3'] == {
        'xoauth2':
            b'{"status":"401","schemes":"bearer","scope":"https://mail.example/"}',
        'oauthbearer': b'{"status":"invalid_token","scope":"https://mail.example/"}'}


def test_scope_is_escaped_as_json():
    assert json.loads(base64.b64decode(oauth.error_json('xoauth2', 'a"b\\c'))) == {
        'status': '401', 'schemes': 'bearer', 'scope': 'a"b\\c'}


def test_scope_is_inherited_from_mail(tmp_path):
    confs = servers(tmp_path, mail='oauth_scope mail;', smtp='')
    assert base64.b64decode(confs['smtp'].oauth_errors['xoauth2']) == \
        b'{"status":"401","schemes":"bearer","scope":"mail"}'


@pytest.mark.parametrize('text, message', [
    ('oauth_scope a b;', 'invalid number of arguments in "oauth_scope" directive'),
    ('imap_auth xoauth3;', 'invalid value "xoauth3"'),
    ('smtp_auth oauth;', 'invalid value "oauth"'),
])
def test_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        servers(tmp_path, mail='    ' + text, imap='')
    assert str(info.value) == '%s in %s:4' % (message, tmp_path / 'mail.conf')


def test_method_words_are_case_insensitive_and_capabilities_ordered(tmp_path):
    confs = servers(tmp_path, imap='imap_auth OAuthBearer XOAUTH2 external plain;',
                    pop3='pop3_auth oauthbearer apop xoauth2;',
                    smtp='smtp_auth oauthbearer none xoauth2 login;')
    assert confs['imap'].imap_auth == ('oauthbearer', 'xoauth2', 'external', 'plain')
    assert confs['imap'].imap_capability == (
        b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS ID AUTH=PLAIN AUTH=EXTERNAL '
        b'AUTH=XOAUTH2 AUTH=OAUTHBEARER\r\n')
    assert confs['imap'].imap_starttls_only_capability == (
        b'* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS ID STARTTLS LOGINDISABLED\r\n')
    assert confs['pop3'].pop3_auth_capability == (
        b'+OK methods supported:\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n')
    assert confs['smtp'].smtp_ehlo.endswith(b'250 AUTH LOGIN XOAUTH2 OAUTHBEARER\r\n')


def test_client_buffer_raised_only_when_offered_and_not_set(tmp_path):
    confs = servers(tmp_path, imap='imap_auth plain xoauth2;',
                    pop3='pop3_auth oauthbearer;', smtp='')
    assert confs['imap'].imap_client_buffer == oauth.TOKEN_BUFFER == 16384
    assert confs['pop3'].pop3_client_buffer == 16384
    assert confs['smtp'].smtp_client_buffer == page_size()      # not offered: nginx's


def test_client_buffer_written_is_kept(tmp_path):
    confs = servers(tmp_path, mail='pop3_client_buffer 1k;',
                    imap='imap_auth xoauth2; imap_client_buffer 2k;',
                    pop3='pop3_auth xoauth2;', smtp='smtp_auth xoauth2;')
    assert confs['imap'].imap_client_buffer == 2048
    assert confs['pop3'].pop3_client_buffer == 1024           # set in mail {}
    assert confs['smtp'].smtp_client_buffer == 16384


# --- the mechanisms (sasl.py) ---------------------------------------------------------

class Sess:
    def __init__(self):
        self.login = self.passwd = self.salt = None
        self.auth_method = 'plain'
        self.asked = []


def run(mechanism, initial, enabled, answer=None):
    s = Sess()

    def ask(text):
        s.asked.append(text)
        return answer

    sasl.run_mechanism(s, mechanism, initial, enabled, ask)
    return s


XO = sasl.encode_xoauth2(b'alice@example.com', TOKEN)
OB = sasl.encode_oauthbearer(b'alice@example.com', TOKEN)


@pytest.mark.parametrize('mechanism, response, method', [
    (b'XOAUTH2', XO, 'xoauth2'), (b'xoauth2', XO, 'xoauth2'),
    (b'OAUTHBEARER', OB, 'oauthbearer'), (b'OAuthBearer', OB, 'oauthbearer'),
])
def test_initial_response_or_empty_challenge(mechanism, response, method):
    s = run(mechanism, response, ('xoauth2', 'oauthbearer'))
    assert (s.login, s.passwd, s.auth_method, s.asked) == (
        b'alice@example.com', TOKEN, method, [])
    s = run(mechanism, None, ('xoauth2', 'oauthbearer'), answer=response)
    assert (s.login, s.passwd, s.auth_method, s.asked) == (
        b'alice@example.com', TOKEN, method, [b''])


@pytest.mark.parametrize('mechanism, enabled', [
    (b'XOAUTH2', ('plain', 'oauthbearer')),
    (b'OAUTHBEARER', ('plain', 'xoauth2')),
    (b'XOAUTH2', ()),
])
def test_only_when_enabled(mechanism, enabled):
    with pytest.raises(BadCommand) as info:
        run(mechanism, XO, enabled)
    assert info.value.message == ''


def test_encode_oauthbearer_without_user_has_no_authzid():
    assert base64.b64decode(sasl.encode_oauthbearer(b'', b'tok')) == \
        b'n,,\x01auth=Bearer tok\x01\x01'
    assert sasl.decode_oauthbearer(sasl.encode_oauthbearer(b'', b'tok')) == \
        (b'', b'tok')


# --- the auth answer decides: replay, or the login and password it names -----------

class Url:
    addr_text = '127.0.0.1:9000'


def answered(headers, method='xoauth2'):
    s = SimpleNamespace(conf=SimpleNamespace(resolver=None), proto=SimpleNamespace(
        NAME='imap'), auth_method=method, login=b'alice@example.com', passwd=TOKEN)
    base = [(b'Auth-Status', b'OK'), (b'Auth-Server', b'127.0.0.1'),
            (b'Auth-Port', b'143')]
    s.auth = auth_http.interpret(s, Url(), base + headers)
    return s


@pytest.mark.parametrize('headers, replayed, login, passwd', [
    ([], True, b'alice@example.com', TOKEN),
    ([(b'Auth-User', b'mbox7')], True, b'mbox7', TOKEN),
    ([(b'Auth-Pass', b'exchanged')], True, b'alice@example.com', b'exchanged'),
    ([(b'Auth-User', b'alice'), (b'Auth-Pass', b'secret')], False, b'alice', b'secret'),
    ([(b'Auth-Pass', b'secret'), (b'Auth-User', b'alice')], False, b'alice', b'secret'),
])
def test_replay_unless_the_answer_names_user_and_password(headers, replayed, login,
                                                          passwd):
    s = answered(headers)
    assert oauth.replays(s) is replayed
    assert (s.login, s.passwd) == (login, passwd)


def test_other_methods_never_replay():
    s = answered([], method='plain')
    assert oauth.replays(s) is False


# --- the backend replay, against a scripted upstream ---------------------------------

class Up:
    """upstream.Upstream's send/read_reply/check, from a list of replies."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []
        self.actions = []

    def send(self, s, data, action):
        self.sent.append(data)
        self.actions.append(action)

    def read_reply(self, s, multiline=False):
        return self.replies.pop(0)

    def check(self, s, reply, ok):
        if not ok:
            raise errors.UpstreamRejected('upstream sent invalid response: "%s"'
                                          % reply.decode(), reply)
        return reply


def replaying(method='xoauth2', login=b'alice@example.com', passwd=TOKEN, tag=b'a1 '):
    s = SimpleNamespace(auth_method=method, login=login, passwd=passwd, tag=tag,
                        auth=SimpleNamespace(user_and_pass=False), action=None,
                        conf=SimpleNamespace(proxy_buffer=4096), sent=[])
    s.send = s.sent.append
    return s


def imap_login(s, up, greeting):
    """The OAuth replay as imap.login_upstream runs it: the exchange, then the relay."""
    from gmailproxy.protocols import imap
    imap.relay_final_reply(s, up, s.tag, oauth.imap_login(s, up, greeting))


def test_imap_sasl_ir_only_when_the_greeting_announces_it():
    s, up = replaying(), Up([b'a1 OK done\r\n'])
    imap_login(s, up, b'* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n')
    assert up.sent == [b'a1 AUTHENTICATE XOAUTH2 ' + XO + b'\r\n']
    assert s.sent == [b'a1 OK done\r\n']
    s, up = replaying(), Up([b'+ \r\n', b'a1 OK done\r\n'])
    imap_login(s, up, b'* OK SASL-IR outside a capability list\r\n')
    assert up.sent == [b'a1 AUTHENTICATE XOAUTH2\r\n', XO + b'\r\n']


def test_imap_untagged_lines_are_relayed_within_proxy_buffer():
    s, up = replaying(), Up([b'* CAPABILITY X\r\n', b'a1 OK done\r\n'])
    imap_login(s, up, b'* OK [CAPABILITY SASL-IR]\r\n')
    assert s.sent == [b'* CAPABILITY X\r\na1 OK done\r\n']
    s, up = replaying(), Up([b'* ' + b'x' * 5000 + b'\r\n', b'a1 OK done\r\n'])
    with pytest.raises(errors.UpstreamError, match='upstream sent too long response'):
        imap_login(s, up, b'* OK [CAPABILITY SASL-IR]\r\n')


def test_imap_backend_without_continuation_is_rejected():
    s, up = replaying(), Up([b'a1 BAD no\r\n'])
    with pytest.raises(errors.UpstreamRejected):
        imap_login(s, up, b'* OK ready\r\n')
    assert up.sent == [b'a1 AUTHENTICATE XOAUTH2\r\n']


def pop3_token(length: int) -> bytes:
    """A token making ``AUTH XOAUTH2 <b64>\\r\\n`` exactly ``length`` bytes long."""
    for n in range(1, 400):
        token = b't' * n
        if len(b'AUTH XOAUTH2 %s\r\n' % sasl.encode_xoauth2(b'u', token)) == length:
            return token
    raise AssertionError(length)


def test_pop3_initial_response_up_to_255_octets():
    token = pop3_token(255)
    s, up = replaying(login=b'u', passwd=token), Up([b'+OK in\r\n'])
    oauth.pop3_login(s, up)
    assert up.sent == [b'AUTH XOAUTH2 %s\r\n' % sasl.encode_xoauth2(b'u', token)]
    assert s.sent == [b'+OK in\r\n']
    token += b'ttt'                                   # one more base64 quantum: 259
    s, up = replaying(login=b'u', passwd=token), Up([b'+ \r\n', b'+OK in\r\n'])
    oauth.pop3_login(s, up)
    assert up.sent == [b'AUTH XOAUTH2\r\n', sasl.encode_xoauth2(b'u', token) + b'\r\n']


def test_pop3_plus_ok_is_not_a_continuation():
    s, up = replaying(login=b'u', passwd=b't' * 250), Up([b'+OK\r\n'])
    with pytest.raises(errors.UpstreamRejected):
        oauth.pop3_login(s, up)


@pytest.mark.parametrize('method, answer', [('xoauth2', b'\r\n'),
                                            ('oauthbearer', b'AQ==\r\n')])
def test_smtp_error_challenge_answered(method, answer):
    s = replaying(method=method)
    up = Up([b'334 eyJzdGF0dXMiOiI0MDEifQ==\r\n', b'535 5.7.8 no\r\n'])
    with pytest.raises(errors.UpstreamRejected, match='535 5.7.8 no'):
        oauth.smtp_auth(s, up)
    assert up.sent[1] == answer
    assert up.actions == ['sending AUTH to upstream',
                          'sending AUTH response to upstream']


def test_smtp_accepted():
    s, up = replaying(method='oauthbearer'), Up([b'235 2.7.0 ok\r\n'])
    oauth.smtp_auth(s, up)
    assert up.sent == [b'AUTH OAUTHBEARER ' + OB + b'\r\n']


@pytest.mark.parametrize('login, passwd', [(b'a\x01auth=Bearer x', TOKEN),
                                           (b'alice', b'tok\x01en')])
def test_0x01_from_the_auth_answer_is_refused(login, passwd):
    s, up = replaying(login=login, passwd=passwd), Up([])
    with pytest.raises(errors.UpstreamError,
                       match='^invalid user or token for XOAUTH2$'):
        oauth.smtp_auth(s, up)
    assert up.sent == []
