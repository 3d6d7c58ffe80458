"""The byte pump (proxy.md section 5): both directions at once, one shared idle deadline.

Each direction is a greenlet copying through a reused buffer; traffic either way pushes
the deadline back (nginx only counts the client side; the docs promise either side).
When one side closes, everything it sent has been delivered, so the session ends.
"""
import gevent
from gevent import get_hub

from . import log

_now = None


def pump(s, up) -> None:
    global _now
    if _now is None:
        _now = get_hub().loop.now
    client, backend = s.sock, up.sock
    s.upstream_sock = backend
    activity = [_now()]
    counts = [0, 0]
    s.action = 'proxying'
    first_up = s.stream.take_buffered()
    first_down = up.stream.take_buffered()
    to_backend = gevent.spawn(_copy, client, backend, s.proto.client_buffer(s.conf), first_up,
                              counts, 0, activity)
    to_client = gevent.spawn(_copy, backend, client, s.conf.proxy_buffer, first_down,
                             counts, 1, activity)
    timeout = s.conf.proxy_timeout
    try:
        while True:
            remaining = activity[0] + timeout - _now()
            if remaining <= 0:
                s.info('client timed out (110: Connection timed out)')
                break
            if gevent.wait((to_backend, to_client), timeout=remaining, count=1):
                break
    finally:
        gevent.killall((to_backend, to_client))
        backend.close()
    s.action = None
    log.session_line(s, log.INFO, 'proxied session done',
                     tail=', bytes from client: %d, bytes to client: %d' % tuple(counts))


def _copy(src, dst, size, first, counts, index, activity):
    try:
        if first:
            dst.sendall(first)
            counts[index] += len(first)
        buf = bytearray(size)
        view = memoryview(buf)
        recv_into, sendall = src.recv_into, dst.sendall
        while True:
            n = recv_into(buf)
            if not n:
                return
            sendall(view[:n])
            counts[index] += n
            activity[0] = _now()
    except OSError:
        return
