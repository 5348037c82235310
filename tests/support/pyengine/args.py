"""The pure-Python MAIL/RCPT argument syntax: the test oracle of
_core/smtp_args.pxi. Its contract is mailfilter/smtp/args.py's docstring;
never imported by the package.
"""
from __future__ import annotations

import re

from .events import ANOMALY_EIGHTBIT, ANOMALY_SYNTAX
from mailfilter.smtp.replies import REPLIES, Reply

__all__ = [
    "ParseError", "MAX_ADDRESS", "parse_path", "mail_params", "rcpt_params",
    "decode_address", "decode_xtext", "unknown_param",
]

MAX_ADDRESS = 900          # qmail addrparse limit (docs/behaviour/smtp.md#addresses step 6)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_XDIGITS = frozenset(b"0123456789ABCDEFabcdef")
_ESMTP_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")


class ParseError(Exception):
    """An argument error with the reply that answers it. ``bad``: it counts
    towards max_bad_commands (a client error, not a limit such as SIZE)."""

    def __init__(self, reply: Reply, tag: str = ANOMALY_SYNTAX, detail: object = None,
                 bad: bool = True) -> None:
        self.reply = reply
        self.tag = tag
        self.detail = detail
        self.bad = bad


def parse_path(arg: bytes, keyword: bytes) -> tuple[bytes, bytes]:
    """Split ``FROM:<path> params`` into (address bytes, params bytes).

    RFC 5321 keyword (case-insensitive), brackets required (spamcontrol,
    docs/behaviour/smtp.md#addresses step 2), spaces tolerated between the colon and
    ``<``, quotes and backslashes removed (docs/behaviour/smtp.md#addresses step 4), a source route
    dropped (step 3).
    """
    k = len(keyword)
    if arg[:k].upper() != keyword:
        raise ParseError(REPLIES["syntax"], detail="keyword")
    rest = arg[k:].lstrip(b" ")
    if rest[:1] != b"<":
        raise ParseError(REPLIES["syntax"], detail="brackets")
    if b'"' in rest or b"\\" in rest:
        addr, after = _quoted_path(rest)
    else:
        gt = rest.find(b">")
        if gt < 0:
            raise ParseError(REPLIES["syntax"], detail="brackets")
        addr = rest[1:gt]
        after = rest[gt + 1:]
    if after and after[:1] != b" ":
        raise ParseError(REPLIES["syntax"], detail="after path")
    if addr[:1] == b"@":
        colon = addr.find(b":")
        if colon < 0:
            raise ParseError(REPLIES["syntax"], detail="source route")
        addr = addr[colon + 1:]
    if len(addr) >= MAX_ADDRESS:
        raise ParseError(REPLIES["address_too_long"])
    return addr, after


def _quoted_path(rest: bytes) -> tuple[bytes, bytes]:
    """Slow path of parse_path: a path with quotes or backslashes (rare, <= max_line)."""
    out = bytearray()
    quoted = False
    i, n = 1, len(rest)
    while i < n:
        c = rest[i]
        if c == 0x5C:  # backslash: next byte literally
            i += 1
            if i < n:
                out.append(rest[i])
        elif c == 0x22:  # "
            quoted = not quoted
        elif c == 0x3E and not quoted:  # >
            return bytes(out), rest[i + 1:]
        else:
            out.append(c)
        i += 1
    raise ParseError(REPLIES["syntax"], detail="brackets")


def mail_params(rest: bytes, smtputf8: bool) -> dict:
    """The MAIL parameters we advertise: SIZE (RFC 1870), BODY (RFC 6152), AUTH
    (RFC 4954 §5, xtext-decoded) and SMTPUTF8 when ``smtputf8`` is offered
    (RFC 6531); each at most once. Anything else is unknown (555)."""
    params: dict = {}
    for p in rest.split():
        key, eq, val = p.partition(b"=")
        k = key.upper()
        if k == b"SIZE":
            if not eq or not val.isdigit() or len(val) > 20:
                raise ParseError(REPLIES["syntax_args"], detail="SIZE")
            v: object = int(val)
        elif k == b"BODY":
            v = val.upper().decode("latin-1")
            if v not in ("7BIT", "8BITMIME"):
                raise ParseError(REPLIES["syntax_args"], detail="BODY")
        elif k == b"AUTH":
            if not eq or not val:
                raise ParseError(REPLIES["syntax_args"], detail="AUTH")
            v = decode_xtext(val)
        elif k == b"SMTPUTF8" and smtputf8:
            if eq:
                raise ParseError(REPLIES["syntax_args"], detail="SMTPUTF8")
            v = True
        else:
            raise unknown_param(p)
        ks = k.decode("ascii")
        if ks in params:
            raise ParseError(REPLIES["syntax_args"], detail=ks)
        params[ks] = v
    return params


def rcpt_params(rest: bytes) -> dict:
    """RCPT takes no parameter we know (no DSN, RFC 3461); whitespace alone is
    no parameter, as at MAIL."""
    params = rest.split()
    if params:
        raise unknown_param(params[0])
    return {}


def decode_address(addr: bytes, smtputf8: bool) -> str:
    """The address as text: ASCII, or UTF-8 when the transaction announced
    SMTPUTF8 (RFC 6531 §3.4); 553 5.6.7 for 8 bits without it."""
    if _CONTROL.search(addr) is not None:
        # CR, NUL... inside <...>: no mailbox has them, and every next hop
        # (envelope headers, qmail-queue's NUL-separated envelope) would
        # refuse or mangle them; refuse at the command, not at DATA
        raise ParseError(REPLIES["bad_address"], ANOMALY_SYNTAX, "control character")
    if addr.isascii():
        return addr.decode("ascii")
    if not smtputf8:
        raise ParseError(REPLIES["non_ascii_envelope"], ANOMALY_EIGHTBIT, "address")
    try:
        text = addr.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(REPLIES["bad_address"], ANOMALY_EIGHTBIT, "utf-8") from None
    if any("\x80" <= c <= "\x9f" for c in text):
        # C1 controls: RFC 5198 §2, they MUST NOT appear
        raise ParseError(REPLIES["bad_address"], ANOMALY_EIGHTBIT, "control character")
    return text


def decode_xtext(value: bytes) -> str:
    """RFC 3461 §4 xtext decoding (``+XX``), as used by AUTH= (RFC 4954 §5);
    xtext is printable ASCII, so an 8-bit byte is a syntax error."""
    if not value.isascii():
        raise ParseError(REPLIES["syntax_args"], detail="xtext")
    if b"+" not in value:
        return value.decode("ascii")
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == 0x2B:
            h = value[i + 1:i + 3]
            if len(h) != 2 or h[0] not in _XDIGITS or h[1] not in _XDIGITS:
                raise ParseError(REPLIES["syntax_args"], detail="xtext")
            out.append(int(h, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", "surrogateescape")


def unknown_param(param: bytes) -> ParseError:
    """555 naming an unknown parameter (RFC 5321 §4.1.1.11) when its name is
    an esmtp-keyword (ALPHA/DIGIT/"-", §4.1.2) of sane length; anything else
    is 501 and is not echoed: client bytes in a reply could break its
    textstring (§4.2: HT, SP and printable ASCII) or its 512 octets."""
    key = param.partition(b"=")[0]
    if _ESMTP_KEYWORD.match(key) is None:
        return ParseError(REPLIES["syntax_args"], detail="parameter name")
    name = key.decode("ascii")
    return ParseError(REPLIES["param_unknown"].format(param=name), detail=name)
