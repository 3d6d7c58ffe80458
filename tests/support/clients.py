"""Steps of real mail clients (imaplib, poplib, curl) shared by the e2e tests.

Each step checks what it gets; the users are the e2e ones (alice/secret, bob/hunter2).
"""
from __future__ import annotations

import base64
import imaplib
import poplib
import subprocess

import pytest


def imap_login(port: int, user: str, password: str, timeout: float = 10.0) -> imaplib.IMAP4:
    """An imaplib client logged in as ``user`` (the caller logs out)."""
    imap = imaplib.IMAP4('127.0.0.1', port, timeout=timeout)
    imap.login(user, password)
    return imap


def imap_capabilities(port: int) -> tuple:
    """The capabilities a new IMAP connection is greeted with."""
    with imaplib.IMAP4('127.0.0.1', port, timeout=5) as imap:
        return imap.capabilities


def imap_authenticate_plain_bob(port: int) -> None:
    """bob logs in with AUTHENTICATE PLAIN and reads the subject 'hello bob' of his one
    message."""
    with imaplib.IMAP4('127.0.0.1', port, timeout=10) as imap:
        typ, _ = imap.authenticate('PLAIN', lambda _: b'\0bob\0hunter2')
        assert typ == 'OK'
        assert imap.select('INBOX') == ('OK', [b'1'])
        typ, data = imap.fetch('1', '(BODY[HEADER.FIELDS (SUBJECT)])')
        assert data[0][1] == b'Subject: hello bob\r\n\r\n'


def imap_wrong_password_refused(port: int) -> None:
    """alice's wrong password gets the NO; the proxy closes the connection after it."""
    imap = imaplib.IMAP4('127.0.0.1', port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match='Invalid login or password'):
        imap.login('alice', 'wrong')
    imap.shutdown()


def curl_imap_list_fetch(port: int) -> bytes:
    """curl lists alice's mailboxes, then fetches UID 1 (subject 'for curl'); returns
    what the fetch printed."""
    url = 'imap://127.0.0.1:%d/' % port
    out = subprocess.run(['curl', '-sS', '--max-time', '10', '-u', 'alice:secret', url],
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert b'INBOX' in out.stdout
    out = subprocess.run(['curl', '-sS', '--max-time', '10', '-u', 'alice:secret',
                          url + 'INBOX;UID=1'], capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert b'Subject: for curl' in out.stdout
    return out.stdout


def pop3(port: int) -> poplib.POP3:
    return poplib.POP3('127.0.0.1', port, timeout=30)


def pop3_auth_plain_bob(port: int) -> None:
    """bob logs in with AUTH PLAIN and finds an empty maildrop."""
    p = pop3(port)
    try:
        token = base64.b64encode(b'\0bob\0hunter2').decode()
        assert p._shortcmd('AUTH PLAIN ' + token).startswith(b'+OK')
        assert p.stat() == (0, 0)
    finally:
        p.quit()


def pop3_wrong_password_refused(port: int) -> poplib.POP3:
    """alice's wrong password gets the -ERR; returns the (still open) client."""
    p = pop3(port)
    p.user('alice')
    with pytest.raises(poplib.error_proto, match='-ERR Invalid login or password'):
        p.pass_('wrong')
    return p
