"""What the rule compiler and the bundle loader both need: entry kinds, rule
flags, match modes, list roles, the tcp.smtp setting names and the shape of
a compiled rule set (Compiled, what bundle.write serialises).

Invariant: this module imports nothing from mailfilter. The server process
(rules/bundle.py, policy/) takes its constants from here, so serving a bundle
never imports the compiler side (rules/compiler.py, rules/controlfiles.py,
rules/prefilters.py); tests/rules/test_layering.py checks it.
Changing a value here changes the bundle format: bump bundle.FORMAT_VERSION.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- rule table
KINDS = (
    "exact", "domain", "suffix", "wildmat", "regex", "cidr", "host",
    "bypass", "antispoof", "unknownhost", "wellknown", "mismatch",
    "heloaccept", "recipient", "catchall", "unchecked", "signature", "default",
)
KIND_CODE = {name: i for i, name in enumerate(KINDS)}

FLAG_EXCEPTION = 1   # spamcontrol `!` exception line (accept), or tcprules deny=0
FLAG_NEGATED = 2     # qregex `!`: fires when the regex does NOT match
FLAG_ALLOW = 4       # tcp.smtp rule says allow

# Lists by role. Pattern lists get a ListMatcher; matching mode per list.
SPAMCONTROL_LISTS = ("badmailfrom", "badrcptto", "badhelo", "relaymailfrom")
QREGEX_LISTS = ("badmailfrom", "badmailfromnorelay", "badrcptto",
                "badrcpttonorelay", "badhelo", "badhelonorelay")
HOST_LISTS = ("rcpthosts", "morercpthosts")   # merged into L:rcpthosts
SIGNATURE_LISTS = {"badmimetypes": 9, "badloadertypes": 5}  # docs/behaviour/control-files.md#content-signatures

# tcp.smtp per-client settings we understand (docs/behaviour/tcp-smtp.md#settings,
# docs/behaviour/auth.md#modes).
KNOWN_SETTINGS = frozenset({
    "RELAYCLIENT", "HELOCHECK", "MFDNSCHECK", "DATABYTES", "MAXRECIPIENTS",
    "TARPITCOUNT", "TARPITDELAY", "SMTPAUTH", "RECIPIENTS450", "BADMIMETYPE",
    "BADLOADERTYPE", "RELAYMAILFROM", "NOBADHELO", "DISABLE_BADMAILFROM",
    "UCSPITLS",     # s/qmail: "" STARTTLS offered, "-" not offered, "!" required before MAIL
    "QMAILQUEUE",   # qmail: the qmail-queue program for this client (next hop qmail-queue: only)
    # the anvil limits per client (docs/behaviour/limits.md#per-client-settings)
    "MAXCONNIP", "MAXCONNRATE", "MAXMSGRATE", "MAXRCPTRATE",
})
HELOCHECK_MODES = ("", "!", ".", "=", "A", "M")
BADMIMETYPE_MODES = ("", "!", "+", "-")
UCSPITLS_MODES = ("", "-", "!")
NUMERIC_SETTINGS = ("DATABYTES", "MAXRECIPIENTS", "TARPITCOUNT", "TARPITDELAY",
                    "MAXCONNIP", "MAXCONNRATE", "MAXMSGRATE", "MAXRCPTRATE")

# Match modes of ListMatcher.last_match (how a text is cut into candidate keys).
MODE_EXACT, MODE_ADDRESS, MODE_HOST = 0, 1, 2

_DIGITS = frozenset("0123456789")


@dataclass
class Compiled:
    """One rules directory compiled (compiler.compile_dir), the input of
    bundle.write / bundle.from_compiled. Everything but `diagnostics` goes
    into the bundle; `diagnostics` are the compiler's controlfiles.Diagnostic
    (file:line, why the line was skipped) for the operator."""
    sections: dict[str, bytes]
    meta: dict
    rule_table: bytes
    n_rules: int
    fingerprint: bytes
    diagnostics: list
    counts: dict[str, int]


def leading_int(text: str) -> int | None:
    """The leading ASCII decimal digits of `text` as an int (qmail's scan_ulong,
    docs/behaviour/tcp-smtp.md#values), None if there are none. Only 0-9 count:
    str.isdigit() also takes Latin-1 superscripts such as "\xb2", which int() refuses."""
    n = 0
    while n < len(text) and text[n] in _DIGITS:
        n += 1
    return int(text[:n]) if n else None


# ---------------------------------------------------------------- diagnostics
# How much of an entry, pattern or value a message quotes
# (docs/behaviour/control-files.md#limits): enough to find the line, never
# the whole of a long one (a message is one log or terminal line).
MAX_SHOWN = 100


def _left_out(text: str, limit: int) -> str:
    return f"... ({len(text) - limit} more characters left out)"


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to `limit` characters, with a note of how many were left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + _left_out(text, limit)


def quoted(text: str, limit: int = MAX_SHOWN) -> str:
    """repr() of `text` cut to `limit` characters, the note outside the quotes."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + _left_out(text, limit)


# ---------------------------------------------------------------- dnsbl sites
# docs/behaviour/control-files.md#dnsbl: one `zone[=filter][*weight]` per
# line, postscreen_dnsbl_sites syntax. The filter is four dot-separated
# octet patterns: a number, or [list] of numbers and n..m ranges separated
# by `;` (127.0.0.[2..11], 127.0.[0..255].[2;3;9]).
DNSBL_DEFAULT_THRESHOLD = 1
MAX_DNSBL_WEIGHT = 1000


def _octet_pattern(text: str) -> tuple[tuple[int, int], ...]:
    """One octet pattern -> its ranges (lo, hi) inclusive; ValueError if bad."""
    if text.startswith("[") and text.endswith("]"):
        parts = text[1:-1].split(";")
    else:
        parts = [text]
    out = []
    for part in parts:
        lo, sep, hi = part.partition("..")
        if not sep:
            hi = lo
        if not (lo.isascii() and lo.isdigit() and hi.isascii() and hi.isdigit()):
            raise ValueError(f"octet pattern {quoted(text)}: expected a number, [n..m] or [a;b;c]")
        a, b = int(lo), int(hi)
        if not 0 <= a <= b <= 255:
            raise ValueError(f"octet pattern {quoted(text)}: numbers 0..255, low before high")
        out.append((a, b))
    return tuple(out)


def _split_octets(text: str) -> list[str]:
    """Split at the dots outside [...] (a range's `..` is inside)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "." and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def parse_dnsbl_site(text: str) -> tuple[str, tuple | None, int]:
    """`zone[=filter][*weight]` -> (zone, filter or None, weight). The zone is
    lower-cased without a trailing dot; the filter is four octet patterns
    (tuples of ranges); the weight an int (negative: an allowlist).
    ValueError with the problem when the line is not one of those."""
    site = text.strip()
    weight = 1
    star = site.rfind("*")
    if star >= 0:
        w = site[star + 1:]
        sign = -1 if w.startswith("-") else 1
        digits = w[1:] if w[:1] in "+-" else w
        if not (digits.isascii() and digits.isdigit()) or int(digits) > MAX_DNSBL_WEIGHT:
            raise ValueError(f"weight {quoted(w)}: expected an integer from "
                             f"-{MAX_DNSBL_WEIGHT} to {MAX_DNSBL_WEIGHT}")
        weight = sign * int(digits)
        site = site[:star]
    zone, eq, flt = site.partition("=")
    zone = zone.strip().lower().rstrip(".")
    labels = zone.split(".")
    if (len(labels) < 2 or len(zone) > 200 or
            not all(lab and len(lab) <= 63 and lab.isascii() and
                    all(c.isalnum() or c in "-_" for c in lab) for lab in labels)):
        raise ValueError(f"{quoted(zone)} is not a DNS zone name (zone[=filter][*weight])")
    if not eq:
        return zone, None, weight
    octets = _split_octets(flt.strip())
    if len(octets) != 4:
        raise ValueError(f"filter {quoted(flt)}: expected four octet patterns, as 127.0.0.[2..11]")
    return zone, tuple(_octet_pattern(o) for o in octets), weight


def dnsbl_filter_matches(flt: tuple | None, address: str) -> bool:
    """Does the IPv4 reply `address` (dotted quad) match `flt` (None: any)?"""
    if flt is None:
        return True
    parts = address.split(".")
    if len(parts) != 4:
        return False
    for ranges, part in zip(flt, parts):
        n = int(part)
        if not any(lo <= n <= hi for lo, hi in ranges):
            return False
    return True
