"""The pure-Python SMTP engine, kept as the oracle of the Cython one.

These are the modules mailfilter.smtp.engine/events/args/data were before the
engine moved into mailfilter._core (docs/architecture.md#build): the same
grammar, transition table and DATA byte machine, written with bytes methods.
tests/smtp/test_engine_diff.py drives both with the same random SMTP streams
and compares events and reply bytes. Nothing in mailfilter imports them.
"""
