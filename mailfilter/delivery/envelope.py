"""The envelope of one accepted message, and its addresses in wire form.

Job: the facts the SMTP session hands to delivery with the message (sender,
recipients, who the client was), the check every hop makes before it opens a
sink (`check_envelope`), and the two ways an address is written to a next
hop: as an RFC 5321 path (`smtp_path`: smtp/lmtp commands, maildir headers)
or as raw bytes (`text_bytes`: the qmail-queue envelope, which takes the
address unquoted).

Invariant: addresses arrive as the SMTP parser gives them: unquoted, never
empty recipients, never CR, LF or NUL; anything else is a caller bug and is
refused loudly, never written to a next hop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Envelope", "check_envelope", "smtp_path", "text_bytes"]


@dataclass
class Envelope:
    sender: str                 # "" for the null sender <>
    recipients: list[str]
    helo: str                   # as the engine decodes it (Latin-1: one char per byte); "" when none
    client_ip: str
    client_host: str            # "unknown" when there is no PTR name
    auth_user: str | None
    tls: str | bool | None      # "TLSv1.3/CIPHER" when received over TLS; falsy in clear
    local_host: str
    esmtp: bool = True          # the session greeted with EHLO (False: HELO)
    # the transaction's MAIL carried SMTPUTF8 (RFC 6531): its addresses may be
    # UTF-8, and a next hop gets it only if it offers SMTPUTF8
    # (docs/behaviour/delivery.md#smtputf8)
    smtputf8: bool = False
    # the client's tcp.smtp QMAILQUEUE: its qmail-queue program, used instead of
    # the hop's when the next hop is qmail-queue: (docs/behaviour/tcp-smtp.md#settings)
    qmailqueue: str | None = None


def text_bytes(s: str) -> bytes:
    """An address or host name as bytes for a next hop: UTF-8, with the
    bytes the parser could not decode (kept as lone surrogates) restored as
    they arrived."""
    return s.encode("utf-8", "surrogateescape")


# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3); 8-bit bytes count as atext
# (RFC 6531 UTF8-non-ascii) so an 8-bit local part is passed as written.
_ATEXT = rb"A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-"
_DOT_STRING = re.compile(rb"[" + _ATEXT + rb"]+(?:\.[" + _ATEXT + rb"]+)*\Z")


def smtp_path(addr: str) -> bytes:
    """The RFC 5321 §4.1.2 path for an envelope address as the parser gives
    it (unquoted): `<>` for the null sender; the local part as a Dot-string
    when it is one, else as a Quoted-string with `"` and `\\` escaped; the
    domain (after the last `@`) as is. Used for the smtp/lmtp MAIL and RCPT
    commands and for the maildir Return-Path / X-Envelope-To headers."""
    if not addr:
        return b"<>"
    raw = text_bytes(addr)
    local, at, domain = raw.rpartition(b"@")
    if not at:
        local, domain = raw, b""
    if not _DOT_STRING.match(local):
        local = b'"' + local.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"<" + local + at + domain + b">"


_ADDR_FORBIDDEN = re.compile(r"[\r\n\0]")


def check_envelope(env: Envelope) -> None:
    """Caller bugs, refused loudly with ValueError: no recipients
    (qmail-queue would accept and deliver to nobody, a silent loss,
    docs/behaviour/delivery.md#250-means-stored), or CR/LF/NUL in an address (SMTP command
    injection downstream; NUL splits the qmail-queue envelope). The SMTP parser never
    produces either."""
    if not env.recipients:
        raise ValueError("delivery: envelope has no recipients")
    for addr in (env.sender, *env.recipients):
        if _ADDR_FORBIDDEN.search(addr):
            raise ValueError(f"delivery: CR, LF or NUL in envelope address {addr!r}")
