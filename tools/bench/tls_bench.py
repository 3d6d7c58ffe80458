#!/usr/bin/env python3
"""IMAPS (implicit TLS) benchmark: nginx vs gmailproxy, the scenario the shared harness
lacks (issue 5's TLS goals). Uses the shared harness (../shared/bench or $MAILBENCH_DIR)
as a library: its fake backend, auth server, process bookkeeping and CPU accounting.

* T1 IMAPS logins/s: as S1 (c=50) but every session starts with a full TLS handshake
  (TLS 1.3, no resumption), so the proxy pays one handshake per login.
* T2 IMAPS bulk: as S2, sessions x bytes down (FETCH) then up (APPEND), through TLS.

Both proxies get the same self-signed ECDSA P-256 certificate and otherwise default TLS
settings; the load generator is the harness's mailload with TLS added
(tools/bench/mailload-tls.patch, built next to the harness tools).

    tools/run-bench --tls [--workers 1,2] [--rounds 2] [--tls-bytes 20M]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HARNESS = os.environ.get('MAILBENCH_DIR', os.path.join(ROOT, '..', 'shared', 'bench'))
BUILD = os.environ.get('MAILBENCH_BUILD_DIR', os.path.join(ROOT, '.build', 'bench'))
sys.path.insert(0, HARNESS)
import bench  # noqa: E402  (the shared harness, read-only)

SERVER_TLS = """
    server {{
        listen {{{{listen_host}}}}:{{{{pop3_port}}}} ssl;
        protocol imap;
        ssl_certificate {cert};
        ssl_certificate_key {key};
    }}
"""


def build_loadgen() -> str:
    """mailload with ``-S`` (TLS): the harness source plus our patch, built once."""
    src = os.path.join(HARNESS, 'src', 'mailload.c')
    patch = os.path.join(HERE, 'mailload-tls.patch')
    out = os.path.join(BUILD, 'mailload-tls')
    if os.path.exists(out) and os.path.getmtime(out) > max(os.path.getmtime(src),
                                                           os.path.getmtime(patch)):
        return out
    os.makedirs(BUILD, exist_ok=True)
    patched = out + '.c'
    subprocess.run(['patch', '-s', '-o', patched, src, patch], check=True)
    subprocess.run(['gcc', '-O2', '-Wall', '-Wextra', '-o', out, patched, '-lm', '-lssl',
                    '-lcrypto'], check=True)
    return out


def make_certificate(workdir: str) -> tuple[str, str]:
    cert, key = os.path.join(workdir, 'bench.crt'), os.path.join(workdir, 'bench.key')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                    'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj',
                    '/CN=bench.local', '-keyout', key, '-out', cert],
                   check=True, capture_output=True)
    return cert, key


def tls_template(base: str, cert: str, key: str, workdir: str, name: str) -> str:
    """``base`` (a harness-style template) with an IMAPS server instead of the POP3 one:
    the plain IMAP server stays, since the harness waits for its greeting."""
    with open(base) as f:
        text = f.read()
    text, found = re.subn(r'server\s*\{\s*listen \{\{listen_host\}\}:\{\{pop3_port\}\};'
                          r'\s*protocol pop3;\s*\}', '', text)
    text = text.rstrip()
    assert found == 1 and text.endswith('}'), base
    text = text[:-1] + SERVER_TLS.format(cert=cert, key=key) + '}\n'
    path = os.path.join(workdir, name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def start(b, label, template, cmd, workers):
    """Like bench.Bench.start_proxy, with our own label, template and command."""
    wdir = os.path.join(b.workdir, label)
    os.makedirs(wdir, exist_ok=True)
    ports = bench.free_ports(3)
    vals = b.base_values(wdir)
    vals.update({'imap_port': ports[0], 'pop3_port': ports[1], 'smtp_port': ports[2],
                 'workers': workers})
    with open(template) as f:
        text = f.read()
    conf = os.path.join(wdir, os.path.basename(template).replace('.tmpl', ''))
    vals['conf'] = conf
    with open(conf, 'w') as f:
        f.write(bench.render(text, vals, label))
    argv = ['/bin/sh', '-c', 'exec ' + bench.render(cmd, vals, label)]
    svc = bench.Service(label, argv, wdir)
    b.services.append(svc)
    try:
        bench.wait_port(ports[0], 20, svc.proc, b'* OK')
    except RuntimeError:
        with open(svc.logpath, errors='replace') as f:
            sys.stderr.write(f.read()[-2000:])
        raise
    time.sleep(0.3)
    return {'label': label, 'svc': svc, 'port': ports[1], 'imap_port': ports[0],
            'workers': workers}


def run_load(b, loadgen, t, argv, timeout):
    def go():
        saved, b.load = b.load, loadgen
        try:
            return b.loadgen(argv, timeout)
        finally:
            b.load = saved
    return b.measure(t, go)


def scenarios(b, loadgen, t, a):
    port = str(t['port'])
    out = {'login': run_load(b, loadgen, t, ['login', '-S', '-p', port, '-P', 'imap', '-c',
                                              str(a.concurrency), '-d', str(a.duration)],
                             a.duration + 60)}
    for mode in ('fetch', 'append'):
        time.sleep(0.5)
        out[mode] = run_load(b, loadgen, t, [mode, '-S', '-p', port, '-P', 'imap', '-n',
                                             str(a.sessions), '-s', a.tls_bytes, '-T', '240'],
                             300)
    return out


def rows(res):
    """The table rows of one round: (name, better, value)."""
    login, fetch, append = res['login'], res['fetch'], res['append']
    out = []
    sessions = login.get('sessions_done') or 0
    errors = sum(r.get('errors', {}).get('total', 0) for r in (login, fetch, append))
    out.append(('T1 IMAPS logins/s (c=%d)' % login.get('concurrency', 0), 'higher',
                login.get('sessions_per_s')))
    out.append(('T1 login latency p50 ms', 'lower',
                login.get('login_latency_us', {}).get('p50', 0) / 1000.0))
    out.append(('T1 proxy CPU us/session', 'lower',
                (login['cpu']['proxy_s'] or 0) / sessions * 1e6 if sessions else None))
    for name, r in (('download', fetch), ('upload', append)):
        out.append(('T2 IMAPS %s MB/s' % name, 'higher', r.get('MBps')))
        gb = (r.get('bytes') or 0) / 1e9
        out.append(('T2 %s proxy CPU s/GB' % name, 'lower',
                    (r['cpu']['proxy_s'] or 0) / gb if gb else None))
    out.append(('T errors', 'lower', errors))
    return out


def best(rounds, rows_of=None):
    """Per row, the best round (as the harness's default); errors: the worst round."""
    rows_of = rows_of or rows
    table = {}
    for res in rounds:
        for name, better, value in rows_of(res):
            if value is None:
                continue
            old = table.get(name)
            if name == 'T errors':
                better_now = old is None or value > old[1]
            else:
                better_now = old is None or (value > old[1] if better == 'higher'
                                             else value < old[1])
            if better_now:
                table[name] = (better, value)
    return table


def print_table(workers, nginx, contender, title='IMAPS', nginx_label='nginx',
                out=sys.stdout):
    print('\n== %s, worker_processes = %d ==' % (title, workers), file=out)
    head = ('metric', 'better', '%s w%d' % (nginx_label, workers), 'gmailproxy w%d' % workers,
            'contender/nginx')
    lines = [head]
    for name in nginx:
        better, nv = nginx[name]
        cv = contender.get(name, (better, None))[1]
        ratio = '-' if not nv or cv is None or name == 'T errors' else '%.2f' % (cv / nv)
        lines.append((name, better, bench.fmt(nv), bench.fmt(cv), ratio))
    widths = [max(len(str(line[i])) for line in lines) for i in range(5)]
    for i, line in enumerate(lines):
        print('  '.join(str(c).ljust(widths[j]) if j == 0 else str(c).rjust(widths[j])
                        for j, c in enumerate(line)), file=out)
        if i == 0:
            print('-' * (sum(widths) + 8), file=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--workers', default='1')
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--duration', type=float, default=3.0)
    ap.add_argument('--concurrency', type=int, default=50)
    ap.add_argument('--sessions', type=int, default=20)
    ap.add_argument('--tls-bytes', default='20M')
    ap.add_argument('--contender-cmd',
                    default='%s -m gmailproxy {{conf}}' % sys.executable)
    a = ap.parse_args()
    loadgen = build_loadgen()
    workdir = tempfile.mkdtemp(prefix='gp-tlsbench.')
    cert, key = make_certificate(workdir)
    nginx_tmpl = tls_template(os.path.join(HARNESS, 'conf', 'nginx-mail.conf.tmpl'),
                              cert, key, workdir, 'nginx-mail.conf.tmpl')
    ours_tmpl = tls_template(os.path.join(HERE, 'gmailproxy.conf.tmpl'), cert, key, workdir,
                             'gmailproxy.conf.tmpl')
    args = types.SimpleNamespace(
        scenarios='S1', workers=a.workers, targets='nginx,contender', s3_sessions='1000',
        s4_idle=1000, s4_active=50, build_dir=BUILD, load_cpus=None, proxy_cpus=None,
        backend_threads=1, nginx=shutil.which('nginx') or 'nginx', start_timeout=20.0,
        workdir=workdir)
    bench.PROCS = bench.Procs(None)
    b = bench.Bench(args)
    b.workdir = workdir
    mail_module = _mail_module(args.nginx)
    b.a.nginx_mail_module = mail_module
    os.environ['PYTHONPATH'] = ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
    started = time.strftime('%Y-%m-%dT%H:%M:%S')
    try:
        b.start_common()
        for workers in [int(w) for w in a.workers.split(',')]:
            targets = [start(b, 'nginx-tls-w%d' % workers, nginx_tmpl,
                             '{{nginx}} -p {{workdir}} -c {{conf}}', workers),
                       start(b, 'gmailproxy-tls-w%d' % workers, ours_tmpl, a.contender_cmd,
                             workers)]
            results = {t['label']: [] for t in targets}
            for r in range(a.rounds):
                for t in targets if r % 2 == 0 else targets[::-1]:
                    bench.log('%s: T1+T2 round %d/%d' % (t['label'], r + 1, a.rounds))
                    results[t['label']].append(scenarios(b, loadgen, t, a))
            print('\nIMAPS benchmark %s (rounds %d, best round per row, %s per session in T2)'
                  % (started, a.rounds, a.tls_bytes))
            print_table(workers, best(results[targets[0]['label']]),
                        best(results[targets[1]['label']]))
            for t in targets:
                t['svc'].stop()
                b.services.remove(t['svc'])
    finally:
        for svc in reversed(b.services):
            svc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _mail_module(nginx):
    info = subprocess.run([nginx, '-V'], capture_output=True, text=True).stderr
    for word in info.split():
        if word.startswith('--modules-path='):
            path = os.path.join(word.split('=', 1)[1], 'ngx_mail_module.so')
            if os.path.exists(path):
                return path
    return ''


if __name__ == '__main__':
    main()
