#!/usr/bin/env python3
"""Profile gmailproxy under one benchmark load with py-spy (pip install py-spy).

Reuses the shared harness (../shared/bench, or $MAILBENCH_DIR): its fake backend, its
nginx auth server and its load generator; starts gmailproxy with tools/bench's template,
runs one load while ``py-spy record`` samples the proxy, and prints the functions with
the most samples (self and inclusive) plus the proxy's CPU per operation.

    tools/profile_bench.py s1                  # IMAP logins, 5 s
    tools/profile_bench.py s4 --duration 5     # closed-loop NOOPs, 1000 idle sessions
    tools/profile_bench.py fetch|append|pop3|smtp [--native] [--raw out.txt]

Build the C tools first (``tools/run-bench --build-only``).
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.environ.get('MAILBENCH_DIR', os.path.join(HERE, '..', 'shared', 'bench'))
BUILD = os.environ.get('MAILBENCH_BUILD_DIR', os.path.join(HERE, '.build', 'bench'))
sys.path.insert(0, HARNESS)
import bench  # noqa: E402  (the shared harness, read-only)


def load_args(kind, port, a):
    """mailload arguments for one load."""
    if kind == 's1':
        return ['login', '-p', str(port['imap']), '-P', 'imap', '-c', '50', '-d', str(a.duration)]
    if kind in ('pop3', 'smtp'):
        return ['login', '-p', str(port[kind]), '-P', kind, '-c', '50', '-d', str(a.duration)]
    if kind == 's4':
        return ['noop', '-p', str(port['imap']), '-P', 'imap', '-n', '50', '-k', '1000',
                '-r', '0', '-d', str(a.duration), '-c', '100']
    if kind.startswith('tls-'):
        mode = kind[4:]
        if mode == 'login':
            return ['login', '-S', '-p', str(port['pop3']), '-P', 'imap', '-c', '50', '-d',
                    str(a.duration)]
        return [mode, '-S', '-p', str(port['pop3']), '-P', 'imap', '-n', '20', '-s', a.bytes,
                '-T', '240']
    if kind in ('fetch', 'append'):
        return [kind, '-p', str(port['imap']), '-P', 'imap', '-n', '20', '-s', a.bytes,
                '-T', '240']
    raise SystemExit('unknown load %s' % kind)


def _function(frame):
    """'name (file.py:12)' -> 'name (file.py)'"""
    head, _, tail = frame.rpartition(':')
    return head + ')' if tail.endswith(')') and tail[:-1].isdigit() else frame


def summarize(raw_path, top):
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own, incl = collections.Counter(), collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(' ')
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [_function(f) for f in stack.split(';')]
            own[frames[-1]] += n
            for frame in set(frames):
                incl[frame] += n
    print('samples: %d' % total)
    for title, counter in (('self', own), ('inclusive', incl)):
        print('\n-- top %d by %s --' % (top, title))
        for frame, n in counter.most_common(top):
            print('%5.1f%%  %s' % (100.0 * n / max(total, 1), frame))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('load', choices=('s1', 's4', 'fetch', 'append', 'pop3', 'smtp',
                                     'tls-login', 'tls-fetch', 'tls-append'))
    ap.add_argument('--duration', type=float, default=5.0)
    ap.add_argument('--bytes', default='50M')
    ap.add_argument('--workers', type=int, default=1)
    ap.add_argument('--native', action='store_true', help='py-spy --native (C frames)')
    ap.add_argument('--rate', type=int, default=250, help='py-spy samples per second')
    ap.add_argument('--top', type=int, default=30)
    ap.add_argument('--raw', help='keep the collapsed stacks in this file')
    ap.add_argument('--no-profile', action='store_true', help='only CPU per operation')
    ap.add_argument('--ab', metavar='TREE',
                    help='no profiler: compare with the gmailproxy of another tree (a copy '
                         'of the code before a change), loads interleaved, --rounds each')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--cprofile', action='store_true',
                    help='run the proxy under cProfile instead (call counts per operation)')
    ap.add_argument('--callers', help='with --cprofile: print the callers of functions '
                    'matching this name')
    ap.add_argument('--strace', action='store_true',
                    help='count the proxy\'s system calls (strace -c) instead of py-spy')
    ap.add_argument('--perf', action='store_true',
                    help='perf record the proxy (kernel + C + Python frames) instead of py-spy')
    a = ap.parse_args()
    if not shutil.which('py-spy') and not a.no_profile:
        raise SystemExit('py-spy not found: pip install py-spy')

    workdir = tempfile.mkdtemp(prefix='gp-profile.')
    args = types.SimpleNamespace(
        scenarios='S1', workers=str(a.workers), targets='contender', s3_sessions='1000',
        s4_idle=1000, s4_active=50, build_dir=BUILD, load_cpus=None, proxy_cpus=None,
        backend_threads=1, nginx=shutil.which('nginx') or 'nginx', start_timeout=20.0,
        nginx_mail_module=_mail_module(),
        contender_conf_template=os.path.join(HERE, 'tools', 'bench', 'gmailproxy.conf.tmpl'),
        contender_cmd='%s -m gmailproxy {{conf}}' % sys.executable, workdir=workdir)
    if a.load.startswith('tls-'):    # IMAPS on the POP3 port, as tools/bench/tls_bench.py
        sys.path.insert(0, os.path.join(HERE, 'tools', 'bench'))
        import tls_bench
        bench_load = tls_bench.build_loadgen()
        cert, key = tls_bench.make_certificate(workdir)
        args.contender_conf_template = tls_bench.tls_template(
            args.contender_conf_template, cert, key, workdir, 'gmailproxy-tls.conf.tmpl')
    if a.cprofile:              # one process, so the profile sees the sessions
        with open(args.contender_conf_template) as f:
            text = f.read()
        args.contender_conf_template = os.path.join(workdir, 'gmailproxy.conf.tmpl')
        with open(args.contender_conf_template, 'w') as f:
            f.write('master_process off;\n' + text)
        args.contender_cmd = '%s -m cProfile -o %s -m gmailproxy {{conf}}' % (
            sys.executable, os.path.join(workdir, 'cprofile.out'))
    os.environ['PYTHONPATH'] = HERE + os.pathsep + os.environ.get('PYTHONPATH', '')
    bench.PROCS = bench.Procs(None)
    b = bench.Bench(args)
    b.workdir = workdir
    if a.load.startswith('tls-'):
        b.load = bench_load
    spy = None
    if a.ab:
        try:
            b.start_common()
            compare(a, b)
        finally:
            for svc in reversed(b.services):
                svc.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        return
    try:
        b.start_common()
        t = b.start_proxy('contender', a.workers)
        b.loadgen(['login', '-p', str(t['ports']['imap']), '-c', '20', '-d', '0.5'], 30)
        pids = t['svc'].pids()
        proxy_pid = [p for p in pids if _is_python(p)][-1]
        raw = a.raw or os.path.join(workdir, 'stacks.txt')
        if a.strace:
            spy = subprocess.Popen(['strace', '-c', '-f', '-p', str(proxy_pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
        elif a.perf:
            spy = subprocess.Popen(['perf', 'record', '-g', '-o', raw + '.perf', '-p',
                                    str(proxy_pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        elif not a.no_profile and not a.cprofile:
            cmd = ['py-spy', 'record', '--pid', str(proxy_pid), '--rate', str(a.rate),
                   '--format', 'raw', '--output', raw, '--nonblocking']
            if a.native:
                cmd.append('--native')
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
            time.sleep(1.0)
        res = b.measure(t, lambda: b.loadgen(load_args(a.load, t['ports'], a), 600))
        if spy is not None:
            spy.send_signal(2)
            _, err = spy.communicate(timeout=60)
            if a.strace:
                print(err)
            elif a.perf:
                report = subprocess.run(['perf', 'report', '-i', raw + '.perf', '--no-children',
                                         '--stdio', '--sort', 'dso,sym', '-g', 'none'],
                                        capture_output=True, text=True).stdout
                print('\n'.join(report.splitlines()[:12 + a.top]))
            else:
                summarize(raw, a.top)
        _print_result(a.load, res)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        for svc in reversed(b.services):
            svc.stop()
    if a.cprofile:
        _print_cprofile(os.path.join(workdir, 'cprofile.out'), res, a.top)
        if a.callers:
            import pstats
            pstats.Stats(os.path.join(workdir, 'cprofile.out')).print_callers(a.callers)
        if not a.raw:
            shutil.rmtree(workdir, ignore_errors=True)


def compare(a, b):
    """CPU per operation of this tree (A) and ``--ab`` (B), ABBA-interleaved rounds."""
    targets = {}
    for name, tree in (('A', HERE), ('B', os.path.abspath(a.ab))):
        b.a.contender_cmd = 'env PYTHONPATH=%s %s -m gmailproxy {{conf}}' % (tree, sys.executable)
        t = b.start_proxy('contender', a.workers)
        t['label'] = name
        b.loadgen(['login', '-p', str(t['ports']['imap']), '-c', '20', '-d', '0.5'], 30)
        targets[name] = t
    rows = {'A': [], 'B': []}
    for r in range(a.rounds):
        for name in ('A', 'B') if r % 2 == 0 else ('B', 'A'):
            t = targets[name]
            res = b.measure(t, lambda: b.loadgen(load_args(a.load, t['ports'], a), 600))
            rows[name].append(_per_op(res))
            print('%s round %d: %s' % (name, r + 1, _fmt(rows[name][-1])), flush=True)
    for name in ('A', 'B'):
        best = min(rows[name], key=lambda x: x[0])
        print('%s best: %s' % (name, _fmt(best)))


def _per_op(res):
    """(proxy CPU per op in us, or s/GB for bulk; rate; foreign share of a core)."""
    cpu = res.get('cpu', {})
    proxy = cpu.get('proxy_s') or 0.0
    foreign = cpu.get('other_s', 0) / max(cpu.get('wall_s', 1), 1e-9)
    if res.get('bytes'):
        return proxy / (res['bytes'] / 1e9), res.get('MBps', 0), foreign
    count = res.get('sessions_done') or res.get('ops') or 1
    rate = res.get('sessions_per_s') or res.get('ops_per_s') or 0
    return proxy / count * 1e6, rate, foreign


def _fmt(row):
    return 'cpu/op %.2f  rate %.0f  foreign %.0f%%' % (row[0], row[1], row[2] * 100)


def _print_cprofile(path, res, top):
    import pstats
    count = res.get('sessions_done') or res.get('ops') or 1
    stats = pstats.Stats(path)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append((tt, ct, nc, '%s:%d(%s)' % (os.path.basename(file), line, name)))
    print('\nper operation (%d): calls, own us, inclusive us' % count)
    for tt, ct, nc, where in sorted(rows, reverse=True)[:top]:
        print('%7.2f %8.1f %8.1f  %s' % (nc / count, tt / count * 1e6, ct / count * 1e6, where))


def _is_python(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return b'gmailproxy' in f.read()
    except OSError:
        return False


def _mail_module():
    info = subprocess.run([shutil.which('nginx') or 'nginx', '-V'], capture_output=True,
                          text=True).stderr
    for word in info.split():
        if word.startswith('--modules-path='):
            path = os.path.join(word.split('=', 1)[1], 'ngx_mail_module.so')
            if os.path.exists(path):
                return path
    return ''


def _print_result(kind, res):
    cpu = res.get('cpu', {})
    proxy = cpu.get('proxy_s') or 0.0
    keys = ('sessions', 'completed', 'ops', 'noops', 'bytes', 'errors')
    facts = {k: v for k, v in res.items() if k in keys or k.endswith('_per_s')}
    print('\nload %s: %s' % (kind, facts))
    print('cpu: %s' % cpu)
    count = res.get('sessions') or res.get('completed') or res.get('ops') or res.get('noops')
    if isinstance(count, (int, float)) and count:
        print('proxy CPU per operation: %.1f us' % (proxy / count * 1e6))
    if res.get('bytes'):
        print('proxy CPU per GB: %.2f s' % (proxy / (res['bytes'] / 1e9)))


if __name__ == '__main__':
    main()
