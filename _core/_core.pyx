# cython: language_level=3
"""mailfilter._core: the Cython hot paths, built as ONE extension (unity build).

Each concept lives in its own .pxi, included here in dependency order:
  fold.pxi       ASCII case folding and the hash function shared by all tables
  hashtab.pxi    open-addressing hash table over folded byte keys -> int
  aho.pxi        Aho-Corasick automaton over bytes -> int pattern ids
  wildmat.pxi    INN/spamcontrol wildmat matcher (case-insensitive)
  litindex.pxi   which of many literals occur in a text: 8-byte window index
  listmatch.pxi  one control file's matcher: hash + wildmat + RE2, last-match-wins
  cidr.pxi       longest-prefix trie for IPv4 and IPv6
  crammd5.pxi    HMAC-MD5 (RFC 2104) from stored inner/outer MD5 states
  client.pxi     the policy's Client value (built once per connection)
  logline.pxi    the decision log's key=value line, bare values checked in C
  smtp_events.pxi  the SMTP engine's states and events (fields in smtp.pxd)
  smtp_args.pxi    MAIL/RCPT argument syntax (path, parameters, xtext)
  smtp_data.pxi    the DATA byte machine (dot-unstuffing, end of data, header cap)
  smtp_engine.pxi  the sans-IO SMTP engine: framing, commands, transitions

The SMTP engine (smtp_*.pxi) is the exception to the blob rule below: it is
a set of cdef classes over the connection's input buffer, its fields typed in
smtp.pxd, its reply bytes handed in from mailfilter/smtp/replies.py; so is
the Client value.

Invariants: every builder returns one flat `bytes` blob; every runtime class is
constructed from a read-only buffer (bytes or a memoryview over an mmap) and
uses it in place, holding a reference so the buffer outlives the object. No
per-entry Python objects are created at load. Matchers take bytes and return
int rule ids, -1 for "no match". Nothing here logs or raises on a miss.
"""

include "fold.pxi"
include "hashtab.pxi"
include "aho.pxi"
include "wildmat.pxi"
include "litindex.pxi"
include "listmatch.pxi"
include "cidr.pxi"
include "crammd5.pxi"
include "client.pxi"
include "logline.pxi"
include "smtp_events.pxi"
include "smtp_args.pxi"
include "smtp_data.pxi"
include "smtp_engine.pxi"
