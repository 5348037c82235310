"""Every SMTP reply text mailfilter sends, in one table.

Codes and phrases follow spamcontrol 2.7 / qmail (docs/behaviour/smtp.md#commands, #replies,
docs/behaviour/auth.md#dialogue) with RFC 3463 enhanced codes up front instead of qmail's
trailing `(#x.y.z)` (docs/behaviour/smtp.md#replies). Nothing else in the package writes
reply text: code that needs a reply names it here (`REPLIES["badmailfrom"]`) and may only fill the
`{}` placeholders a template declares.

Invariants: every entry is one line without CR/LF; every 2xx, 4xx and 5xx
reply carries an enhanced code (RFC 2034 §4) except the greeting and the
HELO/EHLO replies (RFC 2034 §3); intermediate 3xx replies (354, 334) carry
none.
"""
from __future__ import annotations

from typing import NamedTuple


_LINES: dict = {}

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF
MAX_REPLY_LINE = 512


class Reply(NamedTuple):
    code: int
    enhanced: str  # RFC 3463 "x.y.z"; "" for greeting/HELO/EHLO/334 lines
    text: str

    def format(self, **fields: object) -> "Reply":
        """A copy with the `{name}` placeholders of the text filled in."""
        return Reply(self.code, self.enhanced, self.text.format(**fields))   # not _replace: per message

    def line(self) -> bytes:
        """The reply as one CRLF-terminated line (memoized: most replies are
        the same few constants, sent several times per message)."""
        data = _LINES.get(self)
        if data is None:
            if self.enhanced:
                data = f"{self.code} {self.enhanced} {self.text}\r\n".encode()
            else:
                data = f"{self.code} {self.text}\r\n".encode()
            if len(data) > MAX_REPLY_LINE:  # a filled-in address or next-hop text
                cut = MAX_REPLY_LINE - 5
                while data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
                    cut -= 1
                data = data[:cut] + b"...\r\n"
            if self in _CONSTANTS:        # filled-in texts (queue ids) vary: not kept
                _LINES[self] = data
        return data

    def __str__(self) -> str:
        return self.line().decode().rstrip("\r\n")

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


def multiline(code: int, lines: list[str], enhanced: str = "") -> bytes:
    """`code-first` ... `code last`, RFC 5321 §4.2.1."""
    prefix = f"{enhanced} " if enhanced else ""
    out = []
    for i, text in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{prefix}{text}\r\n")
    return "".join(out).encode()


R = Reply

REPLIES: dict[str, Reply] = {
    # --- session ---------------------------------------------------------
    "greeting": R(220, "", "{greeting} ESMTP"),
    "helo": R(250, "", "{greeting}"),
    "quit": R(221, "2.0.0", "{greeting}"),
    "ok": R(250, "2.0.0", "ok"),
    "mail_ok": R(250, "2.1.0", "ok"),
    "rcpt_ok": R(250, "2.1.5", "ok"),
    "rset": R(250, "2.0.0", "flushed"),
    "noop": R(250, "2.0.0", "ok"),
    # nothing was verified: 2.0.0, not 2.1.5 "destination address valid" (RFC 3463)
    "vrfy": R(252, "2.0.0", "send some mail, i'll try my best"),
    "data_go": R(354, "", "go ahead"),
    "queued": R(250, "2.0.0", "ok {stamp} qp {qid}"),
    # --- command errors (docs/behaviour/differences.md#smtp-commands, docs/behaviour/smtp.md#commands) ---
    # unknown verbs: spamcontrol 2.7's 500 (vanilla qmail: 502),
    # docs/behaviour/smtp.md#commands, #replies
    "unrecognized": R(500, "5.5.1", "unimplemented"),
    "line_too_long": R(500, "5.5.2", "line too long"),
    "syntax": R(555, "5.5.4", "syntax error"),
    "syntax_args": R(501, "5.5.4", "syntax error in parameters or arguments"),
    "helo_syntax": R(501, "5.5.4", "syntax error, HELO/EHLO needs a domain"),
    "param_unknown": R(555, "5.5.4", "unsupported parameter {param}"),
    "mail_first": R(503, "5.5.1", "MAIL first"),
    "rcpt_first": R(503, "5.5.1", "RCPT first"),
    "nested_mail": R(503, "5.5.1", "nested MAIL command"),
    "address_too_long": R(553, "5.1.3", "address too long"),
    "bad_address": R(553, "5.1.3", "syntax error in mailbox address"),
    "too_many_errors": R(421, "4.7.0", "{host} too many errors, closing connection"),
    "timeout": R(421, "4.4.2", "{host} timeout, closing connection"),
    "session_deadline": R(421, "4.4.2", "{host} session too long, closing connection"),
    "command_timeout": R(421, "4.4.2", "{host} command line too slow, closing connection"),
    "data_too_slow": R(421, "4.4.2", "{host} message data too slow, closing connection"),
    "data_deadline": R(421, "4.4.2", "{host} message data took too long, closing connection"),
    "shutdown": R(421, "4.3.2", "{host} service shutting down, closing connection"),
    "too_many_conns": R(421, "4.7.0", "{host} too many connections, try again later"),
    "too_many_conns_ip": R(421, "4.7.0", "{host} too many connections from your address, try again later"),
    # anvil rates (docs/behaviour/limits.md#replies): 451 4.7.1, the client may retry later
    "too_many_msgs": R(451, "4.7.1", "too many messages from your address, try again later"),
    "too_many_rcpts_rate": R(451, "4.7.1", "too many recipients from your address, try again later"),
    # accept() found no descriptor: the client is answered on a spare one (serve/descriptors.py)
    "no_descriptors": R(421, "4.3.2", "{host} out of resources, try again later"),
    "internal_error": R(421, "4.3.0", "{host} internal error, closing connection"),
    "bare_lf": R(451, "4.5.2", "See https://cr.yp.to/docs/smtplf.html."),
    "non_ascii_envelope": R(553, "5.6.7", "non-ASCII address needs SMTPUTF8"),
    # --- policy (docs/behaviour/smtp.md#rcpt-checks, #replies) -----------------------------------
    "client_denied": R(553, "5.7.1", "sorry, your client address is not allowed here"),
    # % ! @ in the local part or a source route, from a client that may not relay
    "routing": R(553, "5.7.1", "sorry, no routing through this host (% ! @ or a source route)"),
    # at connect, instead of the greeting (docs/behaviour/control-files.md#dnsbl, RFC 5321 §3.1)
    "dnsbl_listed": R(554, "5.7.1", "Service unavailable; client [{ip}] blocked using {zones}"),
    "pregreet": R(554, "5.5.1", "protocol error: talking before the greeting"),
    "bad_helo": R(550, "5.7.1", "sorry, invalid HELO/EHLO greeting"),
    "helo_dns_temp": R(451, "4.4.3", "DNS temporary failure"),
    "mf_dns_temp": R(451, "4.4.3", "DNS temporary failure"),
    "sender_must_exist": R(553, "5.1.8", "sorry, your envelope sender must exist"),
    "sender_null_mx": R(550, "5.7.27", "sorry, your envelope sender domain takes no mail (null MX)"),
    "badmailfrom": R(553, "5.7.1", "sorry, your envelope sender is in my badmailfrom list"),
    "badrcptto": R(553, "5.7.1", "sorry, your envelope recipient is in my badrcptto list"),
    "rcpthosts": R(553, "5.7.1", "sorry, that domain isn't in my list of allowed rcpthosts"),
    "no_mailbox": R(550, "5.1.1", "sorry, no mailbox by that name"),
    "no_mailbox_450": R(450, "4.2.1", "sorry, mailbox currently unavailable"),
    "too_many_rcpts": R(452, "4.5.3", "sorry, too many recipients"),
    "size_exceeded": R(552, "5.3.4", "sorry, that message size exceeds my databytes limit"),
    "too_many_hops": R(554, "5.4.6", "too many hops, this message is looping"),
    "bad_content": R(554, "5.3.2", "sorry, invalid message content"),
    "notorious_data": R(503, "5.5.1", "DATA command not accepted at this time"),
    # --- CHUNKING (RFC 3030, docs/behaviour/smtp.md#chunking) ----------------------------------
    # a chunk read whole, not the last: the octets as sent (RFC 3030 §2: one 250 per BDAT)
    "bdat_ok": R(250, "2.0.0", "{octets} octets received"),
    "bdat_syntax": R(501, "5.5.4", "syntax: BDAT count [LAST]"),
    # no readable count: where the chunk ends is unknown, its octets cannot be skipped
    "bdat_lost": R(421, "4.5.2", "{host} BDAT without a chunk size, closing connection"),
    # RFC 3030 §2: BDATs pipelined after a refused one are read and discarded
    "bdat_failed": R(503, "5.5.1", "BDAT after a failed BDAT, chunk discarded"),
    "data_after_bdat": R(503, "5.5.1", "DATA after BDAT"),
    "rcpt_after_bdat": R(503, "5.5.1", "RCPT after BDAT"),
    # --- delivery (docs/behaviour/delivery.md#250-means-stored, docs/behaviour/smtp.md#data) -----
    "queue_temp": R(451, "4.3.0", "{text}"),
    "queue_perm": R(554, "5.3.0", "{text}"),
    "store_failed": R(451, "4.3.0", "temporary failure storing message"),
    "downstream_temp": R(451, "4.4.1", "next hop temporarily unavailable"),
    "downstream_rejected": R(554, "5.3.0", "{text}"),
    "downstream_rcpt_temp": R(451, "4.4.1", "next hop deferred <{rcpt}>: {text}"),
    # TLS to the next hop (delivery/forward.py): required but not offered, or failed
    "downstream_no_tls": R(451, "4.7.0", "next hop does not offer TLS, which is required"),
    "downstream_tls_failed": R(451, "4.7.0", "TLS to the next hop failed"),
    # RFC 6531 §3.4: an SMTPUTF8 message with a UTF-8 address or header field
    # is not sent to a next hop without SMTPUTF8; after the end of data a
    # permanent refusal is 554 (docs/behaviour/delivery.md#smtputf8)
    "downstream_no_smtputf8": R(554, "5.6.7", "next hop does not offer SMTPUTF8, "
                                "which this message needs"),
    # a 2xx/5xx recipient mix: the message went to the accepted ones (delivery.py)
    "downstream_partial": R(554, "5.3.0", "delivered to {delivered} of {total} recipients; "
                                          "next hop rejected <{rcpt}>: {text}"),
    # --- AUTH (docs/behaviour/auth.md#dialogue, docs/behaviour/smtp.md#replies) ------------------
    "auth_unavailable": R(503, "5.3.3", "auth not available"),
    "auth_already": R(503, "5.5.1", "you're already authenticated"),
    "auth_in_mail": R(503, "5.5.1", "no auth during mail transaction"),
    "auth_unknown_mech": R(504, "5.5.4", "auth type unimplemented"),
    "auth_cancelled": R(501, "5.0.0", "auth exchange cancelled"),
    "auth_malformed": R(501, "5.5.2", "malformed auth input"),
    "auth_line_too_long": R(500, "5.5.6", "authentication exchange line is too long"),
    "auth_ok": R(235, "2.7.0", "ok, go ahead"),
    "auth_failed": R(535, "5.7.8", "authentication failed"),
    "auth_temp": R(454, "4.7.0", "temporary authentication failure"),
    "auth_locked": R(454, "4.7.0", "too many authentication failures, try again later"),
    "auth_required": R(530, "5.7.0", "authentication required"),
    "auth_needs_tls": R(538, "5.7.11", "encryption required for requested authentication mechanism"),
    "auth_challenge": R(334, "", "{data}"),
    # --- STARTTLS (RFC 3207) --------------------------------------------------
    "starttls_go": R(220, "2.0.0", "Ready to start TLS"),
    "tls_unavailable": R(454, "4.7.0", "TLS not available due to temporary reason"),
    "tls_active": R(503, "5.5.1", "TLS already active"),
    "tls_in_mail": R(503, "5.5.1", "no STARTTLS during mail transaction"),
    "tls_required": R(530, "5.7.0", "Must issue a STARTTLS command first"),
    # --- delivery additions (docs/behaviour/delivery.md#qmail-queue-exit-codes: qmail-queue
    # exits whose enhanced
    # code is not 4.3.0 / 5.3.0) ---------------------------------------------
    "queue_temp_net": R(451, "4.4.1", "{text}"),
    "queue_temp_comm": R(451, "4.4.2", "{text}"),
    "queue_perm_addr": R(554, "5.1.3", "{text}"),
    # --- engine additions (smtpconn: HELP, docs/behaviour/smtp.md#commands) --------------------
    "help": R(214, "2.0.0", "{product} {version}"),
    "help_features": R(214, "2.0.0", "features: {features}"),
    "help_url": R(214, "2.0.0", "{url}"),
    # --- auth additions (authsession: docs/behaviour/auth.md#failures-and-lockout, #dialogue) ----
    "auth_too_many": R(421, "4.7.0", "{host} too many authentication failures, closing connection"),
}


_CONSTANTS = frozenset(r for r in REPLIES.values() if "{" not in r.text)


def reply(name: str, **fields: object) -> Reply:
    """The named reply, placeholders filled."""
    r = REPLIES[name]
    return r.format(**fields) if fields else r
