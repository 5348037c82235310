"""`mailfilter serve`'s process tree: one serving process, or `--workers N`.

Job: `run(opts)` checks the options, sets up the log (a syslog socket that
cannot be opened is a start-up error, exit 2) and either serves in
this process (lifecycle.run_process) or forks N workers that each bind the
same ports with SO_REUSEPORT and supervises them.

Invariants of the supervisor:
  - no other process holds a port before the workers fork (SO_REUSEPORT
    would otherwise let a second instance, with other rules and another
    spool, silently take part of the connections): check_ports_free;
  - SIGHUP/SIGTERM/SIGINT to the parent reach every worker;
  - a worker that dies is logged and replaced, at most one restart a second
    (a worker that dies at once would otherwise fork in a tight loop);
  - a worker that cannot start (exit 2: bad rules, port taken) stops them
    all with exit 2: the others would fail the same way;
  - a worker exits with its parent (PR_SET_PDEATHSIG), so a killed parent
    leaves no orphan serving old rules;
  - every process writes out its buffered log lines before it exits
    (docs/operations.md#when-the-log-cannot-keep-up);
  - with --metrics the parent serves the workers' sum (serve/metrics.py):
    its endpoint is bound before the first fork, a worker that exits is
    marked dead there, and the files go when the parent exits.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from mailfilter import log
from mailfilter.serve.config import ServeOptions, StartupError, check_options, listeners
from mailfilter.serve.lifecycle import bound_socket, early_hup, run_process
from mailfilter.serve.metrics import Parent as MetricsParent

logger = logging.getLogger("mailfilter")

RESTART_MIN_INTERVAL = 1.0      # a worker that keeps dying is restarted at most once a second
STOP_LOG_WAIT = 2.0             # seconds a clean stop may wait for syslog to take the last lines


def run(opts: ServeOptions) -> int:
    """`mailfilter serve` after its options are read: the exit status."""
    metrics = None
    try:
        check_options(opts)
        if opts.workers > 1:
            check_ports_free(opts)
            if opts.metrics is not None:
                metrics = MetricsParent(opts)
    except StartupError as exc:
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        return 2
    try:
        log.setup(opts.log_level, use_syslog=opts.syslog, syslog_address=opts.syslog_socket,
                  syslog_format=opts.syslog_format, buffer_size=opts.log_buffer)
    except log.LogSetupError as exc:    # no syslog daemon there: one line, not a traceback per line
        print(f"mailfilter serve: {exc}", file=sys.stderr)
        if metrics is not None:
            metrics.close()
        return 2
    signal.signal(signal.SIGHUP, early_hup.note)   # inherited by the workers until their loop runs
    try:
        if opts.workers <= 1:
            return run_process(opts, reuse_port=False)
        return supervise(opts, metrics)
    finally:
        if metrics is not None:
            metrics.close()
        log.flush(wait=STOP_LOG_WAIT)


def check_ports_free(opts: ServeOptions) -> None:
    """Before --workers forks: bind each address (--listen and --listen-tls)
    WITHOUT SO_REUSEPORT (and without listening), which fails when anybody
    holds the port, including another instance whose workers set
    SO_REUSEPORT and would otherwise share it silently."""
    for ls in listeners(opts):
        bound_socket(ls.host, ls.port, reuse_port=False, flag=ls.where).close()


def _die_with_parent(parent: int) -> None:
    """In a worker: SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG),
    so a killed supervisor leaves no orphan serving old rules."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:          # it died before prctl took effect
        os._exit(0)


def _spawn_worker(opts: ServeOptions, metrics: MetricsParent | None) -> int:
    """Fork one worker; the child serves and never returns here."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if metrics is not None:
                metrics.in_child()
            # not the parent's forwarding handlers (a restarted worker inherits them)
            signal.signal(signal.SIGHUP, early_hup.note)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent(parent)
            code = run_process(opts, reuse_port=True, worker=True)
        finally:
            log.flush(wait=STOP_LOG_WAIT)   # os._exit skips atexit
            os._exit(code)
    return pid


def supervise(opts: ServeOptions, metrics: MetricsParent | None = None) -> int:
    """The --workers parent: forward signals, restart dead workers, stop
    when one cannot start (exit 2) or on SIGTERM/SIGINT."""
    children: dict[int, float] = {}     # pid -> start time
    stopping: list[int] = []
    status = 0

    def forward(signum, _frame=None):
        if signum != signal.SIGHUP:
            stopping.append(signum)
        for child in list(children):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for _ in range(opts.workers):
        children[_spawn_worker(opts, metrics)] = time.monotonic()
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    if early_hup.take():                # came before `forward` was in place
        forward(signal.SIGHUP)
    while children:
        try:
            pid, wstatus = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        if metrics is not None:
            metrics.worker_gone(pid)
        code = os.waitstatus_to_exitcode(wstatus)
        if stopping:
            status = status or code
            continue
        if code == 2:                   # start-up error: the others are alike
            logger.error("worker %d could not start (exit 2); stopping", pid)
            status = 2
            forward(signal.SIGTERM)
            continue
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        logger.error("worker %d %s; starting a new one", pid, how)
        if time.monotonic() - started < RESTART_MIN_INTERVAL:
            time.sleep(RESTART_MIN_INTERVAL)
        if not stopping:
            children[_spawn_worker(opts, metrics)] = time.monotonic()
    return status
