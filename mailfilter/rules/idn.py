"""The two spellings of an internationalized domain name in a rule entry.

Job: for a domain as a control file holds it (one character per byte,
docs/behaviour/control-files.md#reading-control-files), the spelling an
address may use instead: the A-label form (`xn--bcher-kva.example`,
RFC 3490 ToASCII) of a UTF-8 name, the UTF-8 U-label form (`bücher.example`,
ToUnicode) of a name with A-labels; both in the file's one-character-per-byte
form, so the compiler files the entry under both
(docs/behaviour/control-files.md#international-domain-names).

Conversions are IDNA 2003, Python's `encodings.idna` (nameprep, RFC 3491).
Only an exact pair is taken: the A-label form must convert back to the
U-label form in lower case, and an A-label to a U-label that converts back
to it. A name IDNA 2003 maps to another name (`straße` is `strasse`, a
full-width letter its ASCII one) keeps the spelling written: that other name
may be another domain (IDNA 2008, RFC 5891, tells them apart), and a rule
must not grow to cover it.

Invariants: ASCII letters are folded before any conversion (Python's codec
neither lower-cases `Example` nor reads `XN--`); a domain literal, an empty
name and a name without 8-bit bytes or `xn--` labels have no other spelling.
"""
from __future__ import annotations

from mailfilter.rules.format import quoted

# The "idna" codec (IDNA 2003) is the standard library's encodings.idna; the
# codec registry imports it (and its nameprep tables) on the first name that
# needs it, so rules without an IDN pay nothing for it.

__all__ = ["other_spellings", "IdnProblem"]


class IdnProblem(ValueError):
    """A UTF-8 name with no exact IDNA 2003 pair: the text says why."""


def other_spellings(domain: str) -> tuple[str, ...]:
    """The other spellings of `domain` (one character per byte, as read
    from a control file), in the same form, ASCII letters folded: the
    A-label form of a UTF-8 name (and its U-label form when written with
    capitals: `BÜCHER` is `bücher`), the U-label form of an A-label name;
    a leading `.` (a suffix entry) is kept; none for bytes that are not
    UTF-8. IdnProblem for a UTF-8 name IDNA 2003 cannot pair exactly."""
    dot = "." if domain.startswith(".") else ""
    raw = domain[len(dot):].encode("latin-1").lower()
    if not raw or raw.startswith(b"["):
        return ()
    if raw.isascii():
        if b"xn--" not in raw:
            return ()
        try:
            uname = raw.decode("idna")
            exact = uname.encode("idna") == raw
        except UnicodeError:
            return ()       # not an A-label after all: matched as written
        if not exact or uname.isascii():
            return ()
        return (dot + uname.encode("utf-8").decode("latin-1"),)
    try:
        uname = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ()           # never an address's domain (the compiler says so)
    try:
        aname = uname.encode("idna")
        back = aname.decode("idna")
    except UnicodeError as exc:
        raise IdnProblem(f"IDNA 2003 cannot write {quoted(uname)} in A-labels "
                         f"({exc.__cause__ or exc})") from None
    if back != uname.lower():
        raise IdnProblem(f"IDNA 2003 turns {quoted(uname)} into {quoted(back)}, another name")
    spelled = (dot + aname.decode("ascii"),)
    if back != uname:
        spelled += (dot + back.encode("utf-8").decode("latin-1"),)
    return spelled
