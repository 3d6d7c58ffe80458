"""The tokenizer against nginx's ngx_conf_read_token rules (config.md section 1)."""
import pytest

from gmailproxy.config.lexer import COMMAND_LINE, tokenize
from gmailproxy.errors import ConfigError

F = '/etc/gmailproxy/mail.conf'


def lex(text: str | bytes, file: str = F) -> list[tuple]:
    data = text.encode() if isinstance(text, str) else text
    tokens = list(tokenize(data, file))
    assert tokens[-1][0] is None
    return tokens[:-1]


def lex_error(text: str | bytes, file: str = F) -> str:
    with pytest.raises(ConfigError) as info:
        lex(text, file)
    return str(info.value)


def words(text: str) -> list[str]:
    return [tok for tok, _, _ in lex(text)]


def test_directives_and_blocks():
    assert lex('a b;\nc {\n  d;\n}\n') == [
        ('a', 1, False), ('b', 1, False), (';', 1, False),
        ('c', 2, False), ('{', 2, False), ('d', 3, False), (';', 3, False), ('}', 4, False)]


def test_whitespace_is_space_tab_cr_lf():
    assert words('a\tb\r\n  c ;') == ['a', 'b', 'c', ';']


def test_quotes_are_removed_and_protect_specials():
    assert lex('a "b c;{}#" \'d e\' "";') == [
        ('a', 1, False), ('b c;{}#', 1, True), ('d e', 1, True), ('', 1, True),
        (';', 1, False)]


def test_quote_inside_a_word_is_ordinary():
    assert words('a b"c"d;') == ['a', 'b"c"d', ';']


@pytest.mark.parametrize('text, token', [
    (r'a "x\"y";', 'x"y'),
    (r"a 'x\'y';", "x'y"),
    (r'a x\\y;', 'x\\y'),
    (r'a "\t\r\n";', '\t\r\n'),
    (r'a x\ y;', 'x\\ y'),          # other pairs keep their backslash
    (r'a x\;y;', 'x\\;y'),          # but the ; does not end the word
    (r'a x\{y;', 'x\\{y'),
    (r'a "\q";', '\\q'),
    (r'a \"x;', '"x'),
])
def test_backslash_rules(text, token):
    assert words(text)[1] == token


def test_comments_only_where_a_token_can_start():
    assert words('# whole line\na b#c "#d" # e\n;') == ['a', 'b#c', '#d', ';']


def test_comment_after_semicolon():
    assert words('a;# note\nb;') == ['a', ';', 'b', ';']


def test_dollar_brace_does_not_open_a_block():
    assert words('a ${x}y {') == ['a', '${x}y', '{']


def test_parenthesis_after_closing_quote_starts_a_word():
    assert words('a "b")c;') == ['a', 'b', ')c', ';']


def test_line_is_where_the_token_ends():
    tokens = lex('a\n"b\nc"\n\n;')
    assert tokens == [('a', 1, False), ('b\nc', 3, True), (';', 5, False)]


@pytest.mark.parametrize('text, message', [
    ('a "b"c;', 'unexpected "c" in %s:1' % F),
    ('a "b"}', 'unexpected "}" in %s:1' % F),
    ('a "b"#', 'unexpected "#" in %s:1' % F),
    ('\n;', 'unexpected ";" in %s:2' % F),
    ('{', 'unexpected "{" in %s:1' % F),
    ('a\n}', 'unexpected "}" in %s:2' % F),
    ('a b', 'unexpected end of file, expecting ";" or "}" in %s:1' % F),
    ('a "b\n\n', 'unexpected end of file, expecting ";" or "}" in %s:3' % F),
    ('a b\\', 'unexpected end of file, expecting ";" or "}" in %s:1' % F),
    ('a "b"', 'unexpected end of file, expecting ";" or "}" in %s:1' % F),
])
def test_structural_errors(text, message):
    assert lex_error(text) == message


def test_command_line_errors():
    assert lex_error('a b', COMMAND_LINE) == \
        'unexpected end of parameter, expecting ";" in command line'
    assert lex_error(';', COMMAND_LINE) == 'unexpected ";" in command line'


# The 4096-byte buffer: everything from a token's start to the next character read
# must fit in it while the file goes on.

def test_token_of_4095_bytes_is_accepted():
    assert len(words('a ' + 'x' * 4095 + ';\nb;')[1]) == 4095


def test_token_of_4096_bytes_is_too_long():
    assert lex_error('a ' + 'x' * 4096 + ';\nb;') == \
        'too long parameter "xxxxxxxxxx..." started in %s:1' % F


def test_token_of_4095_bytes_then_space_is_too_long():
    # nginx reads the character after the space before moving the token start
    assert lex_error('a ' + 'y' * 4095 + ' ;') == \
        'too long parameter "yyyyyyyyyy..." started in %s:1' % F


def test_quoted_token_limits():
    assert len(words('a "' + 'q' * 4094 + '";')[1]) == 4094
    assert lex_error('a "' + 'q' * 4095 + '";') == \
        'too long parameter "qqqqqqqqqq..." started in %s:1' % F
    assert lex_error('\na "' + 'q' * 4096 + '";') == \
        'too long parameter, probably missing terminating """ character in %s:2' % F
    assert lex_error("a '" + 'q' * 5000) == \
        'too long parameter, probably missing terminating "\'" character in %s:1' % F


def test_long_token_at_end_of_file_is_an_end_of_file_error():
    assert lex_error('a ' + 'z' * 4096) == \
        'unexpected end of file, expecting ";" or "}" in %s:1' % F


def test_long_comment_lines():
    assert words('#' + 'c' * 4094 + '\na;') == ['a', ';']
    assert lex_error('\n#' + 'c' * 4095 + '\na;') == \
        'too long parameter "#ccccccccc..." started in %s:2' % F


def test_multibyte_tokens_are_bytes_limited():
    token = words('a "é";')[1]
    assert token == 'é'
    assert lex_error('a ' + 'é' * 2048 + ';\n') == \
        'too long parameter "ééééé..." started in %s:1' % F


def test_command_line_has_no_length_limit():
    tokens = list(tokenize(b'a ' + b'x' * 5000 + b';', COMMAND_LINE))
    assert len(tokens[1][0]) == 5000
