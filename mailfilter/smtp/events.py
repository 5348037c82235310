"""The vocabulary of the sans-IO SMTP engine: session states, events, sentinels.

``SMTPConnection.next_event()`` returns an ``Event``, ``NEED_DATA`` (feed more
bytes) or ``PAUSED`` (a reply is still owed). Events whose ``owes_reply`` is
true must be answered with ``send()``; the others are informational.

Invariants: events are plain values (equality and hash over their slots, so
tests and logs compare them by content); states are the interned strings
below and are compared by identity on the hot path; an ``Anomaly`` never
carries client bytes (its ``detail`` is a verb, a length or a fixed word:
a line may hold a secret).

The classes are Cython ``cdef class``es in ``mailfilter._core``
(_core/smtp_events.pxi, fields in _core/smtp.pxd): readonly fields, equality
and hash by content, ``isinstance`` and ``type(ev)`` dispatch as before.
"""
from __future__ import annotations

from mailfilter.core import core

(ANOMALY_BARE_NEWLINE, ANOMALY_EIGHTBIT, ANOMALY_LINE_LIMIT, ANOMALY_SEQUENCE,
 ANOMALY_SYNTAX, ANOMALY_UNKNOWN, AUTH, BDAT, CHUNK, CLOSED, DATA, IDLE, MAIL, NEED_DATA,
 PAUSED, RCPT, STATES, Anomaly, AuthResponse, AuthStart, BdatStart, Closed, DataChunk,
 DataEnd, DataStart, Event, Help, Helo, Mail, Noop, Quit, Rcpt, Rset, StartTLS, Vrfy) = (
    core.ANOMALY_BARE_NEWLINE, core.ANOMALY_EIGHTBIT, core.ANOMALY_LINE_LIMIT,
    core.ANOMALY_SEQUENCE, core.ANOMALY_SYNTAX, core.ANOMALY_UNKNOWN, core.AUTH, core.BDAT,
    core.CHUNK, core.CLOSED, core.DATA, core.IDLE, core.MAIL, core.NEED_DATA, core.PAUSED,
    core.RCPT, core.STATES, core.Anomaly, core.AuthResponse, core.AuthStart, core.BdatStart,
    core.Closed, core.DataChunk, core.DataEnd, core.DataStart, core.Event, core.Help,
    core.Helo, core.Mail, core.Noop, core.Quit, core.Rcpt, core.Rset, core.StartTLS, core.Vrfy,
)

__all__ = [
    "IDLE", "MAIL", "RCPT", "DATA", "AUTH", "CLOSED", "BDAT", "CHUNK", "STATES",
    "NEED_DATA", "PAUSED",
    "Event", "Helo", "Mail", "Rcpt", "DataStart", "BdatStart", "DataChunk", "DataEnd",
    "AuthStart", "AuthResponse", "StartTLS", "Rset", "Quit", "Noop", "Vrfy", "Help",
    "Anomaly", "Closed",
    "ANOMALY_BARE_NEWLINE", "ANOMALY_LINE_LIMIT", "ANOMALY_UNKNOWN",
    "ANOMALY_SEQUENCE", "ANOMALY_SYNTAX", "ANOMALY_EIGHTBIT",
]
