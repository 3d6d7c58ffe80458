"""The byte pump (proxy.md section 5): both directions at once, one shared idle deadline.

No greenlet per direction: hub io watchers of the two descriptors call the directions'
steps, which move bytes with non-blocking calls only, while the session's greenlet waits
for the outcome:

* small messages (commands, replies): ``os.readv`` into a scratch buffer shared by all
  sessions and ``os.write`` at once; only bytes the destination cannot take yet are
  copied out. A TLS client uses ``SSLObject.read``/``write`` the same way.
* bulk between plain sockets (a read filled a whole chunk): ``os.splice`` through a
  pipe, so no Python object is made per chunk. Pipes come from a pool and are borrowed
  only while bytes are in flight: an idle session holds its two sockets, nothing else.

A read asks for at least 64 KiB (``proxy_buffer``/``*_client_buffer`` when larger): nginx's
buffer is its memory unit, not a property of the wire, and the bytes relayed are the same.
Traffic either way pushes the idle deadline back (nginx only counts the client side; the
docs promise either side). When one side closes, everything it sent has been delivered
(a read happens only once the previous chunk is out), so the session ends, as nginx's.
"""
import fcntl
import os
import ssl

from gevent import get_hub, getcurrent
from gevent.socket import socket as GeventSocket     # not its TLS subclass

from . import log

CHUNK = 65536                 # bytes per read at least
PIPE_SIZE = 262144            # pipe capacity = bytes per splice: fewer calls in bulk
BURST = 16                    # chunks one direction moves before letting others run
POOL_MAX = 64                 # idle pipes kept per process
SMALL = 4096                  # a splice read below this ends bulk mode
TLS_RECORD = 16384            # the most data one TLS record carries
_READ, _WRITE = 1, 2          # libev EV_READ, EV_WRITE
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

_pipes: list[tuple[int, int]] = []
_buffers: dict[int, bytearray] = {}     # size -> the scratch buffer of that size


def pump(s, up) -> tuple[int, int]:
    """Relay until a side closes, fails or ``proxy_timeout`` passes idle; returns the
    bytes relayed (from the client, to the client)."""
    client, backend = s.sock, up.sock
    s.upstream_sock = backend
    s.action = 'proxying'
    first_up = s.stream.take_buffered()
    first_down = up.stream.take_buffered()
    to_backend = _Direction(client, backend, s.proto.client_buffer(s.conf), first_up)
    to_client = _Direction(backend, client, s.conf.proxy_buffer, first_down)
    try:
        timed_out = _run(to_backend, to_client, s.conf.proxy_timeout)
    finally:
        to_backend.release()
        to_client.release()
        backend.close()
        if s.track is not None:
            s.track.bytes = (to_backend.count, to_client.count)
    if timed_out:
        s.info('client timed out (110: Connection timed out)')
    s.action = None
    counts = to_backend.count, to_client.count
    if s.logger.isEnabledFor(log.INFO):
        log.session_line(s, log.INFO, 'proxied session done',
                         tail=', bytes from client: %d, bytes to client: %d' % counts)
    return counts


def _run(a: '_Direction', b: '_Direction', timeout: float) -> bool:
    """Move bytes until a side closes or fails (False) or ``timeout`` passes idle (True).

    Every call in a step is non-blocking, so the watcher callbacks run the steps in the
    hub itself (a message costs no greenlet switch) and switch to this greenlet only
    with the outcome; until then it sleeps in ``hub.switch()`` below."""
    hub = get_hub()
    loop = hub.loop
    session = getcurrent()
    timer = loop.timer(timeout)

    def idle_check():
        nonlocal timer
        idle = loop.now() - (a.last if a.last > b.last else b.last)
        if idle >= timeout:
            session.switch(True)
            return
        timer.close()
        timer = loop.timer(timeout - idle)
        timer.start(idle_check)

    a.arm(loop, session)
    b.arm(loop, session)
    timer.start(idle_check)
    try:
        if a.step() or b.step():
            return False
        return hub.switch()
    finally:
        timer.close()
        a.disarm()
        b.disarm()


class _Direction:
    """One way through the pump: what waits to be written, and what to wait for."""
    __slots__ = ('src', 'dst', 'src_fd', 'dst_fd', 'src_tls', 'dst_tls', 'size',
                 'splice_size', 'asked', 'pipe', 'in_pipe', 'bulk', 'data', 'count', 'last',
                 'loop', 'session', 'ready', 'watcher', 'readable', 'writable', 'later')

    def __init__(self, src, dst, size: int, first: bytes):
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.src_tls = _tls_of(src)
        self.dst_tls = _tls_of(dst)
        self.size = max(size, CHUNK)
        self.splice_size = max(size, PIPE_SIZE)
        self.asked = 0
        self.pipe = None            # (read end, write end) while bytes are in it
        self.in_pipe = 0
        self.bulk = False           # splicing (plain to plain, reads filling chunks)
        self.data = memoryview(first) if first else None    # bytes still to write
        self.count = 0
        self.last = 0.0
        # The gevent sockets' own watchers: making new ones costs a syscall each.
        self.readable = src._read_event
        self.writable = dst._write_event
        self.watcher = self.later = self.ready = self.session = None

    # -- waiting -------------------------------------------------------------------------

    def arm(self, loop, session) -> None:
        self.loop, self.session = loop, session
        self.ready = self._ready        # made once: watchers and callbacks call it
        self.last = loop.now()

    def _ready(self) -> None:
        """A watcher's or callback's call, in the hub: step, and hand an ending (or a
        bug's exception, to be logged there) to the session's greenlet."""
        try:
            over = self.step()
        except BaseException as exc:
            self.session.throw(type(exc), exc, exc.__traceback__)
            return
        if over:
            self.session.switch(False)

    def _wait(self, fd: int, events: int) -> None:
        """Be woken when ``fd`` has ``events``; the usual two waits use the sockets' own
        watchers, kept started while a session only reads, so a message costs no
        watcher work."""
        if fd == self.src_fd and events == _READ:
            watcher = self.readable
        elif fd == self.dst_fd and events == _WRITE:
            watcher = self.writable
        else:                       # TLS needing the other event (renegotiation, KeyUpdate)
            watcher = self.loop.io(fd, events)
        if watcher is not self.watcher:
            self._drop_watcher()
            self.watcher = watcher
        if not watcher.active:
            watcher.start(self.ready)

    def _soon(self) -> None:
        """Wake again in this loop iteration's callbacks: TLS keeps decrypted bytes that
        no descriptor event announces, and a long burst lets other sessions run."""
        self._drop_watcher()
        self.later = self.loop.run_callback(self.ready)

    def _drop_watcher(self) -> None:
        """Stop the current watcher; close it when it is none of the sockets' own."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
            if watcher is not self.readable and watcher is not self.writable:
                watcher.close()

    def disarm(self) -> None:
        self._drop_watcher()
        self.readable.stop()
        self.writable.stop()
        if self.later is not None:
            self.later.stop()
        self.later = self.ready = self.session = None     # no cycle through the method

    # -- moving bytes --------------------------------------------------------------------

    def step(self) -> bool:
        """Move what can be moved now; True when the session is over (EOF or error)."""
        self.later = None
        try:
            if (self.data is not None or self.in_pipe) and not self._flush():
                return False
            for _ in range(BURST):
                n = self._read()
                if n is None:                   # nothing to read now
                    self._wait(self.src_fd, _READ)
                    return False
                if n == 0:
                    return True
                self.last = self.loop.now()
                if not self._flush():
                    return False
                if n < self.asked and self.src_tls is None:
                    # A short read drained the socket (TLS reads end at each record).
                    watcher = self.watcher
                    if watcher is None or watcher is not self.readable or not watcher.active:
                        self._wait(self.src_fd, _READ)
                    return False
            self._soon()
            return False
        except ssl.SSLWantWriteError:          # a TLS read that must write first
            self._wait(self.src_fd, _WRITE)
            return False
        except ssl.SSLWantReadError:           # a TLS write that must read first
            self._wait(self.dst_fd, _READ)
            return False
        except OSError:
            return True

    def _read(self) -> int | None:
        """Read a chunk; the byte count, 0 at EOF, None when there is nothing to read.

        Small reads go through a scratch buffer shared by every session (``_flush``
        copies what it cannot write at once). Once a read fills a whole chunk, bulk
        has started: plain-to-plain then splices until the reads get small again."""
        if self.bulk and self.src_tls is None and self.dst_tls is None:
            return self._splice_in()
        buf = _scratch(self.size)
        self.asked = self.size
        try:
            if self.src_tls is not None:
                n = self._read_records(buf)
            else:
                n = os.readv(self.src_fd, (buf,))
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0
        if n:
            self.data = memoryview(buf)[:n]
            self.bulk = n == self.size
        return n

    def _read_records(self, buf: bytearray) -> int:
        """TLS records (16 KiB of data at most each) until ``buf`` has no room for one
        more or none is complete: one write to the backend carries several."""
        tls, size = self.src_tls, self.size
        n = tls.read(size, buf)
        if n:
            view = memoryview(buf)
            try:
                while n <= size - TLS_RECORD:
                    got = tls.read(size - n, view[n:])
                    if not got:
                        break
                    n += got
            except OSError:             # none complete, EOF, an error: the next read
                pass                    # meets it again, after these bytes are out
        return n

    def _splice_in(self) -> int | None:
        if self.pipe is None:
            try:
                self.pipe = _pipes.pop() if _pipes else _new_pipe()
            except OSError:             # EMFILE, ENFILE: copy through the buffer instead
                self.bulk = False
                return self._read()
        try:
            n = os.splice(self.src_fd, self.pipe[1], self.splice_size, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            n = None
        if not n:                       # an idle session keeps no pipe
            _give_pipe(self.pipe)
            self.pipe = None
            return n
        self.in_pipe = n
        self.asked = self.splice_size
        self.bulk = n >= SMALL
        return n

    def _flush(self) -> bool:
        """Write out what is pending; True when nothing is left (a pipe then goes back to
        the pool), False after arranging to wait for the destination."""
        data = self.data
        while data is not None:
            try:
                if self.dst_tls is not None:
                    n = self.dst_tls.write(data)
                else:
                    n = os.write(self.dst_fd, data)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self.data = bytes(data)         # off the shared scratch buffer
                self._wait(self.dst_fd, _WRITE)
                return False
            self.count += n
            data = self.data = data[n:] if n < len(data) else None
        while self.in_pipe:
            try:
                n = os.splice(self.pipe[0], self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._wait(self.dst_fd, _WRITE)
                return False
            self.count += n
            self.in_pipe -= n
        if self.pipe is not None:
            _give_pipe(self.pipe)
            self.pipe = None
        return True

    def release(self) -> None:
        """At the end: an empty pipe goes back to the pool, one still holding bytes not."""
        if self.pipe is not None:
            if self.in_pipe:
                _close_pipe(self.pipe)      # bytes nobody will read
            else:
                _give_pipe(self.pipe)
            self.pipe = None
        self.data = None


def _tls_of(sock):
    """The SSLObject under a gevent TLS socket, None for a plain one (asked without
    getattr: a plain socket's ``__getattr__`` would raise and catch inside)."""
    return None if type(sock) is GeventSocket else sock._sslobj


def _scratch(size: int) -> bytearray:
    buf = _buffers.get(size)
    if buf is None:
        buf = _buffers[size] = bytearray(size)
    return buf


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:             # above /proc/sys/fs/pipe-max-size: keep the default
        pass
    return r, w


def _give_pipe(pipe) -> None:
    if len(_pipes) < POOL_MAX:
        _pipes.append(pipe)
    else:
        _close_pipe(pipe)


def _close_pipe(pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
