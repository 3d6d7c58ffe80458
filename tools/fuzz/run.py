"""Run one atheris (libFuzzer) harness: ``python tools/fuzz/run.py TARGET [libFuzzer
options] [CORPUS_DIR ...]``; the ``fuzz_<target>.py`` files next to this one are the same
with the target fixed. Targets are the ``check_*`` functions of ``targets.py``.

The corpus directory (first non-option argument, default ``/tmp/gmailproxy-fuzz/TARGET``)
is seeded with a few valid inputs when empty. A crash is written by libFuzzer as
``crash-<sha1>`` in the current directory: turn it into a test in
tests/unit/test_properties.py (``@example(...)``) or a dialogue test.
"""
import base64
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

with atheris.instrument_imports(include=['gmailproxy', 'targets']):
    import targets

B = base64.b64encode
SEEDS = {
    'lexer': [b'events { }\nmail {\n  auth_http http://127.0.0.1:9/auth;\n'
              b'  server { listen 143; protocol imap; imap_capabilities "IMAP4rev1" \'X\\tY\'; }\n'
              b'}\n# comment\n', b'a "b\\"c" ${x} \\; {}'],
    'config': [b'events { worker_connections 64; }\nmail {\n auth_http http://127.0.0.1:9/a;\n'
               b' timeout 1s; proxy_timeout 10m; server_name m.example;\n'
               b' server { listen 127.0.0.1:1143 proxy_protocol; protocol imap;\n'
               b'  imap_auth plain login cram-md5; starttls off; }\n'
               b' server { listen 127.0.0.1:1025; protocol smtp; smtp_auth none;\n'
               b'  resolver 127.0.0.1:53 valid=30s ipv6=off; xclient on; }\n}\n'],
    'sasl': [B(b'\0alice\0secret'), B(b'alice'), B(b'alice 0123456789abcdef0123456789abcdef'),
             B(b'user=a\x01auth=Bearer t\x01\x01'), B(b'n,a=a,\x01auth=Bearer t\x01\x01'),
             b'YWxp=Y2U'],
    'proxy_protocol': [b'PROXY TCP4 192.0.2.1 127.0.0.1 40000 143\r\n',
                       b'PROXY TCP6 2001:db8::1 ::1 1 2\r\n', b'PROXY UNKNOWN x\r\n',
                       targets.proxy_protocol.build_v2(('192.0.2.1', 1), ('127.0.0.1', 2),
                                                       {'sni': 'a', 'alpn': 'imap',
                                                        'version': 'TLSv1.3', 'cn': 'c'}),
                       targets.proxy_protocol.build_v2(('2001:db8::1', 1), ('::1', 2))],
    'auth_http': [b'\x07HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n'
                  b'Auth-Port: 143\r\nAuth-User: bob\r\nAuth-Pass: pw\r\n\r\n',
                  b'\x03HTTP/1.1 200 OK\r\nAuth-Status: Invalid login\r\nAuth-Wait: 3\r\n'
                  b'Auth-Error-Code: 451 4.3.0\r\nContent-Length: 0\r\n\r\n',
                  b'\x10Auth-Status: WAIT\nAuth-Wait: 1\n\n'],
    'imap': [b'a1 CAPABILITY\r\na2 ID ("name" "x")\r\na3 LOGIN alice "se\\"cret"\r\n'
             b'a4 LOGIN {5}\r\nalice {6+}\r\nsecret\r\n'
             b'a5 AUTHENTICATE PLAIN\r\n' + B(b'\0bob\0pw') + b'\r\n'
             b'a6 AUTHENTICATE LOGIN ' + B(b'u') + b'\r\n' + B(b'p') + b'\r\n'
             b'a7 AUTHENTICATE CRAM-MD5\r\n' + B(b'u 0123456789abcdef0123456789abcdef')
             + b'\r\na8 AUTHENTICATE EXTERNAL =\r\na9 LOGOUT\r\n'],
    'pop3': [b'CAPA\r\nUSER alice\r\nPASS se cret\r\nAPOP bob 0123456789abcdef0123456789abcdef\r\n'
             b'AUTH\r\nAUTH PLAIN\r\n' + B(b'\0bob\0pw') + b'\r\nAUTH LOGIN ' + B(b'u')
             + b'\r\n' + B(b'p') + b'\r\nAUTH CRAM-MD5\r\n'
             + B(b'u 0123456789abcdef0123456789abcdef') + b'\r\nAUTH EXTERNAL =\r\nQUIT\r\n'],
    'smtp': [b'\x00EHLO client.example\r\nAUTH PLAIN ' + B(b'\0bob\0pw') + b'\r\n'
             b'HELO x\r\nAUTH LOGIN\r\n' + B(b'u') + b'\r\n' + B(b'p') + b'\r\n'
             b'RSET\r\nNOOP\r\nMAIL FROM:<a@b>\r\nQUIT\r\n'],
    'smtp_none': [b'\x01EHLO client.example\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\n'
                  b'AUTH PLAIN\r\n' + B(b'\0bob\0pw') + b'\r\nQUIT\r\n'],
}


def _dns_seeds():
    """Answers as ``targets.wrap_dns_answer`` takes them: two header bytes (question,
    rcode, counts), then the records of a real response."""
    import dns.message
    import dns.rrset
    out = []
    for first, qname, rdtype, records in (
            (0, '7.0.2.192.in-addr.arpa.', 'PTR', [('PTR', 'host.example.')]),
            (4, 'host.example.', 'A', [('CNAME', 'h2.example.'), ('A', '192.0.2.7')]),
            (5, 'host.example.', 'AAAA', [('AAAA', '2001:db8::7')])):
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        owner = qname
        for kind, value in records:
            response.answer.append(dns.rrset.from_text(owner, 300, 'IN', kind, value))
            if kind == 'CNAME':
                owner = value
        wire = response.to_wire()
        question = len(dns.message.make_query(qname, rdtype).to_wire())
        out.append(bytes((first, len(records))) + wire[question:])
    return out


def entry(name):
    if name == 'auth_http':
        def one(data):
            if data:
                step = data[0] + 1
                targets.check_auth_response(data[1:], range(0, len(data), step))
        return one
    if name == 'smtp':          # the first byte picks the server: smtp_auth none or not
        return lambda data: data and targets.check_dialogue(
            'smtp_none' if data[0] & 1 else 'smtp', data[1:])
    if name == 'dns':           # the first two bytes make a matching header
        return lambda data: targets.check_dns_answer(targets.wrap_dns_answer(data))
    if name in ('imap', 'pop3'):
        return lambda data: targets.check_dialogue(name, data)
    return getattr(targets, 'check_' + {'auth_http': 'auth_response',
                                        'dns': 'dns_answer'}.get(name, name))


def main(name=None):
    argv = sys.argv[:]
    if name is None:
        name = argv.pop(1)
    if name == 'dns':
        SEEDS['dns'] = _dns_seeds()
    if name == 'smtp':
        SEEDS['smtp'] += SEEDS['smtp_none']
    dirs = [a for a in argv[1:] if not a.startswith('-')]
    if not dirs:
        corpus = os.path.join('/tmp/gmailproxy-fuzz', name)
        argv.append(corpus)
        dirs = [corpus]
    os.makedirs(dirs[0], exist_ok=True)
    if not os.listdir(dirs[0]):
        for i, seed in enumerate(SEEDS.get(name, [])):
            with open(os.path.join(dirs[0], 'seed%d' % i), 'wb') as f:
                f.write(seed)
    targets.config()            # load once, outside the timed inputs
    atheris.Setup(argv, entry(name))
    atheris.Fuzz()


if __name__ == '__main__':
    main()
