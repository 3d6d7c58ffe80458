"""Listening sockets (nginx ngx_mail_optimize_servers, ngx_open_listening_sockets,
ngx_configure_listening_sockets).

Plain non-blocking stdlib sockets, so forked workers can inherit them; gevent's
StreamServer wraps them. A wildcard address shares its socket with the specific addresses
of its port that lack ``bind``; ``Bound.route`` picks their ``Listen`` by local address.
"""
import logging
import os
import socket
import stat

from .config.address import Listen
from .errors import ConfigError

log = logging.getLogger(__name__)


class Bound:
    """One open listening socket and the ``Listen`` entries it serves."""
    __slots__ = ('sock', 'listens', 'unix_path', '_specific')

    def __init__(self, sock: socket.socket, listens: list[Listen]):
        self.sock = sock
        self.listens = listens      # listens[0] is the address the socket is bound to
        self.unix_path = None
        self._specific = {l.sockaddr[0]: l for l in listens[1:]}

    def route(self, local_sockaddr) -> Listen:
        """The Listen for a connection accepted with this local address: the specific
        address if one was listed, else the socket's own (nginx ngx_mail_init_connection)."""
        if self._specific and isinstance(local_sockaddr, tuple):
            found = self._specific.get(local_sockaddr[0])
            if found is not None:
                return found
        return self.listens[0]

    def __repr__(self) -> str:
        return '<Bound %s>' % self.listens[0].addr_text


def plan(listens: list[Listen]) -> list[list[Listen]]:
    """Group addresses into sockets: per family and port, a wildcard takes every address
    without ``bind``; the rest get a socket each. The first of a group is bound."""
    order, ports = [], {}
    for lst in listens:
        if lst.family == socket.AF_UNIX:
            order.append([lst])
            continue
        key = (lst.family, lst.port)
        if key not in ports:
            ports[key] = []
            order.append(key)
        ports[key].append(lst)
    groups = []
    for item in order:
        if isinstance(item, list):
            groups.append(item)
            continue
        addrs = ports[item]
        wildcard = next((a for a in addrs if a.wildcard), None)
        if wildcard is None:
            groups += [[a] for a in addrs]
            continue
        shared = [wildcard]
        for a in addrs:
            if a is not wildcard:
                if a.bind:
                    groups.append([a])
                else:
                    shared.append(a)
        groups.append(shared)
    return groups


def open_listeners(config) -> list[Bound]:
    """Open every listening socket of ``config``; ConfigError (no position) on failure,
    closing what was already opened."""
    bounds, done = [], False
    try:
        for group in plan([l for conf in config.servers for l in conf.listen]):
            bound = Bound(None, group)
            bounds.append(bound)
            bound.sock = open_socket(group[0], bound)
        done = True
    finally:
        if not done:
            close_listeners(bounds)
    return bounds


def close_listeners(bounds: list[Bound]) -> None:
    """Close the sockets and remove the unix socket files this process created."""
    for bound in bounds:
        if bound.sock is not None:
            bound.sock.close()
        if bound.unix_path:
            try:
                os.unlink(bound.unix_path)
            except OSError:
                pass


def _failed(what: str, err: OSError) -> ConfigError:
    return ConfigError('%s failed (%d: %s)' % (what, err.errno, os.strerror(err.errno)))


def open_socket(lst: Listen, bound: Bound) -> socket.socket:
    proto = socket.IPPROTO_MPTCP if lst.multipath else 0
    try:
        sock = socket.socket(lst.family, socket.SOCK_STREAM, proto)
    except OSError as e:
        raise _failed('socket() %s' % lst.addr_text, e) from None
    done = False
    try:
        if lst.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _configure(sock, lst)
        if lst.family == socket.AF_UNIX:
            _remove_stale(lst.sockaddr)
        try:
            sock.bind(lst.sockaddr)
        except OSError as e:
            raise _failed('bind() to %s' % lst.addr_text, e) from None
        if lst.family == socket.AF_UNIX:
            bound.unix_path = lst.sockaddr
            os.chmod(lst.sockaddr, 0o666)   # as nginx: any local user may connect
        try:
            sock.listen(lst.backlog)
        except OSError as e:
            raise _failed('listen() to %s, backlog %d' % (lst.addr_text, lst.backlog),
                          e) from None
        sock.setblocking(False)
        done = True
    finally:
        if not done:
            sock.close()
    return sock


def _configure(sock: socket.socket, lst: Listen) -> None:
    """Socket options; as in nginx a failure is logged and ignored."""
    options = []
    if lst.rcvbuf is not None:
        options.append(('SO_RCVBUF', socket.SOL_SOCKET, socket.SO_RCVBUF, lst.rcvbuf))
    if lst.sndbuf is not None:
        options.append(('SO_SNDBUF', socket.SOL_SOCKET, socket.SO_SNDBUF, lst.sndbuf))
    if lst.so_keepalive is not None:
        options.append(('SO_KEEPALIVE', socket.SOL_SOCKET, socket.SO_KEEPALIVE,
                        int(lst.so_keepalive is not False)))
    if isinstance(lst.so_keepalive, tuple):
        for name, value in zip(('TCP_KEEPIDLE', 'TCP_KEEPINTVL', 'TCP_KEEPCNT'),
                               lst.so_keepalive):
            if value is not None:
                options.append((name, socket.IPPROTO_TCP, getattr(socket, name), value))
    if lst.family == socket.AF_INET6:
        options.append(('IPV6_V6ONLY', socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                        int(lst.ipv6only)))
    for name, level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as e:
            log.warning('setsockopt(%s, %d) %s failed (%d: %s), ignored', name, value,
                        lst.addr_text, e.errno, os.strerror(e.errno))


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on (left by a crash); anything else stays,
    and bind() reports it."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()
