"""The SMTP client host lookup (smtp.md section 2) against a real UDP name server on
loopback: PTR + forward confirmation, caching, errors, timeouts, CNAMEs, bad names.

``FakeDNS`` (a small dnspython server answering from a table) is also used by the SMTP
dialogue and end-to-end tests.
"""
import socket
import time
import types

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import gevent
import pytest
from gevent.server import DatagramServer, StreamServer

from gmailproxy import resolver
from gmailproxy.config.values import Resolver as ResolverConf

RCODES = {'NXDOMAIN': dns.rcode.NXDOMAIN, 'SERVFAIL': dns.rcode.SERVFAIL,
          'REFUSED': dns.rcode.REFUSED, 'FORMERR': dns.rcode.FORMERR,
          'NOTIMP': dns.rcode.NOTIMP, 'NOTAUTH': dns.rcode.NOTAUTH}


class FakeDNS:
    """A UDP name server on 127.0.0.1 answering from ``records``.

    ``records[(name, type)]`` (names absolute, lower case, e.g. ``'host.test.'``) is a
    list of ``(rdata text, ttl)``, or one of ``'NXDOMAIN'``, ``'SERVFAIL'``,
    ``'REFUSED'``, ``'FORMERR'``, ``'NOTIMP'``, ``'NOTAUTH'`` (that rcode), ``'DROP'``
    (no answer), ``'GARBAGE'`` (a malformed datagram), ``'EMPTY'`` (NOERROR without
    records). A ``(name, 'CNAME')``
    entry is followed like a recursive server does, unless ``follow_cnames`` is off.
    A name with no entry gets NXDOMAIN. ``queries`` lists ``(name, type)`` asked (over
    TCP: ``(name, type, 'tcp')``); ``delay`` holds every answer back that long; names
    in ``truncate`` get an empty truncated answer over UDP (the full one over TCP, on
    the same port number).
    """

    def __init__(self, records=None, follow_cnames=True):
        self.records = dict(records or {})
        self.follow_cnames = follow_cnames
        self.truncate = set()
        self.queries = []
        self.delay = 0.0
        udp, tcp = _port_pair()
        self.port = udp.getsockname()[1]
        self.server = DatagramServer(udp, self._handle)
        self.server.start()
        self.tcp = StreamServer(tcp, self._handle_tcp)
        self.tcp.start()

    def stop(self):
        self.server.stop()
        self.tcp.stop()

    def _handle_tcp(self, sock, address):
        f = sock.makefile('rb')
        size = f.read(2)
        if len(size) == 2:
            query = dns.message.from_wire(f.read(int.from_bytes(size, 'big')))
            question = query.question[0]
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype, 'tcp'))
            answer = self._answer(query, name, rdtype)
            sock.sendall(len(answer).to_bytes(2, 'big') + answer)
        sock.close()

    def count(self, name, rdtype):
        return self.queries.count((name, rdtype))

    def _handle(self, data, address):
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if self.delay:
            gevent.sleep(self.delay)
        if name in self.truncate:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.TC
            self.server.sendto(response.to_wire(), address)
            return
        answer = self._answer(query, name, rdtype)
        if answer is not None:
            self.server.sendto(answer, address)

    def _answer(self, query, name, rdtype):
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        for _ in range(10):
            entry = self.records.get((name, rdtype))
            cname = self.records.get((name, 'CNAME'))
            if entry is None and cname is not None:
                target, ttl = cname[0]
                response.answer.append(
                    dns.rrset.from_text(name, ttl, 'IN', 'CNAME', target))
                if not self.follow_cnames:
                    return response.to_wire()
                name = target.lower()
                continue
            break
        if entry == 'DROP':
            return None
        if entry == 'GARBAGE':
            return query.to_wire()[:2] + b'\x81\x80garbage'
        if entry == 'EMPTY':
            return response.to_wire()
        if isinstance(entry, str):
            response.set_rcode(RCODES[entry])
            return response.to_wire()
        if entry is None:
            if not response.answer:
                response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        for text, ttl in entry:
            response.answer.append(dns.rrset.from_text(name, ttl, 'IN', rdtype, text))
        return response.to_wire()


def _port_pair():
    """A UDP and a listening TCP socket on the same free loopback port."""
    for _ in range(50):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(('127.0.0.1', 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(('127.0.0.1', tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            udp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError('no free UDP+TCP port pair')


@pytest.fixture
def fake_dns():
    servers = []

    def make(records=None, **kw):
        server = FakeDNS(records, **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


class FakeSession:
    """What client_host() uses of a session: conf, client_ip, action, error()."""

    def __init__(self, client_ip, conf):
        self.client_ip = client_ip
        self.conf = conf
        self.action = None
        self.logged = []

    def error(self, msg):
        self.logged.append('%s while %s' % (msg, self.action))


def conf_for(*servers, timeout=1.0, **kw):
    addresses = tuple(('127.0.0.1', s if isinstance(s, int) else s.port)
                      for s in servers)
    return types.SimpleNamespace(resolver=ResolverConf(addresses, **kw),
                                 resolver_timeout=timeout)


@pytest.fixture(autouse=True)
def fresh_resolvers():
    """Each test gets new caches (resolvers are kept per configuration value)."""
    resolver._resolvers.clear()
    yield
    resolver._resolvers.clear()


def lookup(client_ip, conf):
    s = FakeSession(client_ip, conf)
    with gevent.Timeout(10, AssertionError('client_host did not return')):
        host = resolver.client_host(s)
    return host, s.logged


PTR = '7.2.0.192.in-addr.arpa.'
HOST = 'client.test.'


def test_ptr_and_forward_confirmation(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.9', 300), ('192.0.2.7', 300)]})
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])
    assert dns_.queries == [(PTR, 'PTR'), (HOST, 'A')]


def test_forward_lookup_without_the_client_address(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.8', 300)]})
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'[UNAVAILABLE]', [])


def test_resolver_off_and_unix_clients():
    off = types.SimpleNamespace(resolver=None, resolver_timeout=1.0)
    assert lookup('192.0.2.7', off) == (b'[UNAVAILABLE]', [])
    assert lookup('unix:', conf_for(9)) == (b'[TEMPUNAVAIL]', [])


@pytest.mark.parametrize('answer, host, message', [
    ('NXDOMAIN', b'[UNAVAILABLE]', '(3: Host not found)'),
    ('EMPTY', b'[UNAVAILABLE]', '(3: Host not found)'),
    ('SERVFAIL', b'[TEMPUNAVAIL]', '(2: Server failure)'),
    ('REFUSED', b'[TEMPUNAVAIL]', '(5: Operation refused)'),
    ('FORMERR', b'[TEMPUNAVAIL]', '(1: Format error)'),
    ('NOTIMP', b'[TEMPUNAVAIL]', '(4: Unimplemented)'),
    ('NOTAUTH', b'[TEMPUNAVAIL]', '(9: Unknown error)'),
])
def test_ptr_failures(fake_dns, answer, host, message):
    dns_ = fake_dns({(PTR, 'PTR'): answer})
    assert lookup('192.0.2.7', conf_for(dns_)) == (
        host, ['192.0.2.7 could not be resolved %s while in resolving client address'
               % message])
    assert dns_.queries == [(PTR, 'PTR')]


@pytest.mark.parametrize('answer, host, message', [
    ('NXDOMAIN', b'[UNAVAILABLE]', '(3: Host not found)'),
    ('EMPTY', b'[UNAVAILABLE]', '(3: Host not found)'),
    ('SERVFAIL', b'[TEMPUNAVAIL]', '(2: Server failure)'),
    ('REFUSED', b'[TEMPUNAVAIL]', '(5: Operation refused)'),
])
def test_forward_failures(fake_dns, answer, host, message):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)], (HOST, 'A'): answer})
    assert lookup('192.0.2.7', conf_for(dns_)) == (
        host, ['"client.test" could not be resolved %s'
               ' while in resolving client hostname' % message])


@pytest.mark.parametrize('answer', ['DROP', 'GARBAGE'])
def test_timeout_and_malformed_answer(fake_dns, answer):
    """A malformed datagram is ignored (as nginx does): the lookup times out."""
    dns_ = fake_dns({(PTR, 'PTR'): answer})
    started = time.monotonic()
    assert lookup('192.0.2.7', conf_for(dns_, timeout=0.5)) == (
        b'[TEMPUNAVAIL]', ['192.0.2.7 could not be resolved (110: Operation timed out)'
                           ' while in resolving client address'])
    assert 0.4 < time.monotonic() - started < 1.5


def test_forward_timeout(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)], (HOST, 'A'): 'DROP'})
    assert lookup('192.0.2.7', conf_for(dns_, timeout=0.3)) == (
        b'[TEMPUNAVAIL]', ['"client.test" could not be resolved (110: Operation timed'
                           ' out) while in resolving client hostname'])


@pytest.mark.parametrize('target, shown', [
    ('bad\\032name.test.', 'bad name.test'),
    ('bad\\013\\010.test.', 'bad\\x0d\\x0a.test'),
    ('under_score.test.', 'under_score.test'),
    ('quote\\".test.', 'quote".test'),
    ('.', ''),
    ('dot\\.\\..test.', 'dot...test'),
])
def test_invalid_host_names(fake_dns, target, shown):
    """Nothing outside A-Z a-z 0-9 - . reaches Client-Host or XCLIENT
    (CVE-2026-28753)."""
    dns_ = fake_dns({(PTR, 'PTR'): [(target, 300)]})
    assert lookup('192.0.2.7', conf_for(dns_)) == (
        b'[TEMPUNAVAIL]', ['192.0.2.7 resolved to invalid host name "%s"'
                           ' while in resolving client address' % shown])
    assert dns_.queries == [(PTR, 'PTR')]


def test_truncated_answer_asked_again_over_tcp(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.%d' % n, 300) for n in range(1, 60)]})
    dns_.truncate.add(HOST)
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])
    assert dns_.queries == [(PTR, 'PTR'), (HOST, 'A'), (HOST, 'A', 'tcp')]


def test_cname_chain(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'CNAME'): [('alias.test.', 300)],
                     ('alias.test.', 'CNAME'): [('real.test.', 300)],
                     ('real.test.', 'A'): [('192.0.2.7', 300)]})
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])


def test_cname_chain_followed_by_new_queries(fake_dns):
    """A server that stops at the CNAME: the chain's end is asked for next."""
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'CNAME'): [('alias.test.', 300)],
                     ('alias.test.', 'A'): [('192.0.2.7', 300)]}, follow_cnames=False)
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])
    assert dns_.queries == [(PTR, 'PTR'), (HOST, 'A'), ('alias.test.', 'A')]


def test_classless_ptr_cname(fake_dns):
    """RFC 2317 delegation: the PTR is reached through a CNAME."""
    dns_ = fake_dns({(PTR, 'CNAME'): [('7.0-25.2.0.192.in-addr.arpa.', 300)],
                     ('7.0-25.2.0.192.in-addr.arpa.', 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.7', 300)]})
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])


def test_cname_loop_ends(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'CNAME'): [('loop.test.', 300)],
                     ('loop.test.', 'CNAME'): [('client.test.', 300)]},
                    follow_cnames=False)
    host, logged = lookup('192.0.2.7', conf_for(dns_))
    assert host == b'[TEMPUNAVAIL]'
    assert logged == ['"client.test" could not be resolved (2: Server failure)'
                      ' while in resolving client hostname']


def test_cache_by_ttl(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 1)],
                     (HOST, 'A'): [('192.0.2.7', 300)]})
    conf = conf_for(dns_)
    for _ in range(3):
        assert lookup('192.0.2.7', conf) == (b'client.test', [])
    assert dns_.count(PTR, 'PTR') == 1 and dns_.count(HOST, 'A') == 1
    time.sleep(1.1)                      # the PTR's TTL has run out, the A's has not
    assert lookup('192.0.2.7', conf) == (b'client.test', [])
    assert dns_.count(PTR, 'PTR') == 2 and dns_.count(HOST, 'A') == 1


def test_valid_overrides_ttl(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 0)],
                     (HOST, 'A'): [('192.0.2.7', 0)]})
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])
    assert lookup('192.0.2.7', conf_for(dns_)) == (b'client.test', [])
    assert len(dns_.queries) == 4        # TTL 0: never kept
    valid = conf_for(dns_, valid=60.0)
    assert lookup('192.0.2.7', valid) == (b'client.test', [])
    assert lookup('192.0.2.7', valid) == (b'client.test', [])
    assert len(dns_.queries) == 6


def test_errors_are_cached_timeouts_are_not(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): 'SERVFAIL',
                     ('8.2.0.192.in-addr.arpa.', 'PTR'): 'DROP'})
    conf = conf_for(dns_, timeout=0.2)
    for _ in range(2):
        assert lookup('192.0.2.7', conf)[0] == b'[TEMPUNAVAIL]'
        assert lookup('192.0.2.8', conf)[0] == b'[TEMPUNAVAIL]'
    assert dns_.count(PTR, 'PTR') == 1
    assert dns_.count('8.2.0.192.in-addr.arpa.', 'PTR') >= 2


def test_cache_size_is_bounded(fake_dns):
    dns_ = fake_dns({(HOST, 'A'): [('192.0.2.7', 300)],
                     ('b.test.', 'A'): [('192.0.2.8', 300)],
                     ('c.test.', 'A'): [('192.0.2.9', 300)]})
    r = resolver.Resolver([('127.0.0.1', dns_.port)], cache_size=2)
    for name in (HOST, 'b.test.', 'c.test.'):
        assert r.lookup(dns.name.from_text(name), dns.rdatatype.A, 1.0)[0] == 0
    assert len(r.cache) == 2
    assert r.lookup(dns.name.from_text(HOST), dns.rdatatype.A, 1.0)[0] == 0
    assert dns_.count(HOST, 'A') == 2    # the oldest entry had been dropped


def test_concurrent_sessions_share_one_lookup(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.7', 300)]})
    dns_.delay = 0.2
    conf = conf_for(dns_)
    jobs = [gevent.spawn(lookup, '192.0.2.7', conf) for _ in range(5)]
    gevent.joinall(jobs, timeout=5, raise_error=True)
    assert [job.value for job in jobs] == [(b'client.test', [])] * 5
    assert dns_.queries == [(PTR, 'PTR'), (HOST, 'A')]


def test_several_name_servers(fake_dns):
    """The first one is silent: the second answers, and is asked first from then on."""
    silent = fake_dns({(PTR, 'PTR'): 'DROP', (HOST, 'A'): 'DROP'})
    good = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.7', 300)]})
    started = time.monotonic()
    conf = conf_for(silent, good, timeout=1.0)
    assert lookup('192.0.2.7', conf) == (b'client.test', [])
    assert time.monotonic() - started < 0.9
    assert silent.queries == [(PTR, 'PTR')]
    assert good.queries == [(PTR, 'PTR'), (HOST, 'A')]


def test_ipv6_client(fake_dns):
    ptr = ('1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.')
    dns_ = fake_dns({(ptr, 'PTR'): [('v6.test.', 300)],
                     ('v6.test.', 'AAAA'): [('2001:db8::1', 300)]})
    assert lookup('2001:db8::1', conf_for(dns_)) == (b'v6.test', [])
    assert lookup('2001:db8::1', conf_for(dns_, ipv6=False)) == (b'[UNAVAILABLE]', [])
    assert dns_.queries == [(ptr, 'PTR'), ('v6.test.', 'AAAA'), (ptr, 'PTR')]


def test_ipv4_mapped_client_is_looked_up_as_ipv4(fake_dns):
    dns_ = fake_dns({(PTR, 'PTR'): [('client.test.', 300)],
                     (HOST, 'A'): [('192.0.2.7', 300)]})
    assert lookup('::ffff:192.0.2.7', conf_for(dns_)) == (b'client.test', [])


def test_unreachable_name_server_never_raises():
    """Port 9 on loopback: the send fails or nothing answers; no exception anyway."""
    host, logged = lookup('192.0.2.7', conf_for(9, timeout=0.3))
    assert host == b'[TEMPUNAVAIL]'
    assert logged == ['192.0.2.7 could not be resolved (110: Operation timed out)'
                      ' while in resolving client address']
