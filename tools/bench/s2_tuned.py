#!/usr/bin/env python3
"""S2 (bulk) against a tuned nginx: ``proxy_buffer 64k`` and ``imap_client_buffer 64k``
(nginx's default is one 4 KiB page each way, which bounds its S2; issue 5's goal
"S2 >= 1.0 against nginx with proxy_buffer 64k"). gmailproxy keeps its defaults.
Same harness machinery as tls_bench.py: backend, auth server, CPU accounting.

    tools/run-bench --s2-tuned [--workers 1,2] [--rounds 2] [--bytes 50M]
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import types

import tls_bench
from tls_bench import BUILD, HARNESS, HERE, ROOT, bench

TUNED = '    proxy_buffer 64k;\n    imap_client_buffer 64k;\n'


def tuned_template(workdir: str) -> str:
    with open(os.path.join(HARNESS, 'conf', 'nginx-mail.conf.tmpl')) as f:
        text = f.read()
    text, found = re.subn(r'(mail\s*\{\n)', r'\1' + TUNED, text)
    assert found == 1
    path = os.path.join(workdir, 'nginx-mail-64k.conf.tmpl')
    with open(path, 'w') as f:
        f.write(text)
    return path


def rows(res):
    out = []
    for name, r in (('download', res['fetch']), ('upload', res['append'])):
        out.append(('S2 %s MB/s' % name, 'higher', r.get('MBps')))
        gb = (r.get('bytes') or 0) / 1e9
        out.append(('S2 %s proxy CPU s/GB' % name, 'lower',
                    (r['cpu']['proxy_s'] or 0) / gb if gb else None))
    out.append(('T errors', 'lower', sum(r.get('errors', {}).get('total', 0)
                                         for r in (res['fetch'], res['append']))))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--workers', default='1')
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--sessions', type=int, default=20)
    ap.add_argument('--bytes', default='50M')
    ap.add_argument('--contender-cmd', default='%s -m gmailproxy {{conf}}' % sys.executable)
    a = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix='gp-s2tuned.')
    args = types.SimpleNamespace(
        scenarios='S2', workers=a.workers, targets='nginx,contender', s3_sessions='1000',
        s4_idle=1000, s4_active=50, build_dir=BUILD, load_cpus=None, proxy_cpus=None,
        backend_threads=1, nginx=shutil.which('nginx') or 'nginx', start_timeout=20.0,
        workdir=workdir, nginx_mail_module=tls_bench._mail_module(shutil.which('nginx')
                                                                 or 'nginx'))
    bench.PROCS = bench.Procs(None)
    b = bench.Bench(args)
    b.workdir = workdir
    os.environ['PYTHONPATH'] = ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
    started = time.strftime('%Y-%m-%dT%H:%M:%S')
    try:
        b.start_common()
        for workers in [int(w) for w in a.workers.split(',')]:
            targets = [tls_bench.start(b, 'nginx-64k-w%d' % workers, tuned_template(workdir),
                                       '{{nginx}} -p {{workdir}} -c {{conf}}', workers),
                       tls_bench.start(b, 'gmailproxy-w%d' % workers,
                                       os.path.join(HERE, 'gmailproxy.conf.tmpl'),
                                       a.contender_cmd, workers)]
            results = {t['label']: [] for t in targets}
            for r in range(a.rounds):
                for t in targets if r % 2 == 0 else targets[::-1]:
                    bench.log('%s: S2 round %d/%d' % (t['label'], r + 1, a.rounds))
                    port = str(t['imap_port'])
                    out = {}
                    for mode in ('fetch', 'append'):
                        out[mode] = tls_bench.run_load(
                            b, b.load, t, [mode, '-p', port, '-P', 'imap', '-n',
                                           str(a.sessions), '-s', a.bytes, '-T', '240'], 300)
                        time.sleep(0.5)
                    results[t['label']].append(out)
            print('\nS2 against nginx with proxy_buffer/imap_client_buffer 64k %s '
                  '(rounds %d, best round per row, %d x %s)'
                  % (started, a.rounds, a.sessions, a.bytes))
            tls_bench.print_table(workers, tls_bench.best(results[targets[0]['label']], rows),
                                  tls_bench.best(results[targets[1]['label']], rows),
                                  title='S2 bulk', nginx_label='nginx-64k')
            for t in targets:
                t['svc'].stop()
                b.services.remove(t['svc'])
    finally:
        for svc in reversed(b.services):
            svc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
