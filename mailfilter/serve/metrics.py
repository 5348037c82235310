"""`serve --metrics HOST:PORT`: where the numbers are exported from.

Job: pick the export for the process tree (docs/operations.md#metrics):
  - one process (no --workers): it serves its own counts at scrape time
    (metrics/collector.py) from the endpoint's thread;
  - --workers N: the parent makes a private directory for prometheus_client's
    multiprocess files and serves MultiProcessCollector over it; each worker
    writes its counts there once a second and at exit (metrics/mpfiles.py);
    a worker that exits is marked dead (its live gauges go, its counters stay).

Invariants: the endpoint is bound before the SMTP ports (single process)
or before the workers fork (parent), so a port in use is one line and exit
2; a worker closes its inherited copy of the parent's listening socket;
the directory is removed when the parent exits.
"""
from __future__ import annotations

from mailfilter.serve.config import StartupError, parse_listen


def endpoint(spec: str, registry):
    """The endpoint for `--metrics spec` serving `registry` (policyd's too);
    StartupError naming --metrics when the address is bad or taken."""
    from mailfilter.metrics.endpoint import Endpoint, EndpointError
    host, port = parse_listen(spec, "--metrics")
    try:
        return Endpoint(host, port, registry)
    except EndpointError as exc:
        raise StartupError(str(exc)) from None


def start_process(counts, opts, loop, worker: bool):
    """The export of one serving process (`worker`: under --workers): an
    object whose close() ends it (the endpoint stops; a worker writes once more)."""
    if worker:
        from mailfilter.metrics.mpfiles import FileWriter
        writer = FileWriter(counts)
        writer.start(loop)
        return writer
    from mailfilter.metrics.collector import registry_for
    return endpoint(opts.metrics, registry_for(counts))


class Parent:
    """The --workers parent's side: the directory and the endpoint over it."""

    def __init__(self, opts):
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from mailfilter.metrics import mpfiles
        self._mpfiles = mpfiles
        self.path = mpfiles.make_dir()
        try:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry, path=self.path)
            self.endpoint = endpoint(opts.metrics, registry)
        except BaseException:
            mpfiles.remove_dir(self.path)
            raise

    def in_child(self) -> None:
        """In a freshly forked worker: the parent's socket is not ours."""
        self.endpoint.close_in_child()

    def worker_gone(self, pid: int) -> None:
        self._mpfiles.worker_gone(pid, self.path)

    def close(self) -> None:
        self.endpoint.close()
        self._mpfiles.remove_dir(self.path)
