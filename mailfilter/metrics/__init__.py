"""Prometheus metrics (`serve --metrics HOST:PORT`, `policyd --metrics`).

The modules, each with one job (docs/operations.md#metrics):
  families.py   the table of metric families: names, types, help, labels
  counts.py     Counts: the plain numbers the hot path updates
  collector.py  the single-process export: a Collector reading Counts at scrape time
  mpfiles.py    the --workers export: workers write prometheus_client's
                multiprocess files once a second, the parent reads them
  endpoint.py   the HTTP endpoint, prometheus_client's server in a thread

With metrics off nothing is imported from prometheus_client and every hook
is one `is not None` test.
"""
from mailfilter.metrics.counts import Counts

__all__ = ["Counts"]
