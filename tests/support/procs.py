"""Processes as /proc shows them, and waiting for a condition (process-model tests)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def procs() -> dict[int, tuple]:
    """pid -> (state, ppid, pgrp) of every process."""
    found = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = Path('/proc/%s/stat' % entry).read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(')') + 2:].split()
            found[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return found


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``, sorted."""
    return sorted(p for p, (state, ppid, _) in procs().items() if ppid == pid and state != 'Z')


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = Path('/proc/%d/stat' % pid).read_text()
    except OSError:
        return False
    return stat[stat.rindex(')') + 2] != 'Z'


def wait_for(predicate, timeout=10.0, what='condition'):
    """The first true value of ``predicate()``, polled until ``timeout`` (then fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, 'timed out waiting for %s' % what
        time.sleep(0.05)


def two_workers(pid: int, timeout=10.0) -> list[int]:
    """The workers of master ``pid`` once it has exactly two."""
    return wait_for(lambda: len(children(pid)) == 2 and children(pid), timeout, '2 workers')
