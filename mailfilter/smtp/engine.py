"""Sans-IO SMTP server engine: bytes in, events out, replies back.

No sockets, no asyncio, no policy. The I/O shell feeds received bytes with
``receive_data()``, drains ``next_event()`` until ``NEED_DATA``, answers the
events that owe a reply with ``send()``, and writes ``data_to_send()`` once per
batch, so pipelined commands are answered in one write (RFC 2920,
docs/behaviour/smtp.md#command-lines). The pattern is h11's ``_connection.py`` / ``_state.py``; the
command table and the DATA byte machine follow qmail-smtpd
(docs/behaviour/smtp.md#commands, #states, #addresses, #data).

This module frames command lines, runs the command table and the transition
table, and queues replies. Its vocabulary (states, events) is in
``smtp/events.py``, the syntax of MAIL/RCPT arguments in ``smtp/args.py``, the
message bytes in ``smtp/data.py``. The engine keeps only what sequencing needs:
the state, the number of accepted recipients (``rcpt_count``, for the hard cap)
and whether the MAIL announced SMTPUTF8 (``mail_smtputf8``: RCPT addresses are
decoded by it); the transaction itself (sender, recipients, parameters) is the
application's, from the Mail and Rcpt events.

Theory of operation
-------------------

Input is framed in one of three modes:

* command mode: lines up to LF, one CR before it removed
  (docs/behaviour/smtp.md#command-lines); at most ``max_line`` octets including the terminator (RFC
  5321 §4.5.3.1). A longer line is answered ``500 5.5.2`` once and discarded up to its LF. A line
  ending in a bare LF is accepted and reported as ``Anomaly("BARE NEWLINE")``.
* auth mode: every line (up to ``max_auth_line`` octets) is an ``AuthResponse``.
* data mode: the byte machine of ``smtp/data.py``.
* chunk mode: the octets of a BDAT chunk (RFC 3030 §2), exactly as many as
  its count, to the same byte machine's ``step_chunk()``; then command mode again.

Session states (``conn.state``): IDLE, MAIL, RCPT, DATA, AUTH, CLOSED, and for
CHUNKING BDAT (a BDAT message between its chunks) and CHUNK (reading a chunk). The
application's reply to the pending event moves the state by this table,
``TRANSITIONS``, keyed by (state, event, reply class = code // 100), which
``send()`` executes (tests/smtp/test_engine.py holds the two equal)::

    state  event         reply    -> state  effect
    -----  ------------  -------     -----  ------
    IDLE   Helo          2        -> IDLE   helo
    IDLE   Helo          3 4 5    -> IDLE
    IDLE   Mail          2        -> MAIL   open
    IDLE   Mail          3 4 5    -> IDLE
    MAIL   Rcpt          2        -> RCPT   count
    MAIL   Rcpt          3 4 5    -> MAIL
    RCPT   Rcpt          2        -> RCPT   count
    RCPT   Rcpt          3 4 5    -> RCPT
    RCPT   DataStart     3        -> DATA   data
    RCPT   DataStart     2 4 5    -> IDLE   drop
    DATA   DataEnd       2 3 4 5  -> IDLE   done
    IDLE   AuthStart     2        -> IDLE   auth
    IDLE   AuthStart     3        -> AUTH
    IDLE   AuthStart     4 5      -> IDLE
    AUTH   AuthResponse  2        -> IDLE   auth
    AUTH   AuthResponse  3        -> AUTH
    AUTH   AuthResponse  4 5      -> IDLE
    IDLE   StartTLS      2        -> IDLE   tls
    IDLE   StartTLS      3 4 5    -> IDLE
    RCPT   BdatStart     3        -> CHUNK  chunk
    RCPT   BdatStart     2 4 5    -> IDLE   skip
    CHUNK  DataEnd       2 3      -> IDLE   done
    CHUNK  DataEnd       4 5      -> IDLE   fail

Effects:

* helo: ``helo`` := the name, ``esmtp`` := the verb was EHLO;
* open: a transaction opens: ``rcpt_count`` := 0, ``mail_smtputf8`` := the MAIL
  carried SMTPUTF8, ``bdat_failed`` := False;
* count: ``rcpt_count`` += 1;
* data: the byte machine starts a message (3 = the 354);
* drop: the transaction is forgotten (qmail ends it when DATA is refused);
* chunk: the byte machine starts a BDAT message and reads the first chunk (3 =
  go on, as the 354 to DATA; nothing is sent: BDAT has no intermediate reply);
* skip: the BDAT was refused: its chunk's octets are read and discarded, the
  transaction is forgotten and ``bdat_failed`` set;
* fail: the BDAT message was refused: the transaction is forgotten and
  ``bdat_failed`` set (every BDAT until the next MAIL, RSET or HELO is
  ``503 5.5.1``, its octets discarded, RFC 3030 §2);
* done: the transaction is forgotten; after ``DataEnd(bare_lf=True)`` the session
  closes (qmail drops it);
* auth: ``authenticated`` := True (3 = a 334 challenge: the next line is an
  AuthResponse);
* tls: the 220 to STARTTLS: every byte buffered after the STARTTLS line is
  discarded, never parsed (RFC 3207 §6; Postfix CVE-2011-0411: commands a
  client pipelines in clear must not run inside TLS). Input stops until the
  shell reports the handshake with ``tls_started()``, which forgets
  everything learnt in clear (RFC 3207 §4.2): HELO/EHLO, AUTH, the
  transaction; the state is IDLE and ``tls`` is True.

Whatever the table says, a 421 or 221 reply, or ``send(r, close=True)``, closes
the session (CLOSED, then ``Closed``). The engine moves the state itself only
here: HELO/EHLO and RSET end any transaction at once (IDLE; RFC 5321 §4.1.4), QUIT
(221), too many bad commands (421 4.7.0 after the error), ``abort()`` and EOF
close, and an over-long AUTH line ends the exchange (AUTH -> IDLE, 500 5.5.6).
CHUNKING (docs/behaviour/smtp.md#chunking): a chunk read whole that is not the
LAST and did not fail is answered ``250 2.0.0 <n> octets received`` (CHUNK ->
BDAT); a BDAT in BDAT reads the next chunk (BDAT -> CHUNK); a chunk that ends the
message (LAST, a bare LF, past databytes, a malformed BDAT inside the message)
queues a ``DataEnd``. A BDAT without a readable count is 501 then 421 and
closes (its octets cannot be told from commands); one with a count but other
bad arguments is 501, its octets discarded, and an open transaction fails
(MAIL/RCPT -> IDLE, ``bdat_failed``). A BDAT in IDLE or MAIL is 503 (MAIL
first, RCPT first), after a failed BDAT 503 5.5.1 (not a bad command: RFC 3030
§2 lets a pipelining client send them); the octets of each are discarded.

Sequence guards (503, the state decides; nothing changes): MAIL in MAIL or RCPT
(nested MAIL); RCPT in IDLE (MAIL first); DATA in IDLE (MAIL first) or MAIL (RCPT
first); AUTH once authenticated, then AUTH in MAIL or RCPT (no auth during mail
transaction); STARTTLS in MAIL or RCPT (no STARTTLS during mail transaction)
or once in TLS (TLS already active); STARTTLS with arguments is 501; in BDAT,
MAIL, AUTH and STARTTLS as in RCPT, DATA and RCPT are 503 (DATA/RCPT after BDAT). While a reply is owed ``next_event()`` returns ``PAUSED`` and
nothing further is parsed, so replies always leave in command order; commands
pipelined after the end of data stay buffered until the application has replied
to ``DataEnd``.

Who answers what. The engine answers, from the reply table, everything that needs
no policy: unknown verbs (500 unimplemented), over-long lines (500), syntax errors (555/501),
bad sequence (503), ``SIZE=`` above databytes (552), unknown parameters (555),
8-bit addresses without SMTPUTF8 (553 5.6.7), the recipient hard cap (452), NOOP,
VRFY (252), HELP (214), RSET (250), QUIT (221), too many bad commands (421), a BDAT
chunk that ends nothing (250). Informational events (Rset, Noop, Vrfy, Help, Quit,
Anomaly, DataChunk) owe nothing. The application answers Helo (``helo_reply()`` /
``ehlo_reply()``), Mail, Rcpt, DataStart (354 to go on), BdatStart (the same; the
354 is not sent), DataEnd (``data_end_check()`` gives the malformed BDAT / bare LF /
hop / size verdict in qmail order), AuthStart and AuthResponse (334 to go on).

Implementation. ``SMTPConnection``, the events, ``MultiReply`` and the table
are Cython in ``mailfilter._core`` (_core/smtp_engine.pxi, fields typed in
_core/smtp.pxd; docs/architecture.md#build): lines are framed and verbs
dispatched on the input buffer's bytes, the table above is compiled from
``TRANSITIONS`` into a C array at import, and the reply bytes come from
smtp/replies.py, handed in by ``smtp_install``. This module keeps the
configuration and the reference text; tests/support/pyengine/ holds the
pure-Python engine as the oracle of a differential test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mailfilter
from mailfilter.core import core
from mailfilter.smtp.events import (  # noqa: F401  (re-exported)
    ANOMALY_BARE_NEWLINE, ANOMALY_EIGHTBIT, ANOMALY_LINE_LIMIT, ANOMALY_SEQUENCE,
    ANOMALY_SYNTAX, ANOMALY_UNKNOWN, AUTH, BDAT, CHUNK, CLOSED, DATA, IDLE, MAIL, NEED_DATA,
    PAUSED, RCPT, Anomaly, AuthResponse, AuthStart, BdatStart, Closed, DataChunk, DataEnd,
    DataStart, Event, Help, Helo, Mail, Noop, Quit, Rcpt, Rset, StartTLS, Vrfy,
)
from mailfilter.smtp.replies import REPLIES, multiline, reply

# re-exported from the one door to mailfilter._core
(EFFECTS, TRANSITIONS, EngineError, MultiReply, SMTPConnection, host_of) = (
    core.EFFECTS, core.TRANSITIONS, core.EngineError, core.MultiReply, core.SMTPConnection,
    core.host_of,
)

__all__ = [
    "EngineConfig", "SMTPConnection", "EngineError", "MultiReply",
    "NEED_DATA", "PAUSED",
    "IDLE", "MAIL", "RCPT", "DATA", "AUTH", "CLOSED", "BDAT", "CHUNK",
    "Event", "Helo", "Mail", "Rcpt", "DataStart", "BdatStart", "DataChunk", "DataEnd",
    "AuthStart", "AuthResponse", "StartTLS", "Rset", "Quit", "Noop", "Vrfy", "Help",
    "Anomaly", "Closed",
    "ANOMALY_BARE_NEWLINE", "ANOMALY_LINE_LIMIT", "ANOMALY_UNKNOWN",
    "ANOMALY_SEQUENCE", "ANOMALY_SYNTAX", "ANOMALY_EIGHTBIT",
    "TRANSITIONS", "EFFECTS", "host_of",
]


# --- configuration ------------------------------------------------------------
@dataclass
class EngineConfig:
    greeting: str = "localhost"          # first word = host name
    max_line: int = 512                  # octets incl. CRLF, RFC 5321 §4.5.3.1
    max_auth_line: int = 12288           # SASL continuation lines, RFC 4954 §4
    databytes: int = 0                   # 0 = unlimited; advertised as SIZE n
    header_limit: int = 0                # header block octets kept (docs/behaviour/smtp.md#data); 0 = all
    max_bad_commands: int = 10
    max_recipients: int = 1000           # hard cap; policy may add a lower one
    max_hops: int = 100                  # used by SMTPConnection.data_end_check
    product: str = mailfilter.PRODUCT
    version: str = mailfilter.__version__
    features: list[str] = field(default_factory=list)   # HELP, e.g. "spamcontrol-compat"
    help_url: str = ""
    extra_ehlo: list[str] = field(default_factory=list)  # e.g. ["AUTH PLAIN LOGIN"]
    smtputf8: bool = False


core.smtp_install(REPLIES, multiline, reply, EngineConfig)
