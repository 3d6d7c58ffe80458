"""The SMTP client's host name (smtp.md section 2): a PTR lookup, then a forward lookup
that must contain the client address (ngx_mail_smtp_resolve_addr_handler,
ngx_mail_smtp_resolve_name_handler, ngx_mail_smtp_validate_host).

``client_host(s)`` never raises: every failure becomes ``[TEMPUNAVAIL]`` or
``[UNAVAILABLE]`` plus nginx's error line. Queries go to the ``resolver`` name servers
with dnspython (cooperative under gevent), each lookup bounded by ``resolver_timeout``.
Answers, errors included, are cached for their TTL or ``valid=`` (nginx keeps errors
10 s); sessions asking for the same name while a query is out share that query.

Beyond nginx: only the client's own address family is asked in the forward lookup
(an AAAA record can never confirm an IPv4 client), and the cache has a size bound.
"""
import collections
import ipaddress
import logging
import re
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import gevent
from gevent.event import AsyncResult

from .log import printable

UNAVAILABLE = b'[UNAVAILABLE]'
TEMPUNAVAIL = b'[TEMPUNAVAIL]'

TIMEDOUT = 110                  # NGX_ETIMEDOUT, what nginx reports for a lookup timeout
HOST_NOT_FOUND = 3
ERROR_TEXTS = {1: 'Format error', 2: 'Server failure', 3: 'Host not found',
               4: 'Unimplemented', 5: 'Operation refused',
               TIMEDOUT: 'Operation timed out'}
RESEND = 5.0                    # nginx asks the next name server after 5 s of silence
ERROR_VALID = 10.0              # nginx keeps an error answer this long (without valid=)
CACHE_SIZE = 4096
MAX_CNAMES = 8                  # CNAME links followed, over several queries if need be

_HOST = re.compile(rb'[A-Za-z0-9.-]+\Z')    # CVE-2026-28753: nothing else for XCLIENT
_log = logging.getLogger(__name__)


def error_text(code: int) -> str:
    return ERROR_TEXTS.get(code, 'Unknown error')


def client_host(s) -> bytes:
    """HOST for ``Client-Host`` and ``XCLIENT NAME=``; failures logged as nginx does."""
    conf = s.conf
    if conf.resolver is None:
        return UNAVAILABLE
    try:
        addr = ipaddress.ip_address(s.client_ip)
    except ValueError:
        return TEMPUNAVAIL              # a UNIX-socket client has no address to look up
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    resolver = get(conf.resolver)
    timeout = conf.resolver_timeout

    s.action = 'in resolving client address'
    code, names = resolver.lookup(dns.reversename.from_address(str(addr)),
                                  dns.rdatatype.PTR, timeout)
    if code:
        s.error('%s could not be resolved (%d: %s)'
                % (s.client_ip, code, error_text(code)))
        return UNAVAILABLE if code == HOST_NOT_FOUND else TEMPUNAVAIL
    name = names[0]
    try:
        if not _HOST.match(name):
            raise ValueError(name)
        qname = dns.name.from_text(name.decode('ascii'))    # fails for "a..b"
    except (ValueError, dns.exception.DNSException):
        s.error('%s resolved to invalid host name "%s"'
                % (s.client_ip, printable(name)))
        return TEMPUNAVAIL

    s.action = 'in resolving client hostname'
    if not (resolver.ipv4 if addr.version == 4 else resolver.ipv6):
        return UNAVAILABLE              # the forward lookup cannot contain this address
    family = dns.rdatatype.A if addr.version == 4 else dns.rdatatype.AAAA
    code, addrs = resolver.lookup(qname, family, timeout)
    if code:
        s.error('"%s" could not be resolved (%d: %s)' % (name.decode('ascii'), code,
                                                        error_text(code)))
        return UNAVAILABLE if code == HOST_NOT_FOUND else TEMPUNAVAIL
    return name if addr in addrs else UNAVAILABLE


_resolvers: dict = {}


def get(conf_value) -> 'Resolver':
    """One Resolver (and cache) per distinct ``resolver`` value, kept across reloads."""
    resolver = _resolvers.get(conf_value)
    if resolver is None:
        resolver = _resolvers[conf_value] = Resolver(
            conf_value.addresses, conf_value.valid, conf_value.ipv4, conf_value.ipv6)
    return resolver


class Resolver:
    """Name servers, a TTL cache bounded in size, and the queries now in flight."""

    def __init__(self, servers, valid=None, ipv4=True, ipv6=True,
                 cache_size: int = CACHE_SIZE, clock=time.monotonic):
        self.servers = list(servers)        # [(ip, port)]
        self.valid = valid
        self.ipv4, self.ipv6 = ipv4, ipv6
        self.cache_size = cache_size
        self.clock = clock
        self.cache = collections.OrderedDict()  # (qname, rdtype) -> (expires, result)
        self.pending: dict = {}                    # (qname, rdtype) -> AsyncResult
        self.queries = 0                           # sent, for tests and statistics
        self._next = 0

    def lookup(self, qname, rdtype, timeout: float) -> tuple:
        """``(0, values)`` or ``(error code, [])``: PTR values are names (bytes, no
        final dot), A/AAAA values ``ipaddress`` objects. Never raises."""
        key = (qname, rdtype)
        hit = self.cache.get(key)
        if hit is not None:
            if hit[0] > self.clock():
                self.cache.move_to_end(key)
                return hit[1]
            del self.cache[key]
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = AsyncResult()
            # its own greenlet: a waiter that goes away must not strand the others
            gevent.spawn(self._run, key, pending, timeout)
        result = pending.wait(timeout + 1.0)
        return result if pending.ready() else (TIMEDOUT, [])

    def _run(self, key, pending, timeout) -> None:
        try:
            result, ttl = self._resolve(key[0], key[1], self.clock() + timeout)
        except Exception:                   # a dnspython surprise must not end sessions
            _log.exception('resolver failure')
            result, ttl = (TIMEDOUT, []), 0
        finally:
            del self.pending[key]
        if ttl > 0:
            self._store(key, result, ttl)
        pending.set(result)

    def _store(self, key, result, ttl) -> None:
        self.cache[key] = (self.clock() + ttl, result)
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def _resolve(self, qname, rdtype, deadline) -> tuple:
        """Ask, following CNAMEs (asking again for a chain's end if the answer stops
        there); returns ``((code, values), seconds to keep it)``."""
        ttl = None
        for _ in range(MAX_CNAMES + 1):
            response = self._query(qname, rdtype, deadline)
            if response is None:
                return (TIMEDOUT, []), 0
            code = response.rcode()
            if code == dns.rcode.NOERROR:
                try:
                    chain = response.resolve_chaining()
                except dns.exception.DNSException:
                    code = dns.rcode.FORMERR
            if code != dns.rcode.NOERROR:
                return (code, []), self.valid or ERROR_VALID
            ttl = chain.minimum_ttl if ttl is None else min(ttl, chain.minimum_ttl)
            if chain.answer is not None:
                values = [_value(rdata) for rdata in chain.answer]
                return (0, values), self.valid or ttl
            if chain.canonical_name == qname:     # no records: nginx calls it not found
                return (HOST_NOT_FOUND, []), self.valid or ERROR_VALID
            qname = chain.canonical_name
        return (dns.rcode.SERVFAIL, []), self.valid or ERROR_VALID

    def _query(self, qname, rdtype, deadline):
        """The first answer from the name servers in turn (starting with the one that
        answered last), each given ``RESEND`` seconds (less if that would leave later
        servers no time); None once ``deadline`` passes.
        A malformed datagram is ignored, as nginx does, and the wait goes on."""
        query = dns.message.make_query(qname, rdtype)
        servers = self.servers
        failed = 0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0 or failed >= len(servers):
                return None
            index = self._next % len(servers)
            ip, port = servers[index]
            wait = min(remaining, RESEND, max(remaining / len(servers), 0.05))
            self.queries += 1
            try:
                response = dns.query.udp(query, ip, timeout=wait, port=port,
                                         ignore_unexpected=True, ignore_errors=True)
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(query, ip, timeout=max(
                        deadline - self.clock(), 0.01), port=port)
                self._next = index          # it answers: start there next time
                return response
            except dns.exception.Timeout:
                failed = 0                  # silent: keep cycling until the deadline
            except (OSError, dns.exception.DNSException, ValueError):
                failed += 1                 # unreachable or garbage over TCP: next one
            self._next = index + 1


def _value(rdata):
    if rdata.rdtype == dns.rdatatype.PTR:
        labels = rdata.target.labels
        if labels and labels[-1] == b'':
            labels = labels[:-1]                # the root: no final dot
        return b'.'.join(labels)
    return ipaddress.ip_address(rdata.address)
