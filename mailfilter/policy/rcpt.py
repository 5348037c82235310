"""The RCPT stage as data: spamcontrol's recipient checks, in its order.

Job: decide one RCPT for a SessionPolicy. SessionPolicy.rcpt counts the
RCPT, rewrites a domain literal naming this host, runs the checks of
RCPT_CHECKS in this order (the first one that returns a Verdict answers),
and otherwise accepts:

| #  | check          | clients   | needs   | refuses when                                       |
|----|----------------|-----------|---------|----------------------------------------------------|
| 1  | client_denied  | all       | -       | tcp.smtp denies the client (greeted all the same)  |
| 2  | auth_required  | all       | -       | SMTPAUTH="!..." and the client has not AUTHed      |
| 3  | helo_missing   | non-relay | -       | a one-character HELOCHECK and no HELO/EHLO         |
| 4  | bad_helo       | all*      | HELO    | HELO found the name bad (and answered 250)         |
| 5  | helo_dns       | non-relay | HELO    | HELOCHECK A/M: no such name; DNS failing: 451      |
| 6  | sender_dns     | non-relay | MAIL    | MFDNSCHECK: no such domain, a null MX; failing: 451 |
| 7  | rcpthosts      | non-relay | -       | no rcpthosts line names the recipient's domain     |
| 8  | routing        | non-relay | -       | % ! or @ in the local part, or a source route      |
| 9  | tarpit_limit   | non-relay | history | TARPITCOUNT unknown recipients so far (452)        |
| 10 | tarpit_delay   | non-relay | history | never: past TARPITCOUNT RCPTs, answers are delayed |
| 11 | recipients     | non-relay | -       | no recipients line names the address (550 or 450)  |
| 12 | badmailfrom    | all       | MAIL    | MAIL found the sender listed (and answered 250)    |
| 13 | badrcptto      | all       | -       | badrcptto (non-relay: or badrcpttonorelay) has it  |
| 14 | max_recipients | all       | history | MAXRECIPIENTS recipients accepted already (452)    |

* bad_helo binds relay clients in the qregex dialect only, and only for a
  badhelo listing: badhelonorelay and HELOCHECK spare them.

Accepted: a relay client's recipient gets the RELAYCLIENT value appended and
the verdict says why it may relay; anyone else's names the rcpthosts or
recipients line that let it in. Relay clients (RELAYCLIENT, AUTH, or a
relaymailfrom sender with RELAYMAILFROM) skip the non-relay rows: the split
horizon. The routing row is not spamcontrol's (qmail hands such addresses
on as they are): a downstream MTA may route `u%other@local`, `other!u@local`
or `"u@other"@local` to another host, so a client that may not relay cannot
send them (docs/behaviour/control-files.md#routing; PolicyOptions.allow_routing
lifts it). Differences from spamcontrol 2.7's smtp_rcpt: no STARTTLS and no
LOCALMFCHECK rows (not implemented), SIZE is refused at MAIL, and
MAXRECIPIENTS counts accepted recipients only.

Invariants: a check is a function (session, recipient, relay) -> Verdict
or None, where `recipient` is the address after the literal rewrite (a list
reads it as its UTF-8 bytes, `address_bytes`, or through the matchers' `utf8`
entry points: an SMTPUTF8 address meets a UTF-8 rule entry byte for byte,
A-Z folded) and `relay`
whether the client may relay; it
decides from these and the session alone, whatever ran before it (a refusal
after tarpit_delay carries the rcpt_delay it set). Only tarpit_delay
(rcpt_delay), rcpthosts and recipients (rcpt_rule, the line that let the
recipient in), recipients (failed_recipients) and tarpit_limit (notorious)
change the session. Calls are what this stage costs, so SessionPolicy.rcpt
runs a plan: the rows that can fire for the client's profile (RcptCheck.
wanted) and the session's state ("needs": a verdict or DNS answer kept from
HELO or MAIL, or an earlier RCPT); its answers are those of the full table.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, NamedTuple

from mailfilter.rules.format import MODE_ADDRESS, MODE_HOST
from mailfilter.policy.verdict import DNS_FAIL, DNS_NULLMX, DNS_TEMP, NO_RULE, Verdict

if TYPE_CHECKING:
    from mailfilter.policy.engine import PolicyEngine
    from mailfilter.policy.profile import ClientProfile
    from mailfilter.policy.session import SessionPolicy

Check = Callable[["SessionPolicy", str, bool], "Verdict | None"]

# recipient_rule() answers a rule id, or one of these
NOT_CHECKED = NO_RULE   # the recipients check does not apply to the address
NOT_LISTED = -2         # it applies, and no line names the address: refuse


def address_bytes(address: str) -> bytes:
    """An address as the lists read it: its UTF-8 bytes (ASCII as it is).
    Rule files are read one byte per character, so an SMTPUTF8 address
    meets a UTF-8 entry byte for byte; the matchers fold A-Z only
    (docs/behaviour/control-files.md#case)."""
    return address.encode("utf-8", "surrogateescape")


# -- the checks, in table order

def _client_denied(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    return s.profile.denied_verdict     # 220 at connect, 553 at every RCPT
                                        # (docs/behaviour/tcp-smtp.md#denied-clients)


def _auth_required(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    prof = s.profile
    if prof.auth_required and s.authenticated is None:
        return s.engine.reject_verdict("auth_required", "auth_required",
                                       prof.setting_rule("SMTPAUTH"))
    return None


def _helo_missing(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    mode = s.profile.helocheck
    if mode is not None and len(mode) == 1 and s.helo_name is None:
        return s.engine.reject_verdict("helo_missing", "bad_helo",
                                       s.profile.setting_rule("HELOCHECK"))
    return None


def _bad_helo(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    hv = s.helo_verdict
    if hv is None:
        return None
    # qregex has no split horizon for badhelo: it binds relay clients too;
    # only badhelonorelay (and HELOCHECK) spare them
    # (docs/behaviour/control-files.md#qregex-dialect)
    if relay and not (s.engine.qregex and hv[0] == "bad_helo"):
        return None
    return s.engine.reject_verdict(hv[0], "bad_helo", hv[1])


def _helo_dns(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    status = s.helo_dns
    if status is None:
        return None
    if status == DNS_FAIL:
        return s.engine.reject_verdict("helo_dns", "bad_helo", s.profile.setting_rule("HELOCHECK"))
    if status == DNS_TEMP:
        return s.engine.reject_verdict("helo_dns_temp", "helo_dns_temp",
                                       s.profile.setting_rule("HELOCHECK"))
    return None


def _sender_dns(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    status = s.mail_dns
    if status is None:
        return None
    rid = s.profile.setting_rule("MFDNSCHECK")
    if status == DNS_FAIL:
        return s.engine.reject_verdict("mf_dns", "sender_must_exist", rid)
    if status == DNS_NULLMX:        # it exists but can take no reply (RFC 7505 §4.2)
        return s.engine.reject_verdict("mf_dns_null_mx", "sender_null_mx", rid)
    if status == DNS_TEMP:
        return s.engine.reject_verdict("mf_dns_temp", "mf_dns_temp", rid)
    return None


def _rcpthosts(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    """Sets rcpt_rule to the rcpthosts line naming the domain."""
    eng = s.engine
    if eng.rcpthosts_present:
        at = recipient.rfind("@")   # the recipient's last "@" (one byte per character)
        if at < 0:
            return None          # docs/behaviour/control-files.md#rcpthosts step 2: addresses
                                 # without @ are local
        # the domain: recipient[at + 1:], read in place (an absent list:
        # an existing but empty rcpthosts names no domain)
        rid = eng.rcpthosts_last(recipient, MODE_HOST, at + 1, True)
        if rid >= 0:
            s.rcpt_rule = rid
            return None
    elif eng.options.open_relay:
        return None
    return eng.reject_verdict("rcpthosts", "rcpthosts", NO_RULE, "rcpthosts")


def _routing(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    """Sender-specified routing through a local domain: `%` (the percent
    hack), `!` (a UUCP bang path) or `@` (a quoted or escaped second @) in the
    local part, or a source route the engine dropped from the path."""
    at = recipient.rfind("@")
    local = recipient[:at] if at >= 0 else recipient
    if s.rcpt_routed or "%" in local or "!" in local or "@" in local:
        return s.engine.reject_verdict("routing", "routing", NO_RULE, "routing")
    return None


def _tarpit_limit(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    prof = s.profile
    count = prof.tarpit_count
    if count and s.engine.recipients_present and s.failed_recipients >= count:
        if prof.tarpit_delay == 999:
            s.notorious = True
        return s.engine.reject_verdict("too_many_failed_rcpts", "too_many_rcpts",
                                       prof.setting_rule("TARPITCOUNT"))
    return None


def _tarpit_delay(s: SessionPolicy, recipient: str, relay: bool) -> None:
    # "after tarpitcount RCPTs, sleep tarpitdelay seconds before answering
    # each further RCPT" (docs/behaviour/tcp-smtp.md#settings); 999 means notorious, not a delay
    prof = s.profile
    count = prof.tarpit_count
    if count and s.rcpt_count > count and 0 < prof.tarpit_delay < 999:
        s.rcpt_delay = float(prof.tarpit_delay)
    return None


def _recipients(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    """Sets rcpt_rule to the recipients line that let the address in."""
    eng = s.engine
    if not eng.recipients_present:
        return None
    rid = recipient_rule(eng, recipient)
    if rid == NOT_LISTED:
        s.failed_recipients += 1
        return eng.reject_verdict("no_mailbox",
                                  "no_mailbox_450" if s.profile.recipients450 else "no_mailbox",
                                  NO_RULE, "recipients", s.rcpt_delay)
    if rid != NOT_CHECKED:
        s.rcpt_rule = rid
    return None


def _badmailfrom(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    sv = s.sender_verdict
    if sv is not None and not s.sender_bypass:
        return s.engine.reject_verdict(sv[0], "badmailfrom", sv[1], None, s.rcpt_delay)
    return None


def _badrcptto(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    eng = s.engine
    data = None
    if eng.qregex:
        data = address_bytes(recipient)
        rid = eng.listed(eng.badrcptto, data, MODE_ADDRESS)
    else:                                        # last match decides, `!` = exception
                                                 # (docs/behaviour/control-files.md#which-match-wins)
        rid = eng.badrcptto_listed(recipient, MODE_ADDRESS, False, True)
    if rid < 0 and eng.badrcpttonorelay is not None and not relay:
        rid = eng.listed(eng.badrcpttonorelay, data or address_bytes(recipient), MODE_ADDRESS)
    if rid >= 0:
        return eng.reject_verdict("badrcptto", "badrcptto", rid, None, s.rcpt_delay)
    return None


def _max_recipients(s: SessionPolicy, recipient: str, relay: bool) -> Verdict | None:
    prof = s.profile
    limit = prof.max_recipients
    if limit and s.accepted >= limit:
        return s.engine.reject_verdict("too_many_rcpts", "too_many_rcpts",
                                       prof.setting_rule("MAXRECIPIENTS"), None, s.rcpt_delay)
    return None


# What a check needs of the session's state to fire at all: the bits of the
# state SessionPolicy.rcpt works out before it runs a plan. A bit may be set
# when nothing fires; it must be set whenever a check needing it could.
KEPT_HELO = 1       # a HELO verdict, or a HELO DNS answer other than ok
KEPT_MAIL = 2       # a sender verdict, or a sender DNS answer other than ok
HISTORY = 4         # an earlier RCPT in this transaction, or a failed one in this session
STATES = 8


class RcptCheck(NamedTuple):
    name: str
    run: Check
    relay: bool     # also run for relay clients (False: the split horizon skips it)
    needs: int      # state bit without which it cannot fire (0: none)
    # False when the check cannot fire for a client with this profile
    # (a relay client if relay)
    wanted: Callable[[ClientProfile, PolicyEngine, bool], bool]


def _always(prof: ClientProfile, eng: PolicyEngine, relay: bool) -> bool:
    return True


RCPT_CHECKS: tuple[RcptCheck, ...] = (
    RcptCheck("client_denied", _client_denied, True, 0, lambda p, e, relay: not p.allowed),
    RcptCheck("auth_required", _auth_required, True, 0, lambda p, e, relay: p.auth_required),
    RcptCheck("helo_missing", _helo_missing, False, 0,
              lambda p, e, relay: p.helocheck is not None and len(p.helocheck) == 1),
    RcptCheck("bad_helo", _bad_helo, True, KEPT_HELO, lambda p, e, relay: e.qregex or not relay),
    RcptCheck("helo_dns", _helo_dns, False, KEPT_HELO, _always),
    RcptCheck("sender_dns", _sender_dns, False, KEPT_MAIL, _always),
    RcptCheck("rcpthosts", _rcpthosts, False, 0, _always),
    RcptCheck("routing", _routing, False, 0, lambda p, e, relay: not e.options.allow_routing),
    # the counts are unsigned, so tarpit_limit needs a failed recipient,
    # tarpit_delay a second RCPT, max_recipients an accepted one
    RcptCheck("tarpit_limit", _tarpit_limit, False, HISTORY,
              lambda p, e, relay: p.tarpit_count != 0 and e.recipients_present),
    RcptCheck("tarpit_delay", _tarpit_delay, False, HISTORY,
              lambda p, e, relay: p.tarpit_count != 0 and 0 < p.tarpit_delay < 999),
    RcptCheck("recipients", _recipients, False, 0, lambda p, e, relay: e.recipients_present),
    RcptCheck("badmailfrom", _badmailfrom, True, KEPT_MAIL,
              lambda p, e, relay: not p.disable_badmailfrom),
    RcptCheck("badrcptto", _badrcptto, True, 0,
              lambda p, e, relay: e.badrcptto is not None
              or (not relay and e.badrcpttonorelay is not None)),
    RcptCheck("max_recipients", _max_recipients, True, HISTORY,
              lambda p, e, relay: p.max_recipients != 0),
)


def plans(prof: ClientProfile, eng: PolicyEngine, relay: bool) -> tuple[tuple[Check, ...], ...]:
    """The checks that can fire for a client with profile `prof` (a relay
    client if `relay`), in order, one tuple per session state (indexed by
    the state bits): what SessionPolicy.rcpt runs."""
    return _by_state(tuple(c for c in RCPT_CHECKS
                           if (c.relay or not relay) and c.wanted(prof, eng, relay)))


@cache
def _by_state(wanted: tuple[RcptCheck, ...]) -> tuple[tuple[Check, ...], ...]:
    # one set of plans per distinct row selection, shared by the profiles
    return tuple(tuple(c.run for c in wanted if c.needs & state == c.needs)
                 for state in range(STATES))


def recipient_rule(eng: PolicyEngine, recipient: str) -> int:
    """The recipients line accepting `recipient` (or the `!domain` / `!*`
    line that exempts it from the check), NOT_CHECKED, or NOT_LISTED
    (docs/behaviour/control-files.md#recipients)."""
    # the UTF-8 bytes, A-Z folded (bytes.lower()): other bytes compared as they are
    addr = address_bytes(recipient).lower()
    if b"@" not in addr:
        if addr == b"postmaster":
            # RFC 5321 §4.5.1: <postmaster> is always taken, whatever the list says
            return NOT_CHECKED
        addr += b"@localhost"
    local, _, dom = addr.rpartition(b"@")
    unchecked = eng.recipients_unchecked
    if unchecked is not None:
        rid = unchecked.get(dom)
        if rid >= 0:
            return rid              # `!domain`: not checked, that line let it in
    table = eng.recipients
    if table is not None:
        rid = table.get(addr)
        if rid >= 0:
            return rid
        dash = local.find(b"-")
        if dash >= 0:
            rid = table.get(local[:dash + 1] + b"@" + dom)
            if rid >= 0:
                return rid
        rid = table.get(b"@" + dom)
        if rid >= 0:
            return rid
    # `!*`: recipients at domains the file does not name are not checked
    if unchecked is not None:
        rid = unchecked.get(b"*")
        if rid >= 0 and not (eng.recipients_domains is not None
                             and eng.recipients_domains.get(dom) >= 0):
            return rid
    return NOT_LISTED
