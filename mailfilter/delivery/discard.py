"""discard -- the benchmark sink: every commit is 250, nothing is stored.

Job: measure the server without a store behind it. Never a production hop:
its 250 breaks "250 means stored" on purpose, and only an operator who
writes `discard` gets it. It still refuses a bad envelope like every hop.
"""
from __future__ import annotations

from mailfilter.delivery.base import Delivery, FixedResultSink, Sink, local_id, queued
from mailfilter.delivery.envelope import Envelope, check_envelope

__all__ = ["DiscardDelivery"]


class DiscardDelivery(Delivery, kind="discard", form="discard"):
    """Benchmark sink: always 250, stores nothing. Never a production hop."""

    spec = "discard"

    @classmethod
    def parse(cls, arg: str, **options) -> "DiscardDelivery":
        return cls(**options)

    def open(self, env: Envelope) -> Sink:
        check_envelope(env)
        # the result is made at commit, so its qid and time stamp are the commit's
        return FixedResultSink(lambda: queued(local_id(), "discard"))
