"""gmailproxy.log: nginx's error-log line, targets, levels, reopen, syslog, ``*N``."""
import logging
import os
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from gevent import monkey

from gmailproxy import log

close = monkey.get_original('os', 'close')   # gevent's close waits for the loop to run

LINE = r'^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[%s\] %d#%d: %s$'


def record(level, msg, *args, created=None):
    rec = logging.LogRecord('gmailproxy.test', level, __file__, 1, msg, args, None)
    rec.levelname = logging.getLevelName(level)
    if created is not None:
        rec.created = created
    return rec


def expect_line(text, level, msg):
    pid = os.getpid()
    assert re.match(LINE % (level, pid, threading.get_native_id(), re.escape(msg)),
                    text), text


@pytest.fixture(autouse=True)
def fresh_loggers():
    yield
    log.prune(())


def test_line_format_and_levels():
    f = log.NginxFormatter()
    for name, level in log.LEVELS.items():
        expect_line(f.format(record(level, '*%d client %s', 7, 'x')), name, '*7 client x')
    assert log.LEVELS['notice'] < log.LEVELS['warn'] < log.LEVELS['alert'] < \
        log.LEVELS['emerg']
    stamp = time.mktime((2026, 5, 1, 12, 0, 0, 0, 0, -1))
    assert f.format(record(log.INFO, 'm', created=stamp)).startswith(
        '2026/05/01 12:00:00 [info] ')


def test_every_target_gets_its_level_and_above(tmp_path):
    a, b = str(tmp_path / 'a.log'), str(tmp_path / 'b.log')
    logger = log.get_logger([(a, 'info'), (b, 'error')])
    assert log.get_logger([(a, 'info'), (b, 'error')]) is logger
    logger.debug('not at all')
    logger.info('to a')
    logger.log(log.NOTICE, 'to a too')
    logger.error('to both')
    log.flush()
    a_text, b_text = open(a).read(), open(b).read()
    assert [l.split(': ', 1)[1] for l in a_text.splitlines()] == ['to a', 'to a too',
                                                                  'to both']
    assert [l.split(': ', 1)[1] for l in b_text.splitlines()] == ['to both']
    expect_line(a_text.splitlines()[1], 'notice', 'to a too')


def test_reopen_after_move(tmp_path):
    path = tmp_path / 'error.log'
    logger = log.get_logger([(str(path), 'info')])
    logger.info('one')
    path.rename(tmp_path / 'error.log.1')
    logger.info('two')                  # still the moved file
    log.reopen()
    logger.info('three')
    log.flush()
    assert [l.split(': ', 1)[1] for l in (tmp_path / 'error.log.1').read_text()
            .splitlines()] == ['one', 'two']
    assert path.read_text().endswith(': three\n')


def test_unopenable_file_raises_and_opens_nothing(tmp_path):
    ok = tmp_path / 'ok.log'
    with pytest.raises(OSError) as info:
        log.get_logger([(str(ok), 'info'), (str(tmp_path / 'no' / 'x.log'), 'info')])
    assert info.value.filename == str(tmp_path / 'no' / 'x.log')


def test_prune_closes_unused(tmp_path):
    kept = log.get_logger([(str(tmp_path / 'kept.log'), 'info')])
    dropped = log.get_logger([(str(tmp_path / 'dropped.log'), 'info')])
    handler = dropped.handlers[0]
    log.prune([kept])
    assert handler.stream is None
    assert kept.handlers[0].stream is not None
    assert log.get_logger([(str(tmp_path / 'dropped.log'), 'info')]) is not dropped


def test_main_logger_feeds_module_loggers(tmp_path):
    path = tmp_path / 'main.log'
    log.setup_main([(str(path), 'notice')])
    logging.getLogger('gmailproxy.something').log(log.NOTICE, 'from a module')
    logging.getLogger('gmailproxy.something').info('too low')
    log.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    expect_line(lines[0], 'notice', 'from a module')


# syslog


@pytest.mark.parametrize('params, expected', [
    ('server=127.0.0.1', (('127.0.0.1', 514), 23, None, 'gmailproxy', False)),
    ('server=127.0.0.1:1514,facility=mail,tag=mp_1,severity=warn,nohostname',
     (('127.0.0.1', 1514), 2, 4, 'mp_1', True)),
    ('server=[::1]:99', (('::1', 99), 23, None, 'gmailproxy', False)),
    ('server=[::1]', (('::1', 514), 23, None, 'gmailproxy', False)),
    ('server=unix:/dev/log', ('/dev/log', 23, None, 'gmailproxy', False)),
    ('server=localhost,facility=local0', (('localhost', 514), 16, None, 'gmailproxy',
                                          False)),
])
def test_parse_syslog(params, expected):
    assert tuple(log.parse_syslog(params)) == expected


@pytest.mark.parametrize('params, message', [
    ('facility=mail', 'no syslog server specified'),
    ('server=127.0.0.1,facility=nope', 'unknown syslog facility "nope"'),
    ('server=127.0.0.1,severity=loud', 'unknown syslog severity "loud"'),
    ('server=127.0.0.1,tag=', 'syslog "tag" cannot be empty'),
    ('server=127.0.0.1,tag=' + 'x' * 33, 'syslog tag length exceeds 32'),
    ('server=127.0.0.1,tag=a-b', 'syslog "tag" only allows alphanumeric characters and '
                                 'underscore'),
    ('server=127.0.0.1,colour=red', 'unknown syslog parameter "colour=red"'),
    ('server=127.0.0.1:99999', 'invalid port in "127.0.0.1:99999"'),
])
def test_parse_syslog_errors(params, message):
    with pytest.raises(ValueError) as info:
        log.parse_syslog(params)
    assert str(info.value) == message


def test_syslog_udp_datagrams():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(('127.0.0.1', 0))
    receiver.settimeout(5)
    target = 'syslog:server=127.0.0.1:%d,facility=mail' % receiver.getsockname()[1]
    logger = log.get_logger([(target, 'info')])
    logger.error('*3 upstream failed')
    logger.info('plain info')
    logger.debug('not sent')
    first, second = receiver.recv(4096), receiver.recv(4096)
    receiver.close()
    host = socket.gethostname().lower().encode()
    # PRI = facility * 8 + severity: mail (2) * 8 + error (3) = 19, + info (6) = 22
    assert re.match(rb'^<19>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d %s gmailproxy: '
                    rb'\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[error\] %d#\d+: \*3 upstream failed$'
                    % (re.escape(host), os.getpid()), first), first
    assert second.startswith(b'<22>') and second.endswith(b'[info] %d#%d: plain info'
                                                          % (os.getpid(),
                                                             threading.get_native_id()))


def test_syslog_unix_socket_without_hostname(tmp_path):
    path = str(tmp_path / 'log.sock')
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    logger = log.get_logger([('syslog:server=unix:%s,nohostname,tag=gp' % path, 'warn')])
    logger.warning('careful')
    data = receiver.recv(4096)
    receiver.close()
    assert re.match(rb'^<188>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d gp: \d{4}/.* \[warn\] '
                    rb'\d+#\d+: careful$', data), data


def test_syslog_unreachable_is_dropped(tmp_path):
    logger = log.get_logger([('syslog:server=unix:%s' % (tmp_path / 'none'), 'info')])
    logger.info('nobody listens')       # no exception, nothing printed


# sessions


def session(**kw):
    values = dict(conn_id=12, action='in auth state', client_ip='192.0.2.7',
                  starttls_used=True, listen=SimpleNamespace(addr_text='0.0.0.0:143'),
                  login=None, upstream_name=None, logger=None)
    values.update(kw)
    return SimpleNamespace(**values)


def test_session_suffix_as_nginx():
    assert log.session_suffix(session()) == \
        ' while in auth state, client: 192.0.2.7 using starttls, server: 0.0.0.0:143'
    s = session(action=None, starttls_used=False, login=b'caf\xc3\xa9',
                upstream_name='127.0.0.1:8144')
    assert log.session_suffix(s) == \
        ', client: 192.0.2.7, server: 0.0.0.0:143, login: "caf\xe9", upstream: 127.0.0.1:8144'


def test_session_line(tmp_path):
    path = tmp_path / 's.log'
    s = session(logger=log.get_logger([(str(path), 'info')]))
    log.session_line(s, log.INFO, 'client timed out (110: Connection timed out)')
    log.session_line(s, log.DEBUG, 'hidden')
    log.flush()
    expect_line(path.read_text().rstrip('\n'), 'info',
                '*12 client timed out (110: Connection timed out) while in auth state, '
                'client: 192.0.2.7 using starttls, server: 0.0.0.0:143')


def test_printable():
    assert log.printable(b'a1 LOGIN\r\n\x00\xff') == 'a1 LOGIN\\x0d\\x0a\\x00\\xff'
    assert log.printable(b'x' * 300, 10) == 'x' * 10


def test_connection_numbers_are_shared_by_forked_workers():
    counter = log.ConnectionCounter()
    assert next(counter) == 1
    read, write = os.pipe()
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                close(read)
                numbers = [next(counter) for _ in range(200)]
                os.write(write, ('%s\n' % ' '.join(map(str, numbers))).encode())
            finally:
                os._exit(0)
        pids.append(pid)
    close(write)
    with os.fdopen(read, 'rb') as f:
        data = f.read()
    numbers = [int(n) for n in data.split()]
    assert sorted(numbers) == list(range(2, 602))
    assert next(counter) == 602
