"""The --workers export: each worker writes its counts to prometheus_client's
multiprocess files, the parent reads them all.

Job:
  - `make_dir()` (the parent, before it forks): a private, new directory
    for the files (mkdtemp: mode 0700, empty), named in the environment as
    PROMETHEUS_MULTIPROC_DIR, removed at exit by `remove_dir()`;
  - `FileWriter` (each worker): writes Counts.samples() to this process's
    files (prometheus_client's MultiProcessValue: one mmap'ed file per
    type and pid) once a second from the event loop and at exit, never
    per event, so the hot path stays a dict update (counts.py);
  - `worker_gone(pid)` (the parent, when a worker exits): its `live*`
    gauges go (multiprocess.mark_process_dead); its counters stay, so a
    total never goes down when a worker is replaced.

Invariants: a counter's file holds the worker's running total (written
with set(), so writing twice is harmless); a gauge series that is gone from
the samples (the fingerprint of rules replaced by a reload) is written 0;
values written are at most FLUSH_INTERVAL old, and a worker killed outright
(SIGKILL) loses at most its last interval.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import multiprocess
from prometheus_client.values import MultiProcessValue

from mailfilter.metrics.collector import BUCKET_BOUNDS
from mailfilter.metrics.counts import Counts
from mailfilter.metrics.families import COUNTER, GAUGE

ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 1.0        # seconds between two writes of a worker's counts


def make_dir() -> str:
    """A new private directory for the files, named in the environment
    (the workers' MultiProcessValue finds it there)."""
    path = tempfile.mkdtemp(prefix="mailfilter-metrics-")
    os.environ[ENV] = path
    return path


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def worker_gone(pid: int, path: str) -> None:
    """A worker exited: its live gauges (open connections, rules) go."""
    multiprocess.mark_process_dead(pid, path)


class FileWriter:
    """This worker's counts to its multiprocess files; see the module docstring."""

    def __init__(self, counts: Counts):
        self.counts = counts
        self._value_class = MultiProcessValue()     # this process's pid: made after the fork
        self._values: dict[tuple, object] = {}      # (sample name, labels) -> MmapedValue
        self._gauges: set[tuple] = set()            # the keys of gauge samples
        self._written: dict[tuple, float] = {}      # (sample name, labels) -> value in the file
        self._timer = None

    def _write(self, fam, name: str, labelnames, labels, value: float) -> None:
        key = (name, labels)
        if self._written.get(key) == value:
            return
        v = self._values.get(key)
        if v is None:
            typ = fam.kind
            v = self._values[key] = self._value_class(
                typ, fam.name, name, list(labelnames), list(labels), fam.help,
                multiprocess_mode=fam.mode if typ == GAUGE else "")
            if typ == GAUGE:
                self._gauges.add(key)
        v.set(value)
        self._written[key] = value

    def flush(self) -> None:
        """Write every sample that changed since the last flush."""
        seen = set()
        for fam, labels, value in self.counts.samples():
            if fam.kind == COUNTER:
                name = fam.name + "_total"
            elif fam.kind == GAUGE:
                name = fam.name
            else:
                buckets, total = value
                lnames = (*fam.labels, "le")
                for bound, n in zip(BUCKET_BOUNDS, buckets):
                    self._write(fam, fam.name + "_bucket", lnames, (*labels, bound), n)
                self._write(fam, fam.name + "_sum", fam.labels, labels, total)
                continue
            seen.add((name, labels))
            self._write(fam, name, fam.labels, labels, value)
        for key in self._gauges - seen:
            if self._written.get(key) != 0:
                self._values[key].set(0)
                self._written[key] = 0

    def start(self, loop) -> None:
        """Flush every FLUSH_INTERVAL seconds on `loop` until close()."""
        def tick():
            self.flush()
            self._timer = loop.call_later(FLUSH_INTERVAL, tick)
        self._timer = loop.call_later(FLUSH_INTERVAL, tick)

    def close(self) -> None:
        """The last write (the worker stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
