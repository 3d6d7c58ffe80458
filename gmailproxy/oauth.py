"""XOAUTH2 and OAUTHBEARER (beyond nginx): the failure dialogue and the backend replay.

A server offers them with the method words ``xoauth2`` and ``oauthbearer`` in
``imap_auth``, ``pop3_auth`` or ``smtp_auth`` (advertised after EXTERNAL). sasl.py
decodes the client's response (an initial response or the answer to an empty
challenge); the auth service gets ``Auth-Method: xoauth2`` or ``oauthbearer``, the user
in ``Auth-User`` (empty for an OAUTHBEARER client that names none) and the bearer token
in ``Auth-Pass``, and checks the token.

Accepted, the backend login depends on the answer:

* ``Auth-User`` and ``Auth-Pass`` both present: a login and password, used as for any
  other method (IMAP ``LOGIN``, POP3 ``USER``/``PASS``, SMTP ``AUTH PLAIN`` with
  ``proxy_smtp_auth on``);
* otherwise the client's mechanism is replayed: IMAP ``AUTHENTICATE XOAUTH2 <b64>`` (the
  response after a ``+`` when the greeting does not announce ``SASL-IR``), POP3
  ``AUTH XOAUTH2 <b64>`` (after a ``+`` when the line would pass RFC 5034's 255 octets),
  SMTP ``AUTH XOAUTH2 <b64>`` (only with ``proxy_smtp_auth on``, as for every method;
  without it ``XCLIENT LOGIN=`` names the user), OAUTHBEARER likewise. An ``Auth-User``
  alone replaces the user, an ``Auth-Pass`` alone the token (a token exchanged for the
  backend). The backend's answer is checked and relayed as after ``LOGIN``/``PASS``;
  an error challenge from it is answered as a client would, and its final refusal is
  the usual ``upstream sent invalid response``.

Refused, each mechanism's own failure dialogue (as Gmail and Dovecot do it): an error
challenge carrying base64 JSON, XOAUTH2 ``{"status":"401","schemes":"bearer",
"scope":SCOPE}`` and OAUTHBEARER ``{"status":"invalid_token","scope":SCOPE}`` (RFC 7628
section 3.2.2 wants an OAuth error code there; ``scope`` only with ``oauth_scope``),
then the client's answer (an empty line, ``AQ==`` for OAUTHBEARER; any line is taken),
then the protocol's rejection: IMAP ``<tag> NO <text>``, POP3 ``-ERR <text>``, SMTP
``<Auth-Error-Code or 535 5.7.8> <text>``. ``Auth-Wait`` works as for any rejection:
the pause comes before the challenge.

Bearer tokens are long (Google's are a few hundred bytes, Microsoft's JWTs several
kilobytes): a server that offers either mechanism and does not set its
``*_client_buffer`` reads commands of up to ``TOKEN_BUFFER`` bytes instead of nginx's
page size (POP3: 128 bytes).
"""
import json
import re

import gevent

from . import errors, sasl
from .config import values
from .config.directives import D, MAIL_SERVER

DIRECTIVES = [
    D('oauth_scope', MAIL_SERVER, '1', values.string),
]

METHODS = {'xoauth2': b'XOAUTH2', 'oauthbearer': b'OAUTHBEARER'}
ENCODERS = {'xoauth2': sasl.encode_xoauth2, 'oauthbearer': sasl.encode_oauthbearer}
# A client's answer to an error challenge: XOAUTH2 an empty response, RFC 7628 a 0x01.
ERROR_ANSWERS = {'xoauth2': b'\r\n', 'oauthbearer': b'AQ==\r\n'}
TOKEN_BUFFER = 16384
POP3_AUTH_LINE = 255            # RFC 5034 section 4, CRLF included

_SASL_IR = re.compile(rb'\[CAPABILITY [^\]\r\n]*\bSASL-IR\b', re.I)


def error_json(method: str, scope: str | None) -> bytes:
    """The error challenge's base64 JSON for ``method``."""
    if method == 'xoauth2':
        fields = {'status': '401', 'schemes': 'bearer'}
    else:
        fields = {'status': 'invalid_token'}
    if scope:
        fields['scope'] = scope
    return sasl.b64encode(json.dumps(fields, separators=(',', ':')).encode())


def finalize(conf) -> None:
    """The error challenges; the larger client buffer when a mechanism is offered."""
    conf.oauth_errors = {method: error_json(method, conf.oauth_scope)
                         for method in METHODS}
    offered = getattr(conf, conf.protocol + '_auth', ())
    buffer = conf.protocol + '_client_buffer'
    if any(method in offered for method in METHODS) and not conf.written(buffer):
        setattr(conf, buffer, max(getattr(conf, buffer), TOKEN_BUFFER))


# --- the client side ------------------------------------------------------------------

def error_challenge(s) -> None:
    """The first half of a refusal: the error challenge in the protocol's form (``+ x``
    or ``334 x``) and the client's one-line answer, read under ``timeout`` and ignored.
    The session then sends the protocol's rejection."""
    challenge = s.proto.SASL_CHALLENGE + s.conf.oauth_errors[s.auth_method] + b'\r\n'
    with gevent.Timeout(s.conf.timeout, errors.ClientTimeout):
        s.ask(challenge)


# --- the backend side -----------------------------------------------------------------

def replays(s) -> bool:
    """Is the client's mechanism replayed to the backend (no login/password from the
    auth answer)?"""
    return s.auth_method in METHODS and not s.auth.user_and_pass


def initial_response(s) -> bytes:
    """The base64 response for the backend: the user and token after the auth answer."""
    user, token = s.login or b'', s.passwd or b''
    if b'\x01' in user or b'\x01' in token:      # would add key/value pairs of its own
        s.action = 'sending AUTH to upstream'
        raise errors.UpstreamError('invalid user or token for %s'
                                   % METHODS[s.auth_method].decode())
    return ENCODERS[s.auth_method](user, token)


def _answer(s, up, continued, multiline: bool = False) -> bytes:
    """The backend's reply to the response; an error challenge (a continuation) is
    answered as a client would, and the reply after it returned."""
    reply = up.read_reply(s, multiline=multiline)
    if continued(reply):
        up.send(s, ERROR_ANSWERS[s.auth_method], 'sending AUTH response to upstream')
        reply = up.read_reply(s, multiline=multiline)
    return reply


def _imap_continue(line: bytes) -> bool:
    return line.startswith(b'+')


def _pop3_continue(line: bytes) -> bool:
    return line.startswith(b'+ ') or line.rstrip(b'\r\n') == b'+'


def _smtp_continue(reply: bytes) -> bool:
    return reply.startswith(b'334')


def imap_login(s, up, greeting: bytes) -> bytes:
    """``AUTHENTICATE`` under the client's tag instead of ``LOGIN``; returns the backend's
    first line after the exchange, which imap.login_upstream relays with the rest."""
    tag, name = s.tag, METHODS[s.auth_method]
    response = initial_response(s)
    action = 'sending AUTHENTICATE command to upstream'
    if _SASL_IR.search(greeting):
        up.send(s, b'%sAUTHENTICATE %s %s\r\n' % (tag, name, response), action)
    else:
        up.send(s, b'%sAUTHENTICATE %s\r\n' % (tag, name), action)
        ready = up.read_reply(s)
        up.check(s, ready, _imap_continue(ready))
        up.send(s, response + b'\r\n', 'sending token to upstream')
    return _answer(s, up, _imap_continue)


def pop3_login(s, up) -> None:
    """``AUTH`` instead of ``USER``/``PASS``; the backend's ``+OK`` is relayed."""
    name = METHODS[s.auth_method]
    response = initial_response(s)
    command = b'AUTH %s %s\r\n' % (name, response)
    if len(command) <= POP3_AUTH_LINE:
        up.send(s, command, 'sending AUTH command to upstream')
    else:
        up.send(s, b'AUTH %s\r\n' % name, 'sending AUTH command to upstream')
        ready = up.read_reply(s)
        up.check(s, ready, _pop3_continue(ready))
        up.send(s, response + b'\r\n', 'sending token to upstream')
    answer = _answer(s, up, _pop3_continue)
    up.check(s, answer, answer.startswith(b'+OK'))
    s.send(answer)


def smtp_auth(s, up) -> None:
    """``AUTH`` with the initial response instead of ``AUTH PLAIN``; 235 expected (the
    client then gets ``235 2.0.0 OK`` from smtp.login_upstream)."""
    command = b'AUTH %s %s\r\n' % (METHODS[s.auth_method], initial_response(s))
    up.send(s, command, 'sending AUTH to upstream')
    answer = _answer(s, up, _smtp_continue, multiline=True)
    up.check(s, answer, answer.startswith(b'235'))
