"""How an SMTPUTF8 address meets the rule lists.

Job: give the policy the text its matchers read for an envelope address.
Rule files are read one character per byte (Latin-1,
docs/behaviour/control-files.md#reading-control-files), so a UTF-8 entry
such as `jörg@example.com` is its UTF-8 bytes; the engine hands an address
sent under SMTPUTF8 (RFC 6531 §3.4) as decoded text. `match_form` turns that
text back into its UTF-8 bytes, one character per byte, so both sides meet
byte for byte; `fold` lower-cases A-Z only, as every matcher does
(docs/behaviour/control-files.md#case): a non-ASCII byte is compared as it
is, never case-folded (str.lower() would turn the lead byte 0xC3 of `ü`
into 0xE3).

Invariants: an ASCII address is returned as it is (the common case costs one
isascii() call); the match form of a non-ASCII address has only characters
below U+0100, so the matchers read it in place without a `?` replacement.
The address the policy hands on (delivery, the log) stays the decoded text.
"""
from __future__ import annotations

__all__ = ["match_form", "fold"]


def match_form(address: str) -> str:
    """`address` as the rule lists read it: its UTF-8 bytes, one character
    per byte (the form a control file's line has)."""
    if address.isascii():
        return address
    return address.encode("utf-8", "surrogateescape").decode("latin-1")


def fold(text: str) -> str:
    """ASCII lower-casing of a match form: A-Z to a-z, every other character
    (byte) kept."""
    if text.isascii():
        return text.lower()
    return text.encode("latin-1").lower().decode("latin-1")
