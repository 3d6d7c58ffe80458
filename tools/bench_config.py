#!/usr/bin/env python3
"""Time loading a configuration with many ``server {}`` blocks (goal: 5,000 in under 1 s).

Usage: python tools/bench_config.py [SERVERS] [ROUNDS]
Generates the configuration in a temporary folder (servers spread over included files),
loads it ROUNDS times and prints the best time.
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmailproxy.config.parser import load  # noqa: E402

MAIN = """\
worker_processes 1;
error_log stderr info;
events {{ worker_connections {connections}; }}
mail {{
    auth_http 127.0.0.1:9000/auth;
    server_name mail.example.com;
    imap_capabilities IMAP4rev1 UIDPLUS IDLE "LITERAL+";
    smtp_auth login plain cram-md5;
    timeout 30s;
    include servers/*.conf;
}}
"""

SERVER = """\
server {{
    # server {n}
    listen 127.0.{a}.{b}:{port};
    protocol {protocol};
    proxy_timeout 10m;
    {extra}
}}
"""
PROTOCOLS = ('imap', 'pop3', 'smtp')
EXTRAS = ('imap_auth plain login;', 'pop3_capabilities TOP USER UIDL;',
          'smtp_capabilities "SIZE 10485760" 8BITMIME;')


def generate(folder: str, servers: int, per_file: int = 500) -> str:
    os.makedirs(os.path.join(folder, 'servers'))
    for first in range(0, servers, per_file):
        blocks = []
        for n in range(first, min(servers, first + per_file)):
            blocks.append(SERVER.format(n=n, a=1 + n // 250, b=1 + n % 250,
                                        port=10000 + n % 3, protocol=PROTOCOLS[n % 3],
                                        extra=EXTRAS[n % 3]))
        with open(os.path.join(folder, 'servers', '%05d.conf' % first), 'w') as f:
            f.write(''.join(blocks))
    path = os.path.join(folder, 'mail.conf')
    with open(path, 'w') as f:
        f.write(MAIN.format(connections=servers + 100))
    return path


def main() -> int:
    servers = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as folder:
        path = generate(folder, servers)
        size = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, files in os.walk(folder) for f in files)
        best = None
        for _ in range(rounds):
            start = time.perf_counter()
            config = load(path)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
        assert len(config.servers) == servers
    print('loaded %d servers (%d files, %d bytes) in %.3f s (best of %d)'
          % (servers, len(config.files), size, best, rounds))
    return 0


if __name__ == '__main__':
    sys.exit(main())
