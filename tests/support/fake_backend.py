"""A scripted IMAP/POP3/SMTP backend (gevent) that records every line it receives."""
import re

from gevent.server import StreamServer


class FakeBackend:
    """A scripted backend: ``lines`` records every line received (all connections).

    The default scripts accept any login; ``replies`` maps an upper-cased command word (or
    ``'greeting'``) to the reply bytes to use instead (``{tag}`` is replaced by the tag).
    """

    def __init__(self, proto: str, replies: dict | None = None):
        self.proto = proto
        self.replies = dict(replies or {})
        self.lines: list[bytes] = []
        self.received = b''
        self.connections = 0
        self.server = StreamServer(('127.0.0.1', 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def _reply(self, key: str, default: bytes, tag: bytes = b'') -> bytes:
        return self.replies.get(key, default).replace(b'{tag}', tag)

    def _handle(self, sock, addr):
        self.connections += 1
        f = sock.makefile('rb')
        greeting = {'imap': b'* OK backend ready\r\n', 'pop3': b'+OK backend ready\r\n',
                    'smtp': b'220 backend ESMTP\r\n'}[self.proto]
        try:
            sock.sendall(self._reply('greeting', greeting))
            while True:
                line = self._read(f)
                if line is None:
                    return
                answer = getattr(self, '_' + self.proto)(sock, f, line)
                if answer is None:
                    return
                sock.sendall(answer)
        except OSError:
            return
        finally:
            sock.close()

    def _read(self, f):
        line = f.readline()
        if not line:
            return None
        self.lines.append(line)
        self.received += line
        return line

    def _imap(self, sock, f, line):
        tag, _, rest = line.partition(b' ')
        word = rest.split(b' ', 1)[0].strip().upper().decode()
        if word == 'LOGIN' and line.endswith(b'}\r\n'):
            for _ in range(2):            # "+" for the login literal, then the password's
                sock.sendall(self._reply('LOGIN+', b'+ OK\r\n'))
                if self._read(f) is None:
                    return None
            return self._reply('LOGIN', b'{tag} OK logged in\r\n', tag)
        if word == 'LOGOUT':
            sock.sendall(self._reply('LOGOUT', b'* BYE bye\r\n{tag} OK logged out\r\n', tag))
            return None
        return self._reply(word, b'{tag} OK done\r\n', tag)

    def _pop3(self, sock, f, line):
        word = line.split(b' ', 1)[0].strip().upper().decode()
        if word == 'QUIT':
            sock.sendall(self._reply('QUIT', b'+OK bye\r\n'))
            return None
        return self._reply(word, b'+OK\r\n')

    def _smtp(self, sock, f, line):
        word = line.split(b' ', 1)[0].strip().upper().decode()
        if word == 'DATA':
            sock.sendall(self._reply('DATA', b'354 go ahead\r\n'))
            while True:
                data = self._read(f)
                if data is None:
                    return None
                if data == b'.\r\n':
                    return self._reply('.', b'250 2.0.0 queued\r\n')
        if word == 'QUIT':
            sock.sendall(self._reply('QUIT', b'221 2.0.0 bye\r\n'))
            return None
        defaults = {'EHLO': b'250-backend\r\n250 8BITMIME\r\n', 'HELO': b'250 backend\r\n',
                    'XCLIENT': b'220 backend ESMTP\r\n', 'AUTH': b'235 2.0.0 OK\r\n',
                    'MAIL': b'250 2.1.0 Ok\r\n', 'RCPT': b'250 2.1.5 Ok\r\n'}
        return self._reply(word, defaults.get(word, b'250 2.0.0 Ok\r\n'))
