"""The Received header mailfilter prepends to every accepted message.

Job: reproduce qmail-smtpd's two-line trace header (docs/behaviour/smtp.md#received-header, qmail
`received.c` + `date822fmt.c`) byte for byte, with the RFC 3848 protocol names:

    Received: from <REMOTEHOST> (HELO <helo>) (<AUTHUSER>@<REMOTEIP>)
      by <LOCAL> with <PROTO> (<TLS version> <cipher>); <d> <Mon> <yyyy> <hh>:<mm>:<ss> -0000

where <PROTO> is SMTP after HELO, ESMTP after EHLO, ESMTPA / ESMTPS /
ESMTPSA with AUTH and/or TLS, and UTF8SMTP / UTF8SMTPA / UTF8SMTPS /
UTF8SMTPSA for a transaction whose MAIL carried SMTPUTF8 (RFC 6531 §3.7.3)
(`protocol()`); inside TLS the version and cipher follow as a comment.

Invariants:
- LF line ends only: the message is in qmail storage format
  (docs/behaviour/delivery.md#storage-format).
- `(HELO <helo>)` only when the HELO/EHLO argument differs, ASCII
  case-insensitively, from the remote host name (qmail `case_diffs`); an empty
  HELO means "none given" and is omitted like qmail's default helohost.
- `<AUTHUSER>@` only for an authenticated session; it takes the place of
  qmail's TCPREMOTEINFO.
- Every byte of a variable part that is not `[A-Za-z0-9.@%+/=:-]` is written
  as `?` (qmail `safeput`), so no peer-supplied byte can break the header.
  qmail works per byte: the HELO argument (decoded by the engine as Latin-1,
  one character per wire byte) is turned back into its wire bytes, so each
  8-bit byte is one `?`; other non-ASCII text counts per UTF-8 byte.
- The date is always UTC written as `-0000`, day without leading zero,
  English month names regardless of locale.
- Each variable part is cut at FIELD_MAX (255) bytes, the length of a
  domain name, so the first line stays within RFC 5322 §2.1.1's 998
  characters whatever the client sent (a 500-byte HELO, a long AUTH user).
"""
from __future__ import annotations

import time
from typing import Protocol

__all__ = ["received_header", "safe", "date822", "Trace"]


class Trace(Protocol):
    """What the header is made of: the session facts of the message's
    envelope (mailfilter.delivery.Envelope has them). Named here so that
    this module needs nothing from delivery."""
    helo: str                   # Latin-1 decoded HELO/EHLO argument; "" when none
    client_ip: str
    client_host: str            # "unknown" when there is no PTR name
    auth_user: str | None
    tls: str | bool | None      # "TLSv1.3/TLS_AES_256_GCM_SHA384" in TLS; falsy in clear
    local_host: str
    esmtp: bool                 # EHLO (False: HELO)
    smtputf8: bool              # the transaction's MAIL carried SMTPUTF8 (RFC 6531)

_SAFE = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-"
)
# bytes.translate table: safe bytes map to themselves, every other byte to "?"
_TABLE = bytes(b if b in _SAFE else ord("?") for b in range(256))
# the TLS comment: version and cipher names are [A-Za-z0-9._-] and a space
_TLS_TABLE = bytes(b if b in _SAFE or b in b"_ " else ord("?") for b in range(256))
FIELD_MAX = 255
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def safe(value: str) -> bytes:
    """qmail `safeput`: unsafe bytes become `?` (docs/behaviour/smtp.md#received-header); at most
    FIELD_MAX bytes."""
    return value.encode("utf-8", "surrogateescape")[:FIELD_MAX].translate(_TABLE)


def wire_bytes(text: str) -> bytes:
    """The wire bytes of a Latin-1 decoded protocol argument (the HELO name);
    text that is not Latin-1 (a caller's own str) as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


_last_date: tuple[int, bytes] = (-1, b"")


def date822(when: float) -> bytes:
    """qmail `date822fmt`: `26 Sep 1995 04:46:54 -0000` (UTC, no leading zero).
    Every message of the same second gets the same text: formatted once."""
    global _last_date
    sec = int(when)
    if _last_date[0] == sec:
        return _last_date[1]
    t = time.gmtime(sec)
    text = (f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000").encode()
    _last_date = (sec, text)
    return text


def protocol(env: Trace) -> bytes:
    """The with-protocol (docs/behaviour/smtp.md#received-header): `SMTP` for a
    session that greeted with HELO (RFC 5321 / RFC 3848 §1); after EHLO the RFC 3848 §2 names
    ESMTP, ESMTPA (authenticated), ESMTPS (TLS), ESMTPSA. The S and A forms
    exist for ESMTP only (AUTH and STARTTLS need EHLO). A transaction under
    SMTPUTF8 is UTF8SMTP, UTF8SMTPA, UTF8SMTPS, UTF8SMTPSA (RFC 6531 §3.7.3,
    the same table for its extension)."""
    if env.smtputf8:
        base = b"UTF8SMTP"
    elif not env.esmtp:
        return b"SMTP"
    else:
        base = b"ESMTP"
    return base + (b"S" if env.tls else b"") + (b"A" if env.auth_user else b"")


def received_header(env: Trace, when: float | None = None) -> bytes:
    """The two-line Received header for `env`, LF-terminated
    (docs/behaviour/smtp.md#received-header)."""
    remotehost = env.client_host or "unknown"
    out = [b"Received: from ", safe(remotehost)]
    helo = wire_bytes(env.helo)
    # qmail: fakehelo = case_diffs(remotehost, helohost) ? helohost : 0
    # (case_diffs folds ASCII only, as bytes.lower() does)
    if helo and helo.lower() != remotehost.encode("utf-8", "surrogateescape").lower():
        out += [b" (HELO ", helo[:FIELD_MAX].translate(_TABLE), b")"]
    out.append(b" (")
    if env.auth_user:
        out += [safe(env.auth_user), b"@"]
    out += [safe(env.client_ip or "unknown"), b")\n  by ",
            safe(env.local_host or "unknown"), b" with ", protocol(env)]
    if env.esmtp and isinstance(env.tls, str):
        # the TLS version and cipher as a comment after the protocol (RFC 5321
        # §4.4 allows CFWS there; RFC 3848 names only the protocol)
        out += [b" (", env.tls.replace("/", " ").encode("ascii", "replace")[:FIELD_MAX]
                .translate(_TLS_TABLE), b")"]
    out += [b"; ",
            date822(time.time() if when is None else when), b"\n"]
    return b"".join(out)
