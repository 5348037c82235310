"""The single-process export: a prometheus_client Collector over Counts.

Job: at scrape time (in the HTTP endpoint's thread), turn Counts.samples()
into prometheus_client metric families; nothing runs between scrapes.
Under --workers the workers write files instead (mpfiles.py) and the
parent's MultiProcessCollector reads them; both read the same table
(families.py), so a metric is the same either way.

Invariant: a scrape never writes to the counts (the event loop's thread
is their only writer; Counts.samples copies each table).
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from mailfilter.metrics.counts import Counts
from mailfilter.metrics.families import COUNTER, FAMILIES, GAUGE, LATENCY_BUCKETS

_MAKERS = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily,
           "histogram": HistogramMetricFamily}
BUCKET_BOUNDS = tuple(floatToGoString(b) for b in LATENCY_BUCKETS) + ("+Inf",)


def cumulative(counts) -> list[tuple[str, float]]:
    """Non-cumulative bucket counts (+Inf last) as Prometheus's `le` buckets."""
    out, acc = [], 0
    for bound, n in zip(BUCKET_BOUNDS, counts):
        acc += n
        out.append((bound, acc))
    return out


class CountsCollector(Collector):
    """Every family of the Counts' program, from its current numbers."""

    def __init__(self, counts: Counts):
        self.counts = counts

    def collect(self):
        program = self.counts.program
        made = {f.name: _MAKERS[f.kind](f.name, f.help, labels=list(f.labels))
                for f in FAMILIES if program in f.programs}
        for fam, labels, value in self.counts.samples():
            metric = made[fam.name]
            if fam.kind == "histogram":
                buckets, total = value
                metric.add_metric(list(labels), cumulative(buckets), total)
            else:
                metric.add_metric(list(labels), value)
        return list(made.values())


def registry_for(counts: Counts) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding
    only the counts' collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CountsCollector(counts))
    return registry
