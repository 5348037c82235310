"""Arguments of MAIL and RCPT: the path, the ESMTP parameters, xtext, the address.

Pure functions from the bytes after the verb to Python values; every refusal
is a ``ParseError`` carrying the reply that answers it (from the reply table)
and what the log may say about it. The engine decides the sequence, these
functions only the syntax.

Invariants: an address that passes is free of control characters and is
ASCII unless the transaction announced SMTPUTF8 (RFC 6531 §3.4); no client
byte is echoed in a reply unless it is an esmtp-keyword (RFC 5321 §4.1.2).

The functions are compiled in ``mailfilter._core`` (_core/smtp_args.pxi);
this module hands the core the reply table (``smtp_install``) and re-exports
them. ``parse_path``: RFC 5321 keyword (case-insensitive), brackets required
(spamcontrol, docs/behaviour/smtp.md#addresses step 2), spaces tolerated
between the colon and ``<``, quotes and backslashes removed (step 4), a
source route dropped (step 3), at most MAX_ADDRESS octets (step 6).
``mail_params``: SIZE (RFC 1870), BODY (RFC 6152), AUTH (RFC 4954 §5,
xtext-decoded) and SMTPUTF8 when offered (RFC 6531); each at most once;
anything else is unknown (555). ``rcpt_params``: no parameter is known (no
DSN, RFC 3461). ``decode_address``: ASCII, or UTF-8 under SMTPUTF8; control
characters are refused. ``decode_xtext``: RFC 3461 §4. ``unknown_param``:
555 naming a parameter that is an esmtp-keyword, else 501 without echo.
"""
from __future__ import annotations

from mailfilter.core import core
from mailfilter.smtp.replies import REPLIES, multiline, reply

(MAX_ADDRESS, ParseError, decode_address, decode_xtext, mail_params, parse_path,
 rcpt_params, unknown_param) = (
    core.MAX_ADDRESS, core.ParseError, core.decode_address, core.decode_xtext,
    core.mail_params, core.parse_path, core.rcpt_params, core.unknown_param,
)

__all__ = [
    "ParseError", "MAX_ADDRESS", "parse_path", "mail_params", "rcpt_params",
    "decode_address", "decode_xtext", "unknown_param",
]

core.smtp_install(REPLIES, multiline, reply)
