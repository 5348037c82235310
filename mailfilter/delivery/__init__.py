"""Delivery: hand an accepted message to the next hop; 250 only when stored.

The package is the one door to delivery: `Delivery.from_spec` (also
`from_spec`), `Sink`, `Envelope` and the hop classes are imported from here.
Layout: envelope.py (Envelope, address forms), base.py (Delivery, Sink,
DeliveryResult, shared replies), spool.py (the spooling sink), one module per
next hop (maildir.py, qmailqueue.py, forward.py with its connection in
nexthop.py and its client TLS context in tlsclient.py, discard.py). Each hop
registers its spec kind with the Delivery class; importing this package
imports every hop, and no module here imports the package itself, so there
is no import cycle.

Job: after DATA the server writes the message into a Sink and awaits
`sink.commit()`; the DeliveryResult carries the one reply to send. This is the
only `await` on the message path (docs/architecture.md#data-flow).

Invariant (docs/behaviour/delivery.md#250-means-stored): `ok=True` / 250 only after the next
hop has the message durably: the fsync'ed Maildir file renamed into new/ with
new/ fsync'ed, qmail-queue exit 0, or the downstream's 250 after DATA. Every
failure is a 4xx (the client retries) unless the next hop itself rejected the
message permanently (5xx from qmail-queue's permanent exits or downstream).
Never a silent accept, never a silently dropped recipient.

Message bytes arrive in qmail storage format
(docs/behaviour/delivery.md#storage-format): LF line ends, already dot-unstuffed; the caller writes
the Received header first (mailfilter.smtp.received, docs/behaviour/smtp.md#received-header).
Bodies are never held whole in memory: maildir holds at most CHUNK (64 KB), then
writes straight into tmp/ (a smaller message's file is made at commit), the other
sinks spool to a SpooledTemporaryFile (1 MB in memory, then disk). So qmail-queue starts
after the end of data, not before the 354 as in qmail-smtpd
(docs/behaviour/delivery.md#storage-format): the message is checked (size, hops, content) before
anything is queued, and a qmail-queue that cannot run is found at start-up (`check()`).

Specs (`Delivery.from_spec`):

maildir:DIR
    DIR/{tmp,new,cur} are created on first use. Each message is written to
    tmp/<time>.M<usec>P<pid>Q<n>.<host> (cr.yp.to/proto/maildir.html; the file
    is made once CHUNK bytes are pending, else at commit by the committer), fsync'ed,
    renamed into new/, then new/ is fsync'ed. The envelope is kept in the file
    as prepended headers: `Return-Path: <sender>` and one
    `X-Envelope-To: <rcpt>` per recipient, before the Received header; each
    address as an RFC 5321 §4.1.2 path (`smtp_path`: the local part quoted
    when it is not a Dot-string, so `<"john smith"@example.org>`; CR, LF and
    NUL in an address would be written as `?`). The qid in
    `250 ok <stamp> qp <qid>` is the M..P..Q.. part of the file name.
    Group commit (see maildir.py's `_Committer`): one committer thread takes every pending
    commit, fsyncs their files in parallel on a small thread pool, renames
    each into new/ and fsyncs new/ ONCE for the batch; each commit resolves
    only after its batch's directory fsync (one event-loop wake-up per batch). Any OSError
    (ENOSPC, EFBIG, EACCES, ENOTDIR, ...) -> the tmp file is removed, nothing
    is in new/, 451 store_failed, and the next message first re-checks (and
    remakes) tmp/, new/, cur/. A new/ that vanished under a message in flight
    is made again (fsync'ed into DIR) and the rename retried once. A process
    killed mid-message leaves at most a file in tmp/ (the Maildir spec's
    36-hour tmp/ cleanup removes it: at start and by the hourly sweep, tmpsweep.py, docs/behaviour/delivery.md#maildir).
qmail-queue:PROG [ARGS]
    PROG and its arguments are split on whitespace. The message goes to the
    child's fd 0, the envelope `F<sender>\\0T<rcpt>\\0...\\0` to its fd 1
    (qmail-queue(8)). Exit 0 -> 250 with qid = child pid; other exits map to
    451/554 with qmail.c's texts (docs/behaviour/delivery.md#qmail-queue-exit-codes,
    `(#x.y.z)` dropped, the enhanced code carried up front); killed by a signal -> 451 qq crashed;
    spawn failure -> 451 unable to exec qq; exit 0 after we failed to write
    the message -> 451 qq read error (qmail.c does the same). A PROG that
    does not exist or is not executable is a start-up error (`check()`).
    A child still running after HANDOVER_TIMEOUT (540 s) is killed: 451 qq
    timeout.
smtp:HOST:PORT, lmtp:HOST:PORT, smtp+tls-required:HOST:PORT, lmtp+tls-required:HOST:PORT
    STARTTLS whenever the next hop offers it (RFC 3207, opportunistic as RFC
    7435: unverified unless `tls_verify=True` or `tls_ca=FILE` is given, which
    also makes TLS required), then EHLO/LHLO again; a refused or broken
    STARTTLS is 451 4.7.0, never a fallback to clear; the +tls-required
    kinds refuse a hop without STARTTLS (451 4.7.0). forward.py's docstring
    has the details. An SMTPUTF8 transaction (Envelope.smtputf8) carries
    SMTPUTF8 to a hop that lists it; to one that does not, a message with a
    UTF-8 address or header is 554 5.6.7 and not sent, an ASCII one goes
    without the parameter (RFC 6531 §3.4, docs/behaviour/delivery.md#smtputf8).
    One downstream connection per message (EHLO/LHLO, MAIL, RCPT each, DATA;
    LF -> CRLF and dot-stuffing done in bulk). When the next hop's EHLO/LHLO
    lists them, MAIL FROM carries `SIZE=` (RFC 1870: the spooled size with
    CRLF line ends, so a smaller limit downstream refuses at MAIL, not after
    the whole body) and `BODY=8BITMIME` when the message holds an 8-bit byte
    (RFC 6152; decided from the bytes, not from the client's declaration).
    An 8-bit message to a hop without 8BITMIME goes as is (qmail-remote
    does the same; no MIME down-conversion here). MAIL/RCPT carry RFC 5321
    §4.1.2 paths (`smtp_path`): the local part as a Dot-string when it
    is one, else a Quoted-string; `<>` for the null sender. (qmail-queue's
    envelope takes the raw address: no quoting there.) 250 only after the
    downstream's 2xx to the end of data. Downstream 4xx, refused/reset
    connection, protocol garbage (a malformed line, a code outside 200-599),
    timeouts (connect 30 s, command 300 s, the whole hand-over 540 s:
    HANDOVER_TIMEOUT, under a client's 10-minute wait) -> 451. A 5xx to
    MAIL, DATA or the end of data -> 554 with the downstream's text and its
    enhanced code when it gave a valid 5.x.y (else 5.3.0); 5xx at the
    greeting or EHLO says nothing about the message and is 451.
    RCPT: any 4xx -> 451 without sending DATA (the client retries the
    message); all 5xx -> 554; some 5xx and the rest 2xx -> the message goes
    to the accepted ones, and the client's reply is a 554 saying so
    ("delivered to 1 of 2 recipients; next hop rejected <r>: ...", the next
    hop's enhanced code): SMTP has one reply per message, a 250 would drop
    the refused recipient silently, and a 451 (as before) held the good
    recipients' mail until the client's queue expired, then bounced it.
    LMTP (RFC 2033 §4.2): one reply per accepted recipient after DATA, kept in
    `per_recipient` (one downstream reply per envelope recipient, in order).
    All 2xx -> 250; all 5xx -> 554; 2xx and 5xx -> the same 554 "delivered
    to N of M"; any 4xx -> 451: recipients already delivered may then get a
    duplicate when the client retries, chosen over loss (a deferral is
    short-lived; a permanent refusal would have repeated the delivery on
    every retry until the client gave up).
discard
    Explicit benchmark sink: commit -> 250, nothing is written anywhere.
"""
from __future__ import annotations

from mailfilter.delivery.base import HANDOVER_TIMEOUT, Delivery, DeliveryResult, Sink
from mailfilter.delivery.envelope import Envelope, smtp_path
from mailfilter.delivery.spool import SpoolFacts

# the hops, in the order the spec error lists them; importing them registers them
from mailfilter.delivery.maildir import MaildirDelivery
from mailfilter.delivery.qmailqueue import QQ_EXITS, QmailQueueDelivery
from mailfilter.delivery.forward import LmtpDelivery, SmtpDelivery, smtp_encode
from mailfilter.delivery.discard import DiscardDelivery

__all__ = [
    "Envelope", "DeliveryResult", "Delivery", "Sink", "SpoolFacts", "from_spec",
    "MaildirDelivery", "QmailQueueDelivery", "SmtpDelivery", "LmtpDelivery", "DiscardDelivery",
    "HANDOVER_TIMEOUT", "QQ_EXITS", "smtp_encode", "smtp_path",
]

from_spec = Delivery.from_spec
