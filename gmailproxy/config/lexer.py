"""nginx's configuration tokenizer (ngx_conf_file.c, ngx_conf_read_token).

``tokenize`` yields ``(token, line, quoted)``; the unquoted ``;``, ``{`` and ``}`` are
structure, and a final ``(None, line, False)`` marks the end of the text. Arguments are
never bare ``;``/``{``/``}`` (those only come quoted), so the flag tells them apart.

crossplane (nginx's own Python parser) is not used: it keeps escapes untranslated
(``"a\\tb"`` stays 4 characters), accepts ``"a"b`` and a directive cut by the end of the
file, and has no 4096-byte token limit, so neither its tokens nor its messages match nginx.

nginx reads files through a 4096-byte buffer that must hold everything from the start of
the current token to the next character it reads; ``_check_span`` applies that rule, which
also limits comment lines.
"""
import re

from ..errors import ConfigError

COMMAND_LINE = 'command line'   # the file name of ``-g`` directives
BUFFER = 4096                   # NGX_CONF_BUFFER

_SPACE = re.compile(rb'[ \t\r\n]+')
# Unquoted: a backslash hides the next character; "${" does not open a block.
_WORD = re.compile(rb'(?:\\[\s\S]|\$\{*|[^ \t\r\n;{\\$])+')
_QUOTED = {ord('"'): re.compile(rb'(?:[^"\\]|\\[\s\S])*"'),
           ord("'"): re.compile(rb"(?:[^'\\]|\\[\s\S])*'")}
_ESCAPE = re.compile(rb'\\(["\'\\tnr])')
_ESCAPED = {b'"': b'"', b"'": b"'", b'\\': b'\\', b't': b'\t', b'n': b'\n', b'r': b'\r'}
_SPACES = b' \t\r\n'
_SEMI, _OPEN, _CLOSE, _HASH = b';{}#'


def error(msg: str, file: str | None, line: int | None) -> ConfigError:
    """A ConfigError positioned as nginx does: ``in file:line``, ``in command line``,
    or nothing when ``file`` is None."""
    if file == COMMAND_LINE:
        return ConfigError('%s in %s' % (msg, COMMAND_LINE))
    return ConfigError(msg, file, line)


def _text(raw: bytes) -> str:
    if b'\\' in raw:
        raw = _ESCAPE.sub(lambda m: _ESCAPED[m.group(1)], raw)
    return raw.decode('utf-8', 'surrogateescape')


def tokenize(data: bytes, file: str):
    """Yield ``(token, line, quoted)`` for ``data`` read from ``file`` (or COMMAND_LINE).

    ``line`` is the line on which the token ended; a directive's position is the line
    of its ``;`` or ``{``. Raises ConfigError for the lexical errors of nginx.
    """
    param = file == COMMAND_LINE
    n = len(data)
    pos, line, nargs = 0, 1, 0

    def eof():
        if param:
            return error('unexpected end of parameter, expecting ";"', file, line)
        return error('unexpected end of file, expecting ";" or "}"', file, line)

    def check_span(start, reset, start_line, closing=None):
        """nginx fails when a token, from ``start``, must be read past the buffer while
        the file goes on; ``reset`` is the index whose reading moves ``start``."""
        if param or reset < start + BUFFER or n <= start + BUFFER:
            return
        if closing is not None and closing >= start + BUFFER:
            raise error('too long parameter, probably missing terminating "%s" character'
                        % chr(data[start - 1]), file, start_line)
        raise error('too long parameter "%s..." started' % data[start:start + 10].decode(
            'utf-8', 'surrogateescape'), file, start_line)

    while True:
        m = _SPACE.match(data, pos)
        if m:
            line += data.count(b'\n', pos, m.end())
            pos = m.end()
        if pos >= n:
            if nargs:
                raise eof()
            yield None, line, False
            return
        c = data[pos]
        if c == _SEMI or c == _OPEN:
            if not nargs:
                raise error('unexpected "%s"' % chr(c), file, line)
            nargs = 0
            pos += 1
            yield chr(c), line, False
        elif c == _CLOSE:
            if nargs:
                raise error('unexpected "}"', file, line)
            pos += 1
            yield '}', line, False
        elif c == _HASH:
            end = data.find(b'\n', pos)
            end = n if end < 0 else end
            check_span(pos, end, line)
            pos = end
        elif c in _QUOTED:
            start, start_line = pos + 1, line
            m = _QUOTED[c].match(data, start)
            if m is None:
                check_span(start, n, start_line, closing=n)
                line += data.count(b'\n', start)
                raise eof()
            close = m.end() - 1
            after = data[close + 1] if close + 1 < n else None
            spaced = after is not None and after in _SPACES
            check_span(start, close + 2 if spaced else close + 1, start_line, closing=close)
            line += data.count(b'\n', start, close)
            nargs += 1
            yield _text(data[start:close]), line, True
            if after is None:
                raise eof()
            if after not in _SPACES and after not in b';{)':
                raise error('unexpected "%s"' % chr(after), file, line)
            pos = close + 1
        else:
            m = _WORD.match(data, pos)
            end = m.end() if m else pos
            if end >= n or data[end] == 0x5c:   # cut by the end, maybe inside "\x"
                check_span(pos, n, line)
                line += data.count(b'\n', pos)
                raise eof()
            check_span(pos, end + 1 if data[end] in _SPACES else end, line)
            line += data.count(b'\n', pos, end)
            nargs += 1
            yield _text(data[pos:end]), line, False
            pos = end
