"""A scripted IMAP/POP3/SMTP backend (gevent) that records every line it receives."""
from gevent.server import StreamServer


class LineServer:
    """A gevent server on a free 127.0.0.1 ``port``: it greets each client with
    ``greeting()``, then sends ``answer(sock, f, line)`` for every line it reads (kept in
    ``lines``); an answer of None ends the connection."""

    line_limit = 65536      # the longest line read at once (-1: no limit)

    def __init__(self):
        self.lines: list[bytes] = []
        self.connections = 0
        self.server = StreamServer(('127.0.0.1', 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def greeting(self) -> bytes:
        raise NotImplementedError

    def answer(self, sock, f, line: bytes) -> bytes | None:
        raise NotImplementedError

    def read(self, f) -> bytes | None:
        """The next line (recorded), or None at EOF."""
        line = f.readline(self.line_limit)
        if not line:
            return None
        self.lines.append(line)
        return line

    def _handle(self, sock, addr):
        self.connections += 1
        f = sock.makefile('rb')
        try:
            sock.sendall(self.greeting())
            while True:
                line = self.read(f)
                if line is None:
                    return
                answer = self.answer(sock, f, line)
                if answer is None:
                    return
                sock.sendall(answer)
        except OSError:
            return
        finally:
            sock.close()


class FakeBackend(LineServer):
    """A scripted backend: ``lines`` records every line received (all connections).

    The default scripts accept any login; ``replies`` maps an upper-cased command word (or
    ``'greeting'``) to the reply bytes to use instead (``{tag}`` is replaced by the tag).
    """

    line_limit = -1

    def __init__(self, proto: str, replies: dict | None = None):
        self.proto = proto
        self.replies = dict(replies or {})
        self.received = b''
        super().__init__()

    def _reply(self, key: str, default: bytes, tag: bytes = b'') -> bytes:
        return self.replies.get(key, default).replace(b'{tag}', tag)

    def greeting(self) -> bytes:
        return self._reply('greeting', {'imap': b'* OK backend ready\r\n',
                                        'pop3': b'+OK backend ready\r\n',
                                        'smtp': b'220 backend ESMTP\r\n'}[self.proto])

    def answer(self, sock, f, line: bytes) -> bytes | None:
        return getattr(self, '_' + self.proto)(sock, f, line)

    def read(self, f) -> bytes | None:
        line = super().read(f)
        if line is not None:
            self.received += line
        return line

    def _imap(self, sock, f, line):
        tag, _, rest = line.partition(b' ')
        word = rest.split(b' ', 1)[0].strip().upper().decode()
        if word == 'LOGIN' and line.endswith(b'}\r\n'):
            for _ in range(2):            # "+" for the login literal, then the password's
                sock.sendall(self._reply('LOGIN+', b'+ OK\r\n'))
                if self.read(f) is None:
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
                data = self.read(f)
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
