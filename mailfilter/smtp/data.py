"""The DATA byte machine: the message from the wire to its stored form.

``DataReader`` consumes the engine's input buffer while the session is in the
DATA state and queues ``DataChunk`` events (the stored form: LF line ends,
dot-unstuffed) and, at the end of data, one ``DataEnd`` (docs/behaviour/smtp.md#data).

Theory of operation
-------------------

The first region gets a virtual CRLF in front (dropped again from the stored
form), which turns the "first line is '.'" case into the general
``CRLF . CRLF`` search and makes the first line's dot-stuffing regular. Each
pass takes everything buffered except a suffix that may begin an end marker
(``\\r``, ``\\r\\n``, ``\\r\\n.``, ``\\r\\n.\\r``: at most 4 bytes carried over),
so a region never ends inside a CRLF pair and never ends at a line start. Per
region, all bulk operations:

* end: ``find(b"\\r\\n.\\r\\n")``;
* bare LF: ``count(b"\\n") != count(b"\\r\\n")`` (the smuggling forms
  ``\\n.\\r\\n`` and ``\\r\\n.\\n`` are bare LFs); on a hit the data before the
  first bare LF is delivered, the rest of the input is discarded (the session
  ends) and ``DataEnd(bare_lf=True)`` is emitted at once;
* storage form: ``replace(b"\\r\\n", b"\\n").replace(b"\\n.", b"\\n")`` (CRLF ->
  LF, dot-unstuffing; a CR not followed by LF stays);
* size: length as stored; over ``databytes`` the chunks stop (the stored prefix
  up to exactly ``databytes`` octets is delivered), the input is consumed up to
  the end of data and ``DataEnd(oversized=True)`` reports the full stored size;
* header size: when ``header_limit`` is set (0, the default, keeps all;
  Postfix's header_size_limit is 102,400), the header block is kept up to
  ``header_limit`` octets. The block ends, as in Postfix, at the first line
  that is neither a header field (``name:``, RFC 5322 section 3.6.8) nor a
  continuation (SP or HT first): that line (an empty one included) and all
  after it are body, never cut; the excess of the block is dropped, a cut line
  gets its LF back (docs/behaviour/smtp.md#data). Per region, until the block
  ends: one regex search for a body line start and an ``rfind``; a line start
  still undecided at the region's end (at most 997 name octets, the longest
  field name a 998-octet line allows) is carried as a count and, past the
  limit, its octets are held back until it is decided. When the hop count has
  just seen the empty line below the limit, nothing is searched. The size and
  the hops still count what the client sent;
* hops: in the header block (up to the first empty line) lines starting with
  ``received`` or ``delivered`` (ASCII case-insensitive) are counted over the
  stored form; only complete lines are counted, an incomplete line's first 10
  bytes are carried to the next region.

BDAT (RFC 3030, docs/behaviour/smtp.md#chunking). After ``reset()``,
``chunk(n, last)`` announces each chunk and ``step_chunk()`` consumes at most
its ``n`` octets from the buffer (``chunk_left`` counts down; the next command
follows them). There is no end marker, no virtual line start and no
dot-unstuffing: CRLF -> LF, a CR not before LF kept; a CR that is a chunk's
last octet is held in the reader (not in the buffer, which holds the next
command) until the next chunk's first octet says whether it is a line end.
Size, hops, header cap and the bare LF check are those above, so a message
stores and counts the same by DATA and by BDAT. A bare LF stores what came
before it and discards the rest; the message ends at the chunk's end
(``DataEnd(bare_lf=True)``), as it does past databytes and at the LAST
chunk. ``chunk(n, last, bad=True)``: a malformed BDAT inside a message, its
octets discarded, the message ends with ``DataEnd(bad_bdat=True)``.

Invariants: the engine's buffer never holds more than 4 bytes of the message
between passes (BDAT: none; at most one CR is held in the reader); the bytes
after the end of data (the chunk) stay in the buffer, untouched (pipelined
commands wait for the reply to DataEnd).

The machine is compiled in ``mailfilter._core`` (_core/smtp_data.pxi), on the
buffer's bytes (memmem, memchr, one pass per region) rather than the bytes
methods named above; the pure-Python form is tests/support/pyengine/data.py,
its oracle.
"""
from __future__ import annotations

from mailfilter.core import core

(HEADER_SIZE_LIMIT, DataReader) = (
    core.HEADER_SIZE_LIMIT, core.DataReader,
)

__all__ = ["DataReader", "HEADER_SIZE_LIMIT"]
